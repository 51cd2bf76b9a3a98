"""``pixcli predict`` and ``pixcli.load``: files written, parity with eval, inputs of every
kind, unreadable images, reruns, cheap imports."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import pattern_image, write_png, write_png16
from PIL import Image
from tiny import random_checkpoint
from typer.testing import CliRunner

import pixcli
from pixcli.artifacts import load_checkpoint, read_json, save_checkpoint
from pixcli.cli import app
from pixcli.config import to_dict
from pixcli.data.image_files import find_images, read_image, to_rgb
from pixcli.engine.inference import InferenceConfig
from pixcli.errors import UserError
from pixcli.models import SegmentorConfig
from pixcli.predictor import InferenceChoice, resolve_inference
from stages import eval as eval_stage

runner = CliRunner()


def _predict(ckpt: Path, out: Path, *images: str | Path, extra: tuple[str, ...] = ()):
    args = ["predict", "--checkpoint", str(ckpt), "--out", str(out), "--device", "cpu"]
    for image in images:
        args += ["--images", str(image)]
    return runner.invoke(app, [*args, *extra])


def _text(output: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(output.split())


def _ids(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path))


def _val_images(bench: Path) -> Path:
    return bench / "target" / "leftImg8bit" / "val"


def test_predict_labels_equal_eval_save_predictions(tiny_bench: Path, warm: Path, tmp_path: Path):
    """The target val images without their labels: predict's label PNGs are eval's."""
    images = tmp_path / "images"
    shutil.copytree(_val_images(tiny_bench), images)  # no gtFine: no labels anywhere
    result = _predict(warm, tmp_path / "pred", images)
    assert result.exit_code == 0, result.output
    assert "images/s" in result.output
    cfg = eval_stage.EvalConfig(
        data=f"cityscapes:{tiny_bench / 'target'}", device="cpu", save_predictions=True
    )
    eval_stage.run(cfg, warm, tmp_path / "eval")
    saved = sorted((tmp_path / "eval" / "predictions").rglob("*.png"))
    assert len(saved) == 3
    for path in saved:
        rel = path.relative_to(tmp_path / "eval" / "predictions")
        mine = tmp_path / "pred" / rel.parent / f"{rel.stem}_leftImg8bit_label.png"
        np.testing.assert_array_equal(_ids(mine), _ids(path))
        for kind in ("color.png", "overlay.jpg"):
            other = mine.with_name(mine.name.replace("label.png", kind))
            assert Image.open(other).size == Image.open(path).size
    manifest = read_json(tmp_path / "pred" / "manifest.json")
    assert manifest["stage"] == "predict" and manifest["complete"]
    assert manifest["results"]["predicted"] == 3 and manifest["results"]["failed"] == []


def test_api_equals_the_command_line(tiny_bench: Path, warm: Path, tmp_path: Path):
    image = next(_val_images(tiny_bench).rglob("*.png"))
    result = _predict(warm, tmp_path / "pred", image, extra=("--confidence", "--probs"))
    assert result.exit_code == 0, result.output
    base = tmp_path / "pred" / image.stem
    model = pixcli.load(warm, device="cpu")
    mask = model.predict(image)
    np.testing.assert_array_equal(mask, _ids(Path(f"{base}_label.png")))
    np.testing.assert_array_equal(model.predict(np.asarray(Image.open(image))), mask)
    np.testing.assert_array_equal(model.colorize(mask), np.asarray(Image.open(f"{base}_color.png")))
    proba = model.predict_proba(image)
    assert proba.shape == (len(model.classes), *mask.shape) and proba.dtype == np.float32
    np.testing.assert_allclose(proba.sum(0), 1.0, atol=1e-5)
    np.testing.assert_array_equal(proba.argmax(0), mask)
    stored = np.load(f"{base}_probs.npy")
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored, proba, atol=1e-3)
    confidence = np.asarray(Image.open(f"{base}_confidence.png"))
    np.testing.assert_array_equal(confidence, np.round(proba.max(0) * 255).astype(np.uint8))
    assert model.classes[0] == "road" and tuple(model.palette[0]) == (128, 64, 128)


def test_every_kind_of_image_is_read_as_rgb(tmp_path: Path):
    rgb = pattern_image(0, (10, 14))
    rgba = np.concatenate([rgb, np.full((10, 14, 1), 7, np.uint8)], axis=2)
    grey = rgb[:, :, 0]
    write_png(tmp_path / "rgba.png", rgba)
    write_png(tmp_path / "grey.png", grey)
    write_png16(tmp_path / "rgb16.png", rgb.astype(np.uint16) * 257)
    write_png16(tmp_path / "grey16.png", grey.astype(np.uint16) * 257 + 100)
    Image.fromarray(rgb).save(tmp_path / "photo.jpg")
    np.testing.assert_array_equal(read_image(tmp_path / "rgba.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "grey.png"), np.dstack([grey] * 3))
    np.testing.assert_array_equal(read_image(tmp_path / "rgb16.png"), rgb)
    np.testing.assert_array_equal(read_image(tmp_path / "grey16.png"), np.dstack([grey] * 3))
    assert read_image(tmp_path / "photo.jpg").shape == (10, 14, 3)
    np.testing.assert_array_equal(to_rgb(Image.fromarray(rgba)), rgb)
    with pytest.raises(ValueError, match="dtype float32"):
        to_rgb(rgb.astype(np.float32))


def test_mixed_sizes_and_formats_in_a_tree(warm: Path, tmp_path: Path):
    photos = tmp_path / "photos"
    rgb = pattern_image(3, (24, 40))
    write_png(photos / "a" / "rgb.png", rgb)
    write_png16(photos / "a" / "deep.png", rgb.astype(np.uint16) * 257)
    write_png(photos / "b" / "grey.png", pattern_image(1, (33, 17))[:, :, 0])
    write_png(
        photos / "b" / "rgba.png",
        np.dstack([pattern_image(2, (16, 50)), np.full((16, 50), 9, np.uint8)]),
    )
    result = _predict(warm, tmp_path / "pred", photos, extra=("--batch-size", "2"))
    assert result.exit_code == 0, result.output
    for rel, size in {"a/rgb": (24, 40), "a/deep": (24, 40), "b/grey": (33, 17),
                      "b/rgba": (16, 50)}.items():  # fmt: skip
        assert _ids(tmp_path / "pred" / f"{rel}_label.png").shape == size
    np.testing.assert_array_equal(
        _ids(tmp_path / "pred" / "a" / "deep_label.png"),
        _ids(tmp_path / "pred" / "a" / "rgb_label.png"),
    )


def test_real_photos_of_mixed_sizes(warm: Path, tmp_path: Path):
    """matplotlib's sample photos (a JPEG portrait, RGBA PNGs; matplotlib is a dependency):
    every output file, at each photo's own size."""
    import matplotlib

    samples = Path(matplotlib.get_data_path()) / "sample_data"
    photos = tmp_path / "photos"
    names = ["grace_hopper.jpg", "Minduka_Present_Blue_Pack.png", "logo2.png"]
    photos.mkdir()
    for name in names:
        shutil.copy(samples / name, photos / name)
    extra = ("--confidence", "--probs")
    result = _predict(warm, tmp_path / "pred", photos, extra=extra)
    assert result.exit_code == 0, result.output
    for name in names:
        stem = tmp_path / "pred" / Path(name).stem
        width, height = Image.open(samples / name).size
        assert _ids(Path(f"{stem}_label.png")).shape == (height, width)
        assert Image.open(f"{stem}_color.png").size == (width, height)
        assert Image.open(f"{stem}_overlay.jpg").size == (width, height)
        assert Image.open(f"{stem}_confidence.png").size == (width, height)
        assert np.load(f"{stem}_probs.npy").shape[-2:] == (height, width)


