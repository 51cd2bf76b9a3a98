"""``pixcli export``: ONNX Runtime and TorchScript logits equal PyTorch's, at two input sizes
with ``--dynamic``, for a DeepLabV2 and a DAFormer-head model; missing packages are named."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import random_checkpoint
from typer.testing import CliRunner

from pixcli.artifacts import read_json
from pixcli.cli import app
from pixcli.engine.inference import upsampled_logits
from pixcli.errors import UserError
from pixcli.export import check_requirements, run_exported
from pixcli.models import SegmentorConfig
from pixcli.models.checkpoint import segmentor_from_checkpoint

runner = CliRunner()
HEADS = ["deeplabv2", "daformer"]


def _export(ckpt: Path, out: Path, fmt: str, *extra: str):
    args = ["export", "--checkpoint", str(ckpt), "--format", fmt, "--out", str(out)]
    return runner.invoke(app, [*args, "--height", "64", "--width", "96", *extra])


def _parity(fmt: str, head: str, tmp_path: Path) -> None:
    ckpt = random_checkpoint(
        tmp_path / "m.pt", SegmentorConfig(backbone="test_resnet", head=head, feature_dim=16)
    )
    out = tmp_path / f"model.{fmt}"
    result = _export(ckpt, out, fmt, "--dynamic")
    assert result.exit_code == 0, result.output
    info = read_json(out.with_name(out.name + ".json"))
    assert [c["shape"] for c in info["results"]["checks"]] == [[1, 3, 64, 96], [2, 3, 48, 128]]
    assert info["classes"][0] == "road" and info["input"]["name"] == "image"
    model, _ = segmentor_from_checkpoint(ckpt)
    generator = torch.Generator().manual_seed(1)
    for shape in [(1, 3, 64, 96), (3, 3, 40, 72)]:  # the export size and another one
        x = torch.randn(shape, generator=generator)
        with torch.no_grad():
            ref = upsampled_logits(model, x).numpy()
        got = run_exported(fmt, out, x)
        assert got.shape == ref.shape == (shape[0], 19, *shape[2:])
        assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("head", HEADS)
def test_torchscript_logits_equal_pytorch_at_two_sizes(head: str, tmp_path: Path):
    _parity("torchscript", head, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("head", HEADS)
def test_onnx_runtime_logits_equal_pytorch_at_two_sizes(head: str, tmp_path: Path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    _parity("onnx", head, tmp_path)


def test_missing_export_packages_are_named(monkeypatch: pytest.MonkeyPatch):
    real = importlib.util.find_spec
    present = {"onnx", "onnxruntime"}  # as if installed, whatever this environment has
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: (
            object() if name in present else None if name == "onnxscript" else real(name)
        ),
    )
    with pytest.raises(UserError) as err:
        check_requirements("onnx")
    assert str(err.value) == (
        "--format onnx needs onnxscript: pip install 'pixcli[export]' "
        "(or pip install onnx onnxscript onnxruntime)"
    )


@pytest.mark.parametrize(
    ("fmt", "extra", "message"),
    [
        ("tflite", (), "--format tflite: expected one of onnx, torchscript"),
        ("torchscript", ("--height", "0"), "--height/--width must be positive, got 0x96"),
    ],
)
def test_bad_export_options_are_one_line_errors(
    tmp_path: Path, fmt: str, extra: tuple[str, ...], message: str
):
    ckpt = random_checkpoint(tmp_path / "m.pt", SegmentorConfig(backbone="test_resnet"))
    result = _export(ckpt, tmp_path / "m.out", fmt, *extra)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
