"""Feedback on long runs (issue 19): progress lines and bar, metrics.csv and TensorBoard,
provenance, file modes, SIGTERM, and the --out reuse refusal."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from rich.console import Console
from tiny import tiny_warmup

from pixcli.artifacts import load_checkpoint, read_json, save_checkpoint, write_json
from pixcli.data.transforms import AugmentConfig
from pixcli.engine import progress as progress_module
from pixcli.engine.trainer import TrainLoop
from pixcli.errors import Interrupted, UserError, exit_code, sigterm_as_interrupt
from stages import warmup
from stages.common import prepare_out_dir, start_over

LINE = re.compile(r"^train (\d+)/4 [\d.]+ it/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d loss_ce ")


def _run_quiet_warmup(bench: Path, out: Path, **loop: int) -> dict:
    cfg = tiny_warmup(bench)
    for key, value in loop.items():
        setattr(cfg.loop, key, value)
    return warmup.run(cfg, out)


@pytest.fixture(scope="module")
def logged_run(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """A 4-step warm-up with log_every 2 whose stderr is not a terminal, and that stderr."""
    out = tmp_path_factory.mktemp("logged") / "w"
    buffer = io.StringIO()
    saved = sys.stderr
    sys.stderr = buffer  # what nohup or SLURM gives: a file, not a terminal
    try:
        _run_quiet_warmup(tiny_bench, out, iterations=4, log_every=2)
    finally:
        sys.stderr = saved
    return out, buffer.getvalue()


def test_non_terminal_run_prints_a_line_per_log_step_and_a_summary(logged_run):
    out, text = logged_run
    lines = text.splitlines()
    progress = [m for m in map(LINE.match, lines) if m]
    assert [int(m.group(1)) for m in progress] == [2, 4]
    summary = [x for x in lines if x.startswith("warmup finished in ")]
    assert len(summary) == 1
    assert str(out) in summary[0] and "model.pt" in summary[0] and "mIoU" in summary[0]


def test_bar_at_80_columns_keeps_count_and_eta(monkeypatch: pytest.MonkeyPatch):
    screen = Console(file=io.StringIO(), width=80, force_terminal=True, color_system=None)
    monkeypatch.setattr(progress_module, "console", screen)
    bar = progress_module.make_progress()
    info = " ".join(f"loss_{k} 0.123" for k in ("ce", "st", "kl", "sl", "reg", "mix", "proto"))
    task = bar.add_task("train", total=250, info=info)
    bar.update(task, completed=20)
    time.sleep(0.05)
    bar.update(task, completed=40)
    screen.print(bar.get_renderable())
    (line,) = [x for x in screen.file.getvalue().splitlines() if x.strip()]
    assert len(line) <= 80
    assert "40/250" in line and "it/s" in line
    eta = re.search(r"eta (\d+:\d\d:\d\d)", line)
    assert eta is not None  # a time, not the "-:--:--" of a bar without speed
    assert "…" in line and "loss_ce" in line  # the losses are what is cut


def test_metrics_csv_holds_the_logged_numbers(logged_run):
    out, _ = logged_run
    with open(out / "metrics.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    loss_steps = [int(r["step"]) for r in rows if r["name"] == "loss_ce"]
    assert loss_steps == [2, 4]
    val = [r for r in rows if r["name"] == "val_mIoU"]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [float(v["value"]) for v in val] == pytest.approx([e["val_mIoU"] for e in log[-1:]])
    assert any(r["name"].startswith("val_IoU/") for r in rows)  # per-class IoU, flattened


def test_tensorboard_events_are_readable_by_tensorboard(logged_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"loss_ce", "lr_factor", "it_s", "val_mIoU"} <= set(scalars)
    assert [e.step for e in events.Scalars("loss_ce")] == [2, 4]
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    losses = [e["loss_ce"] for e in log if "loss_ce" in e]
    assert [e.value for e in events.Scalars("loss_ce")] == pytest.approx(losses)


def test_tensorboard_shows_val_predictions_as_images(tiny_bench: Path, tmp_path: Path):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from pixcli.data.readers import open_dataset
    from pixcli.engine.tracking import PREVIEW_TAG, VAL_PREVIEWS

    out = tmp_path / "w"
    _run_quiet_warmup(tiny_bench, out, iterations=4, log_every=2, eval_every=2)
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0})
    events.Reload()
    val = open_dataset(f"cityscapes:{tiny_bench / 'target'}", "val")
    shown = min(VAL_PREVIEWS, len(val))
    assert sorted(events.Tags()["images"]) == [f"{PREVIEW_TAG}/{k}" for k in range(shown)]
    for k in range(shown):
        image, label, _ = val[k]
        height, width = label.shape
        records = events.Images(f"{PREVIEW_TAG}/{k}")
        assert [r.step for r in records] == [2, 4]  # every validation
        for record in records:
            strip = np.asarray(Image.open(io.BytesIO(record.encoded_image_string)))
            assert (record.height, record.width) == (height, 3 * width)
            assert strip.shape == (height, 3 * width, 3)
            np.testing.assert_array_equal(strip[:, :width], image)  # the input, unchanged
            palette = np.array(val.taxonomy.palette_array())
            known = label != 255
            np.testing.assert_array_equal(  # the ground truth in the classes' colours
                strip[:, width : 2 * width][known], palette[label[known]]
            )
            prediction = strip[:, 2 * width :].reshape(-1, 3)
            assert all(
                tuple(c) in {tuple(p) for p in palette} for c in np.unique(prediction, axis=0)
            )


def test_manifest_records_provenance(logged_run):
    out, _ = logged_run
    manifest = read_json(out / "manifest.json")
    prov = manifest["provenance"]
    assert prov["command"] and prov["host"] and prov["device"].startswith("cpu")
    assert prov["started_utc"] <= prov["ended_utc"] and prov["ended_utc"].endswith("+00:00")
    kind, _, path = prov["paths"]["source"].partition(":")
    assert kind == "gta5" and Path(path).is_absolute() and Path(path).is_dir()
    assert {"numpy", "Pillow", "h5py", "torch", "timm"} <= set(manifest["versions"])
    git = prov["git"]  # the tests run from a checkout
    assert git is not None and re.fullmatch(r"[0-9a-f]{40}", git["commit"])
    assert isinstance(git["dirty"], bool)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_artifacts_get_the_mode_of_the_umask(tmp_path: Path, umask: int, mode: int):
    old = os.umask(umask)
    try:
        write_json(tmp_path / "a.json", {"x": 1})
        save_checkpoint(tmp_path / "m.pt", {"model_config": {}, "classes": [], "state_dict": {}})
    finally:
        os.umask(old)
    for name in ("a.json", "m.pt"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == mode


def test_run_artifacts_are_0644_under_umask_022(logged_run):
    out, _ = logged_run  # written under the test process's umask
    mask = os.umask(0o022)
    os.umask(mask)
    if mask != 0o022:
        pytest.skip(f"the tests run under umask {mask:03o}")
    for name in ("model.pt", "last.pt", "best.pt", "manifest.json", "train_log.jsonl"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name


def _finished(out: Path, config: dict, inputs: dict) -> None:
    write_json(
        out / "manifest.json",
        {"stage": "eval", "complete": True, "config": config, "inputs": inputs, "results": {}},
    )


def test_reuse_refusal_names_each_differing_key(tmp_path: Path):
    config = {"device": "cpu", "num_workers": 2, "batch_size": 2, "eval": {"flip": False}}
    _finished(tmp_path, config, {"data": "abc"})
    runtime_only = {**config, "device": "cuda", "num_workers": 0, "save_predictions": True}
    assert prepare_out_dir(tmp_path, "eval", {"data": "abc"}, runtime_only) is not None
    other = {**config, "batch_size": 4, "eval": {"flip": True}}
    with pytest.raises(UserError) as err:
        prepare_out_dir(tmp_path, "eval", {"data": "xyz"}, other)
    message = str(err.value)
    assert "batch_size: 2 -> 4" in message and "eval.flip: False -> True" in message
    assert "input data: 'abc' -> 'xyz'" in message and "--force" in message


def test_force_deletes_only_a_run_of_the_same_stage(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    _finished(run, {}, {})
    (run / "metrics.json").write_text("{}")
    with pytest.raises(UserError, match="holds the output of 'eval', not 'warmup'"):
        start_over(run, "warmup")
    start_over(run, "eval")
    assert not run.exists()
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(UserError, match="no pixcli manifest.json"):
        start_over(foreign, "eval")
    assert (foreign / "cat.jpg").is_file()


@pytest.fixture
def sigterm_handler():
    """SIGTERM raises Terminated during the test, as under the pixcli command."""
    previous = signal.getsignal(signal.SIGTERM)
    sigterm_as_interrupt()
    yield
    signal.signal(signal.SIGTERM, previous)


def _fixed_crops(bench: Path):
    """A warm-up whose augmentation draws nothing: the resumed run sees the same pixels."""
    cfg = tiny_warmup(bench, val=None)
    cfg.augment = AugmentConfig(crop_size=None, scale_range=(1.0, 1.0), flip=False)
    cfg.loop.checkpoint_every = 0  # last.pt only from the signal
    return cfg


def test_sigterm_saves_last_pt_and_the_rerun_equals_an_uninterrupted_run(
    tiny_bench: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    sigterm_handler: None,
):
    original = TrainLoop._check_finite

    def terminate_at_step_3(self: TrainLoop, logs: dict) -> None:
        if self.step == 2:  # the third step has run; the scheduler sends SIGTERM
            os.kill(os.getpid(), signal.SIGTERM)
        original(self, logs)

    monkeypatch.setattr(TrainLoop, "_check_finite", terminate_at_step_3)
    with pytest.raises(Interrupted, match="interrupted at step 3") as err:
        warmup.run(_fixed_crops(tiny_bench), tmp_path / "cut")
    assert exit_code(err.value) == 143
    assert load_checkpoint(tmp_path / "cut" / "last.pt")["step"] == 3  # the step finished
    monkeypatch.setattr(TrainLoop, "_check_finite", original)
    warmup.run(_fixed_crops(tiny_bench), tmp_path / "cut")  # resumes at step 2
    warmup.run(_fixed_crops(tiny_bench), tmp_path / "whole")
    assert "resuming" in capsys.readouterr().err
    resumed = load_checkpoint(tmp_path / "cut" / "model.pt")["state_dict"]
    whole = load_checkpoint(tmp_path / "whole" / "model.pt")["state_dict"]
    assert resumed.keys() == whole.keys()
    for key in whole:
        assert torch.equal(resumed[key], whole[key]), key


@pytest.mark.slow
def test_cli_exits_143_on_sigterm_and_the_rerun_finishes(tiny_bench: Path, tmp_path: Path):
    out = tmp_path / "w"
    command = [
        sys.executable, "-m", "pixcli", "warmup", "--source", f"gta5:{tiny_bench / 'source'}",
        "--out", str(out), "--device", "cpu", "--iterations", "400", "--batch-size", "2",
        "--backbone", "test_resnet", "--set", "num_workers=0", "--set", "loop.log_every=1",
        "--set", "augment.crop_size=[32, 32]",
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (out / "train_log.jsonl").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "rerun the same command to resume" in err
    step = load_checkpoint(out / "last.pt")["step"]
    assert 0 < step < 400
    command[command.index("400")] = str(step + 2)
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"resuming {out} from step {step}" in done.stderr.replace("\n", " ")
    assert load_checkpoint(out / "model.pt")["step"] == step + 2
