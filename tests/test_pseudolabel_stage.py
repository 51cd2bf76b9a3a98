"""``pixcli pseudolabel`` as a stage and a command: tiny data, a random model, real files."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_pseudo_labels import assert_same_content, contents
from typer.testing import CliRunner

from pixcli.artifacts import finished_manifest, read_json, save_checkpoint
from pixcli.cli import app
from pixcli.config import to_dict
from pixcli.data.readers import open_dataset
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.data.transforms import normalize
from pixcli.engine.trainer import Interrupted
from pixcli.errors import UserError
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.predictor import resolve_inference
from pixcli.pseudo_labels import PseudoLabelFile, PseudoLabelWriter
from stages import pseudolabel

MODEL = SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=8)


def _checkpoint(path: Path, seed: int = 0) -> Path:
    """A random model whose sharpened classifier gives varied, fairly confident labels."""
    torch.manual_seed(seed)
    model = build_segmentor(MODEL)
    with torch.no_grad():
        model.classifier[1].weight.mul_(5000)
    save_checkpoint(
        path,
        {"model_config": MODEL.to_dict(), "classes": list(CITYSCAPES.classes),
         "state_dict": model.state_dict(), "step": 0},
    )  # fmt: skip
    return path


def _config(bench: Path, **changes: object) -> pseudolabel.PseudolabelConfig:
    """Two images per forward pass: a resumed run must batch them as an uninterrupted one."""
    cfg = pseudolabel.PseudolabelConfig(
        target=f"cityscapes:{bench / 'target'}", device="cpu", num_workers=0, batch_size=2
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and OpenMP threads stall badly on a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture(scope="module")
def clean(tiny_bench: Path, ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uninterrupted run."""
    out = tmp_path_factory.mktemp("clean")
    pseudolabel.run(_config(tiny_bench), ckpt, out)
    return out


def test_writes_pseudo_labels_and_reports_their_quality(clean: Path, tiny_bench: Path):
    manifest = read_json(clean / "manifest.json")
    assert manifest["stage"] == "pseudolabel" and manifest["complete"]
    results = manifest["results"]
    assert results["images"] == 4 and results["output_stride"] == 4
    quality = results["quality"]
    assert 0 <= quality["mIoU"] <= 100 and len(quality["accuracy_vs_confidence"]) == 7
    assert read_json(clean / "metrics.json")["mIoU"] == quality["mIoU"]
    labels = PseudoLabelFile(clean / "pseudo.h5")
    dataset = open_dataset(f"cityscapes:{tiny_bench / 'target'}", "train")
    assert labels.names == tuple(name for _, _, name in dataset.items)
    hard = [labels.hard(i) for i in range(len(labels))]
    assert all(h.shape == (8, 16) for h in hard)  # 32x64 images at stride 4
    counts = np.bincount(np.concatenate([h.ravel() for h in hard]), minlength=19)[:19]
    assert len(np.flatnonzero(counts)) >= 3  # varied labels, so the test below means something
    assert np.array_equal(labels.class_counts, counts)
    np.testing.assert_allclose(labels.class_distribution, counts / counts.sum())  # Eq. 10
    agree = np.mean([(labels.soft(i).argmax(0) == hard[i]).mean() for i in range(len(labels))])
    assert agree > 0.95  # argmax before quantization; ties within 1/255 may differ


def test_prototypes_equal_a_hand_computation_with_the_model(clean: Path, ckpt: Path):
    labels = PseudoLabelFile(clean / "pseudo.h5")
    dataset = open_dataset(labels.header.dataset, "train")
    model = build_segmentor(MODEL).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    sums, counts = np.zeros((19, 8)), np.zeros(19)
    for i in range(len(dataset)):
        with torch.no_grad():
            feats = model(normalize(dataset.read_image(i))[None]).features[0].double()
        hard = labels.hard(i)
        for y in range(hard.shape[0]):
            for x in range(hard.shape[1]):
                z = feats[:, y, x].numpy()
                sums[hard[y, x]] += z / np.linalg.norm(z)  # CPSL Eq. 7 on normalised features
                counts[hard[y, x]] += 1
    expected = sums / np.maximum(counts, 1)[:, None]
    np.testing.assert_allclose(labels.prototypes, expected, atol=1e-5)
    assert np.array_equal(labels.class_counts, counts)


