"""The command line as a user runs it: exit codes, one-line errors, outputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pixcli.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, list(args))


def test_help_lists_the_stages():
    result = _run("--help")
    assert result.exit_code == 0
    for name in ("make-benchmark", "warmup", "eval", "show", "demo"):
        assert name in result.output


def test_command_help_rewraps_its_docstring_to_the_terminal(monkeypatch: pytest.MonkeyPatch):
    # The docstring's own line breaks (at ~90 characters) used to be kept, so an 80-column
    # terminal showed each one as a full line and a stub ("DAFormer's" alone on a line).
    monkeypatch.setenv("COLUMNS", "80")
    result = _run("adapt", "--help")
    assert result.exit_code == 0
    text = result.output.split("Options")[0]
    lines = [line.strip() for line in text.splitlines()]
    ragged = [a for a, b in zip(lines, lines[1:], strict=False) if a and b and len(a) < 50]
    assert ragged == []
    assert "pixl DAFormer's (AdamW 6e-5," in " ".join(lines)


def test_python_dash_m_works():
    done = subprocess.run(
        [sys.executable, "-m", "pixcli", "warmup", "--help"], capture_output=True, text=True
    )
    assert done.returncode == 0 and "--source" in done.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["warmup", "--source", "nope:/x", "--device", "cpu"], "KIND one of gta5"),
        (["warmup", "--source", "gta5:/does/not/exist", "--device", "cpu"], "/does/not/exist"),
        (["warmup", "--device", "cpu"], "--source is required"),
        (["warmup", "--source", "gta5:/x", "--set", "optim.lrr=1"], "unknown setting 'optim.lrr'"),
        (["eval", "--checkpoint", "/no/model.pt", "--data", "gta5:/x"], "/x"),
        (["show", "/no/such/file.pt"], "not found"),
    ],
)
def test_user_errors_exit_2_with_one_line(args: list[str], message: str):
    result = _run(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_warmup_eval_show_from_the_command_line(tiny_bench: Path, tmp_path: Path):
    warm = tmp_path / "w"
    result = _run(
        "warmup", "--source", f"gta5:{tiny_bench / 'source'}", "--out", str(warm),
        "--device", "cpu", "--iterations", "2", "--batch-size", "2", "--backbone", "test_resnet",
        "--set", "augment.crop_size=[32, 32]", "--set", "num_workers=0",
        "--set", "model.feature_dim=8",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    result = _run(
        "eval", "--checkpoint", str(warm / "model.pt"), "--data",
        f"cityscapes:{tiny_bench / 'target'}", "--out", str(tmp_path / "e"),
        "--window", "32x32", "--stride", "16x16", "--device", "cpu",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "mIoU" in result.output and (tmp_path / "e" / "metrics.json").is_file()
    for artifact in ("w/model.pt", "w/manifest.json", "e/metrics.json"):
        shown = _run("show", str(tmp_path / artifact))
        assert shown.exit_code == 0, shown.output
    assert "resnet" in _run("show", str(warm / "model.pt")).output


def test_make_benchmark_command(tmp_path: Path):
    out = tmp_path / "b"
    result = _run(
        "make-benchmark", str(out), "--size", "64x32", "--n-source", "2",
        "--n-target-train", "1", "--n-target-val", "1",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(list((out / "source" / "images").glob("*.png"))) == 2
    bad = _run("make-benchmark", str(tmp_path / "c"), "--size", "64by32")
    assert bad.exit_code == 2 and "expected WxH" in bad.output
