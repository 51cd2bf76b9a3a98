"""Export a Segmentor for deployment: ONNX (``torch.onnx``, dynamo exporter) or TorchScript.

The exported graph takes one input, ``image``: a float32 ``N x 3 x H x W`` batch of RGB
images scaled to 0..1 and normalised with the ImageNet mean and std
(:data:`pixcli.data.transforms.IMAGENET_MEAN` / ``IMAGENET_STD``, as
:func:`pixcli.data.transforms.normalize`), and returns one output, ``logits``: float32
``N x C x H x W`` class scores at the input's resolution (the model's logits bilinearly
upsampled, align_corners=False; argmax over C gives the class ids). It is the plain forward
pass: no sliding window, flip or scale.

A :class:`~pixcli.models.Segmentor` returns a :class:`~pixcli.models.SegOutput`, which
``torch.jit.trace`` cannot type; :class:`LogitsModel` wraps it into tensor in, tensor out.
With ``dynamic`` the batch and both spatial axes are free (ONNX: symbolic dimensions;
TorchScript: a trace whose shapes follow the input). Every export is checked against
PyTorch on the export size and, with ``dynamic``, on a second size and batch.
"""

from __future__ import annotations

import importlib.util
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from pixcli.artifacts import atomic_write
from pixcli.engine.inference import upsampled_logits
from pixcli.errors import UserError

FORMATS = ("onnx", "torchscript")
# what each format needs beyond pixcli's own dependencies (module names = pip names)
NEEDS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnx", "onnxscript", "onnxruntime"),
    "torchscript": (),
}


class LogitsModel(nn.Module):
    """``model(x).logits`` upsampled to the input size: a tensor-in, tensor-out forward."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: Tensor) -> Tensor:
        return upsampled_logits(self.model, image)


@dataclass
class ExportCheck:
    """The largest absolute difference between exported and PyTorch logits at one shape."""

    shape: tuple[int, int, int, int]
    max_abs_diff: float


def check_requirements(fmt: str) -> None:
    """A UserError naming what to install when ``fmt``'s optional packages are missing."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: expected one of {', '.join(FORMATS)}")
    missing = [name for name in NEEDS[fmt] if importlib.util.find_spec(name) is None]
    if missing:
        raise UserError(
            f"--format {fmt} needs {', '.join(missing)}: "
            f"pip install 'pixcli[export]' (or pip install {' '.join(NEEDS[fmt])})"
        )


def check_shapes(size: tuple[int, int], dynamic: bool) -> list[tuple[int, int, int, int]]:
    """The input shapes an export is checked on: the export size with batch 1 and, when
    ``dynamic``, another size with batch 2."""
    h, w = size
    shapes = [(1, 3, h, w)]
    if dynamic:
        shapes.append((2, 3, h // 2 + 16, w + 32))
    return shapes


def _onnx(wrapper: LogitsModel, example: Tensor, out: Path, dynamic: bool) -> None:
    auto = torch.export.Dim.AUTO
    shapes = {"image": {0: auto, 2: auto, 3: auto}} if dynamic else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, (example,), input_names=["image"], output_names=["logits"],
            dynamic_shapes=shapes, dynamo=True, verbose=False,
        )  # fmt: skip
    assert program is not None
    # one self-contained file: external weights would be named after the temporary file
    atomic_write(out, lambda tmp: program.save(str(tmp), external_data=False))


def _torchscript(wrapper: LogitsModel, example: Tensor, out: Path) -> None:
    with warnings.catch_warnings():  # tracer warnings about shapes: checked below instead
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(wrapper, example, check_trace=False)
    atomic_write(out, lambda tmp: traced.save(str(tmp)))


def run_exported(fmt: str, path: Path, x: Tensor) -> np.ndarray:
    """The logits of the exported file ``path`` for ``x`` (ONNX Runtime / TorchScript, CPU)."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": x.numpy()})[0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, still works
        return torch.jit.load(str(path), map_location="cpu")(x).numpy()


def export_model(
    model: nn.Module, fmt: str, out: Path, size: tuple[int, int], dynamic: bool, seed: int = 0
) -> list[ExportCheck]:
    """Write ``model`` (on the CPU, eval mode) as ``fmt`` to ``out`` and check it against
    PyTorch on :func:`check_shapes` (random normal inputs seeded by ``seed``); return the
    checks. A format whose packages are missing is a UserError naming them."""
    check_requirements(fmt)
    wrapper = LogitsModel(model.cpu().eval()).eval()
    generator = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(shape, generator=generator) for shape in check_shapes(size, dynamic)]
    if fmt == "onnx":
        _onnx(wrapper, inputs[0], out, dynamic)
    else:
        _torchscript(wrapper, inputs[0], out)
    checks = []
    for x in inputs:
        with torch.no_grad():
            ref = wrapper(x).numpy()
        got = run_exported(fmt, out, x)
        if got.shape != ref.shape:
            raise UserError(
                f"{out}: the exported model gives logits {got.shape} for input {tuple(x.shape)}, "
                f"PyTorch {ref.shape}"
            )
        checks.append(ExportCheck(tuple(x.shape), float(np.abs(got - ref).max())))  # type: ignore[arg-type]
    return checks