def test_ctrl_c_then_rerun_gives_the_same_file(
    clean: Path, tiny_bench: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    original = PseudoLabelWriter.write

    def interrupt_at_third_image(self: PseudoLabelWriter, i: int, record) -> None:
        if i == 2:
            raise KeyboardInterrupt
        original(self, i, record)

    monkeypatch.setattr(PseudoLabelWriter, "write", interrupt_at_third_image)
    with pytest.raises(Interrupted, match="interrupted after 2 of 4 images"):
        pseudolabel.run(_config(tiny_bench), ckpt, tmp_path)
    assert not finished_manifest(tmp_path, "pseudolabel") and not (tmp_path / "pseudo.h5").exists()
    monkeypatch.setattr(PseudoLabelWriter, "write", original)
    resumed = pseudolabel.run(_config(tiny_bench), ckpt, tmp_path)
    assert_same_content(clean / "pseudo.h5", tmp_path / "pseudo.h5")
    expected = read_json(clean / "manifest.json")["results"]
    for key in ("file_bytes", "bytes_per_image"):  # HDF5 may place things differently
        expected.pop(key), resumed["results"].pop(key)
    assert resumed["results"] == expected


KILL_AT_THIRD_FLUSH = """
import os, signal, sys
import h5py
from pixcli.pseudo_labels import PseudoLabelWriter
PseudoLabelWriter.COMMIT_SECONDS = 0.0  # commit every image
flushes = 0
real_flush = h5py.File.flush
def flush(self):
    global flushes
    flushes += 1
    if flushes == 3:  # image 2's rows are written but not flushed
        os.kill(os.getpid(), signal.SIGKILL)
    real_flush(self)
h5py.File.flush = flush
from pixcli.cli import main
sys.argv = ["pixcli", "pseudolabel", *sys.argv[1:]]
main()
"""


def test_kill_9_then_rerun_gives_the_same_file(
    clean: Path, tiny_bench: Path, ckpt: Path, tmp_path: Path
):
    args = ["--checkpoint", str(ckpt), "--target", f"cityscapes:{tiny_bench / 'target'}",
            "--out", str(tmp_path), "--device", "cpu", "--batch-size", "2",
            "--set", "num_workers=0"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_FLUSH, *args], env=env)
    assert killed.returncode == -9
    assert not (tmp_path / "pseudo.h5").exists()
    with h5py.File(tmp_path / "pseudo.part0-of-1.h5", "r") as fh:  # image 1 may be marked
        assert fh["done"][()].tolist() in ([1, 0, 0, 0], [1, 1, 0, 0])
        assert fh.attrs["complete"] == 0
    pseudolabel.run(_config(tiny_bench), ckpt, tmp_path)
    assert_same_content(clean / "pseudo.h5", tmp_path / "pseudo.h5")