def test_globs_mirror_the_tree_below_their_fixed_part(warm: Path, tmp_path: Path):
    write_png(tmp_path / "in" / "x" / "one.png", pattern_image(0, (8, 8)))
    write_png(tmp_path / "in" / "y" / "two.png", pattern_image(1, (8, 8)))
    write_png(tmp_path / "in" / "y" / "skip.jpg", pattern_image(1, (8, 8)))
    found = find_images([str(tmp_path / "in" / "*" / "*.png")])
    assert [str(f.relative) for f in found] == ["x/one", "y/two"]


def test_unreadable_images_are_reported_skipped_and_fail_the_run(warm: Path, tmp_path: Path):
    write_png(tmp_path / "in" / "good.png", pattern_image(0, (16, 16)))
    data = (tmp_path / "in" / "good.png").read_bytes()
    (tmp_path / "in" / "cut.png").write_bytes(data[: len(data) // 2])
    (tmp_path / "in" / "text.jpg").write_text("not an image")
    result = _predict(warm, tmp_path / "pred", tmp_path / "in")
    assert result.exit_code == 2, result.output
    assert "cut.png" in result.output and "text.jpg" in result.output
    assert "2 of 3 images could not be read and were skipped" in _text(result.output)
    assert (tmp_path / "pred" / "good_label.png").is_file()
    manifest = read_json(tmp_path / "pred" / "manifest.json")
    assert not manifest["complete"]
    assert sorted(Path(f["image"]).name for f in manifest["results"]["failed"]) == [
        "cut.png", "text.jpg"
    ]  # fmt: skip


def test_rerun_skips_finished_images_and_refuses_another_checkpoint(warm: Path, tmp_path: Path):
    for i in range(2):
        write_png(tmp_path / "in" / f"{i}.png", pattern_image(i, (16, 16)))
    assert _predict(warm, tmp_path / "pred", tmp_path / "in").exit_code == 0
    label = tmp_path / "pred" / "0_label.png"
    before = label.stat().st_mtime_ns
    (tmp_path / "pred" / "1_overlay.jpg").unlink()  # image 1 unfinished
    result = _predict(warm, tmp_path / "pred", tmp_path / "in")
    assert result.exit_code == 0, result.output
    assert "1 images already predicted" in _text(result.output)
    assert label.stat().st_mtime_ns == before
    assert (tmp_path / "pred" / "1_overlay.jpg").is_file()
    assert read_json(tmp_path / "pred" / "manifest.json")["results"]["predicted"] == 1
    # an empty file (what a power loss during predict's non-fsynced writes can leave) is
    # not a finished image
    (tmp_path / "pred" / "0_color.png").write_bytes(b"")
    result = _predict(warm, tmp_path / "pred", tmp_path / "in")
    assert result.exit_code == 0 and "1 images already predicted" in _text(result.output)
    assert Image.open(tmp_path / "pred" / "0_color.png").size == (16, 16)
    result = _predict(warm, tmp_path / "pred", tmp_path / "in", extra=("--flip",))
    assert result.exit_code == 2
    assert "holds predictions made with other settings" in _text(result.output)
    other = random_checkpoint(tmp_path / "other.pt", SegmentorConfig(backbone="test_resnet"))
    result = _predict(other, tmp_path / "pred", tmp_path / "in")
    assert result.exit_code == 2
    assert "holds predictions made with another checkpoint" in _text(result.output)


def test_eval_and_predict_choose_the_same_inference_for_a_checkpoint(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    """With no options, both take the checkpoint's validation settings (one function:
    resolve_inference), and predict's labels are eval's; an option replaces one setting."""
    data = load_checkpoint(warm)
    own = {"window": [24, 24], "stride": [16, 16], "flip": True, "scale": 1.5}
    data["meta"]["config"]["eval"] = {**data["meta"]["config"]["eval"], **own}
    ckpt = tmp_path / "m.pt"
    save_checkpoint(ckpt, data)
    target = f"cityscapes:{tiny_bench / 'target'}"
    ran = runner.invoke(
        app, ["eval", "--checkpoint", str(ckpt), "--data", target, "--out", str(tmp_path / "e"),
              "--device", "cpu", "--save-predictions"],
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    images = tmp_path / "images"
    shutil.copytree(_val_images(tiny_bench), images)
    assert _predict(ckpt, tmp_path / "p", images).exit_code == 0
    chosen = read_json(tmp_path / "e" / "manifest.json")["results"]["inference"]
    assert chosen == read_json(tmp_path / "p" / "manifest.json")["results"]["inference"]
    assert {k: chosen[k] for k in own} == own
    assert chosen == to_dict(resolve_inference(data))
    for path in sorted((tmp_path / "e" / "predictions").rglob("*.png")):
        rel = path.relative_to(tmp_path / "e" / "predictions")
        mine = tmp_path / "p" / rel.parent / f"{rel.stem}_leftImg8bit_label.png"
        np.testing.assert_array_equal(_ids(mine), _ids(path))
    again = runner.invoke(  # the checkpoint's settings spelt out: the same finished run
        app, ["eval", "--checkpoint", str(ckpt), "--data", target, "--out", str(tmp_path / "e"),
              "--device", "cpu", "--save-predictions", "--flip", "--scale", "1.5"],
    )  # fmt: skip
    assert again.exit_code == 0 and "already finished" in _text(again.output), again.output
    # a window without a stride: the default stride of that window, not the checkpoint's
    mine = resolve_inference(data, window=(12, 12), flip=False)
    assert (mine.window, mine.stride, mine.flip, mine.scale) == ((12, 12), None, False, 1.5)
    ran = runner.invoke(
        app, ["eval", "--checkpoint", str(ckpt), "--data", target, "--out", str(tmp_path / "e2"),
              "--device", "cpu", "--window", "12x12", "--set", "eval.flip=false"],
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    assert read_json(tmp_path / "e2" / "manifest.json")["results"]["inference"] == to_dict(mine)


def test_the_eval_section_offers_every_inference_setting():
    """InferenceChoice mirrors InferenceConfig field for field (all optional)."""
    choice = [f.name for f in dataclasses.fields(InferenceChoice)]
    assert choice == [f.name for f in dataclasses.fields(InferenceConfig)]
    assert all(v is None for v in dataclasses.asdict(InferenceChoice()).values())
    assert InferenceChoice.of(InferenceConfig(flip=True)).flip is True


PROGRESS = re.compile(r"^predict (\d+)/5 [\d.]+ images/s elapsed \d+:\d\d:\d\d eta \d+:\d\d:\d\d$")
SUMMARY = re.compile(
    r"^predict finished in [\d.]+ s: (\d+) images predicted in [\d.]+ s \([\d.]+ "
    r"images/s\), (\d+) already done, 0 unreadable -> (.+)$"
)


def test_not_on_a_terminal_prints_progress_lines_and_a_summary(warm: Path, tmp_path: Path):
    """Output to a file or pipe (CliRunner's is not a terminal): one plain line per
    ``log_every`` images and at the end, then the summary line; a rerun counts what was done."""
    for i in range(6):
        write_png(tmp_path / "in" / f"{i}.png", pattern_image(i, (16, 16)))
    (tmp_path / "in" / "5.png").rename(tmp_path / "later.png")
    out = tmp_path / "pred"
    result = _predict(warm, out, tmp_path / "in", extra=("--set", "log_every=2"))
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert [int(m.group(1)) for m in map(PROGRESS.match, lines) if m] == [2, 4, 5]
    summary = [m for m in map(SUMMARY.match, lines) if m]
    assert [(m.group(1), m.group(2), m.group(3)) for m in summary] == [("5", "0", str(out))]
    assert lines[-1] == summary[0].group(0)
    (tmp_path / "later.png").rename(tmp_path / "in" / "5.png")
    result = _predict(warm, out, tmp_path / "in")
    assert result.exit_code == 0, result.output
    assert [m.group(1, 2) for m in map(SUMMARY.match, result.output.splitlines()) if m] == [
        ("1", "5")
    ]


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (["/no/such.png"], "--images /no/such.png: no such file or directory"),
        (["EMPTY"], "EMPTY: no images found (looked for .png, .jpg"),
        ([], "--images is required (image files, directories or glob patterns)"),
        (["A/x.png", "B/x.png"], "would both write x_label.png"),
    ],
)
def test_bad_inputs_are_one_line_errors(
    warm: Path, tmp_path: Path, images: list[str], message: str
):
    (tmp_path / "EMPTY").mkdir()
    for d in "AB":
        write_png(tmp_path / d / "x.png", pattern_image(0, (8, 8)))
    paths = [str(tmp_path / p) if not p.startswith("/") else p for p in images]
    message = message.replace("EMPTY", str(tmp_path / "EMPTY"))
    result = _predict(warm, tmp_path / "pred", *paths)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_alpha_outside_0_1_is_refused(warm: Path, tmp_path: Path):
    write_png(tmp_path / "x.png", pattern_image(0, (8, 8)))
    result = _predict(warm, tmp_path / "pred", tmp_path / "x.png", extra=("--alpha", "1.5"))
    assert result.exit_code == 2
    assert "--alpha must be between 0 and 1, got 1.5" in _text(result.output)


def test_a_checkpoint_that_is_not_one_is_a_user_error(tmp_path: Path):
    (tmp_path / "junk.pt").write_text("junk")
    with pytest.raises(UserError, match="junk.pt: not a readable checkpoint"):
        pixcli.load(tmp_path / "junk.pt", device="cpu")


def test_import_pixcli_and_help_load_no_torch():
    code = (
        "import sys, pixcli, pixcli.cli; "
        "print(sorted(m for m in ('torch', 'timm', 'stages') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"pixcli {pixcli.__version__}"


@pytest.mark.slow
def test_two_processes_predict_the_files_of_one(tiny_bench: Path, warm: Path, tmp_path: Path):
    from test_distributed import _torchrun

    images = _val_images(tiny_bench)
    _torchrun("-m", "pixcli", "predict", "--checkpoint", str(warm), "--images", str(images),
              "--device", "cpu", "--out", str(tmp_path / "two"))  # fmt: skip
    assert _predict(warm, tmp_path / "one", images).exit_code == 0
    labels = sorted(
        p.relative_to(tmp_path / "one") for p in (tmp_path / "one").rglob("*_label.png")
    )
    assert len(labels) == 3
    for rel in labels:
        np.testing.assert_array_equal(_ids(tmp_path / "two" / rel), _ids(tmp_path / "one" / rel))
    assert read_json(tmp_path / "two" / "manifest.json")["results"]["predicted"] == 3


def test_inference_settings_come_from_the_checkpoint_and_can_be_overridden(tmp_path: Path):
    ckpt = random_checkpoint(tmp_path / "m.pt", SegmentorConfig(backbone="test_resnet"))
    data = load_checkpoint(ckpt)
    data["meta"] = {"config": {"eval": {"scale": 2.0, "multi_resolution": True, "gone": 1}}}
    save_checkpoint(ckpt, data)
    model = pixcli.load(ckpt, device="cpu")
    assert model.inference.scale == 2.0 and model.inference.multi_resolution
    assert pixcli.load(ckpt, device="cpu", scale=1.0, flip=True).inference.scale == 1.0
    image = pattern_image(0, (20, 30))
    plain = pixcli.load(ckpt, device="cpu", scale=1.0)
    plain.inference.multi_resolution = False
    assert model.predict(image).shape == (20, 30)
    assert not np.array_equal(model.predict_proba(image), plain.predict_proba(image))