def test_output_from_another_checkpoint_or_settings_is_refused(
    clean: Path, tiny_bench: Path, ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    other = _checkpoint(tmp_path / "other.pt", seed=1)
    with pytest.raises(UserError, match="pseudo.h5: was made with checkpoint .* delete it"):
        pseudolabel.run(_config(tiny_bench), other, clean)
    with pytest.raises(UserError, match="made with output stride 4, this run has 8"):
        pseudolabel.run(_config(tiny_bench, output_stride=8), ckpt, clean)

    def interrupt(self: PseudoLabelWriter, i: int, record) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(PseudoLabelWriter, "write", interrupt)
    with pytest.raises(Interrupted):
        pseudolabel.run(_config(tiny_bench), ckpt, tmp_path / "partial")
    with pytest.raises(UserError, match="part0-of-1.h5: was made with settings .* refusing to"):
        pseudolabel.run(_config(tiny_bench, ignore_below=0.5), ckpt, tmp_path / "partial")


def test_finished_run_is_not_redone(clean: Path, tiny_bench: Path, ckpt: Path):
    mtime = (clean / "pseudo.h5").stat().st_mtime_ns
    assert pseudolabel.run(_config(tiny_bench), ckpt, clean) == read_json(clean / "manifest.json")
    assert (clean / "pseudo.h5").stat().st_mtime_ns == mtime


def test_sliding_window_flip_and_output_stride(tiny_bench: Path, ckpt: Path, tmp_path: Path):
    cfg = _config(tiny_bench, output_stride=8, split="val")
    cfg.inference.window, cfg.inference.stride, cfg.inference.flip = (32, 32), (32, 16), True
    pseudolabel.run(cfg, ckpt, tmp_path)
    labels = PseudoLabelFile(tmp_path / "pseudo.h5")
    assert len(labels) == 3 and labels.soft(0).shape == (19, 4, 8)
    assert labels.soft_resized(0).shape == (19, 32, 64)


def test_inference_defaults_to_the_checkpoints_own_settings(
    tiny_bench: Path, ckpt: Path, tmp_path: Path
):
    """As eval and predict: with no option, the settings the checkpoint was validated with
    (resolve_inference); an option replaces one of them; the labels come from those settings."""
    data = torch.load(ckpt, weights_only=True)
    own = {"window": [32, 32], "stride": [32, 16], "flip": True}
    data["meta"] = {"config": {"eval": own}}
    validated = tmp_path / "validated.pt"
    save_checkpoint(validated, data)
    pseudolabel.run(_config(tiny_bench, split="val"), validated, tmp_path / "own")
    header = PseudoLabelFile(tmp_path / "own" / "pseudo.h5").header
    used = json.loads(header.settings)["inference"]
    assert used == to_dict(resolve_inference(data)) and {k: used[k] for k in own} == own
    assert read_json(tmp_path / "own" / "manifest.json")["results"]["inference"] == used
    spelt_out = _config(tiny_bench, split="val")
    spelt_out.inference.window, spelt_out.inference.stride = (32, 32), (32, 16)
    spelt_out.inference.flip = True
    pseudolabel.run(spelt_out, ckpt, tmp_path / "spelt-out")  # the same, chosen on the plain one
    mine, spelt = (
        contents(tmp_path / "own" / "pseudo.h5"),
        contents(tmp_path / "spelt-out" / "pseudo.h5"),
    )
    datasets = [k for k in mine if not k.startswith("@")]  # attributes: the checkpoint's name
    assert datasets and all(np.array_equal(mine[k], spelt[k]) for k in datasets)
    no_flip = _config(tiny_bench, split="val")
    no_flip.inference.flip = False
    pseudolabel.run(no_flip, validated, tmp_path / "no-flip")
    chosen = read_json(tmp_path / "no-flip" / "manifest.json")["results"]["inference"]
    assert chosen == {**used, "flip": False}


def test_command_line_and_show(clean: Path, tiny_bench: Path, ckpt: Path, tmp_path: Path):
    runner = CliRunner()
    target = f"cityscapes:{tiny_bench / 'target'}"
    result = runner.invoke(
        app,
        ["pseudolabel", "--checkpoint", str(ckpt), "--target", target, "--out", str(tmp_path / "p"),
         "--device", "cpu", "--flip", "--set", "num_workers=0"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "pseudo-label accuracy" in result.output
    shown = runner.invoke(app, ["show", str(tmp_path / "p" / "pseudo.h5")])
    assert shown.exit_code == 0, shown.output
    assert "pixcli-pseudo-labels v1" in shown.output and "class distribution" in shown.output
    damaged = tmp_path / "damaged.h5"
    damaged.write_bytes((clean / "pseudo.h5").read_bytes()[:3000])
    result = runner.invoke(app, ["show", str(damaged)])
    assert result.exit_code == 2 and "not a readable HDF5 file" in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_predict_on_grid_features_match_the_logits(ckpt: Path):
    """Whole image: the classifier applied to the returned features gives the logits."""
    from pixcli.engine.inference import InferenceConfig, predict_on_grid

    model = build_segmentor(MODEL).eval()
    model.load_state_dict(torch.load(ckpt, weights_only=True)["state_dict"])
    x = torch.randn(2, 3, 32, 64)
    for flip in (False, True):
        pred = predict_on_grid(model, x, InferenceConfig(flip=flip), (8, 16))
        conv = model.classifier[1]
        again = F.conv2d(pred.features, conv.weight, conv.bias)
        torch.testing.assert_close(again, pred.logits, atol=1e-3, rtol=1e-4)


@pytest.mark.slow
def test_two_processes_give_the_same_file_as_one(
    clean: Path, tiny_bench: Path, ckpt: Path, tmp_path: Path
):
    """torchrun, 2 CPU processes (gloo): work files per rank, merged by rank 0."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixcli", "pseudolabel", "--checkpoint", str(ckpt),
           "--target", f"cityscapes:{tiny_bench / 'target'}", "--out", str(tmp_path),
           "--device", "cpu", "--batch-size", "2", "--set", "num_workers=0"]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "metrics.json",
        "pseudo.h5",
    ]
    assert_same_content(clean / "pseudo.h5", tmp_path / "pseudo.h5")
    assert read_json(tmp_path / "metrics.json") == read_json(clean / "metrics.json")
