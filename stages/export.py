"""``pixcli export``: a checkpoint as an ONNX or TorchScript file, checked against PyTorch.

Writes ``out`` (the model; input and output as :mod:`pixcli.export` describes) and, beside
it, ``out`` + ``.json``: what a deployment needs to use it (classes, palette, the input
normalisation, the axes) and this stage's manifest fields (checkpoint fingerprint,
versions, the parity checks). Exports run on the CPU.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from pixcli.artifacts import file_fingerprint, versions, write_json
from pixcli.config import to_dict
from pixcli.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from pixcli.engine.progress import console
from pixcli.errors import UserError
from pixcli.export import check_requirements, export_model
from pixcli.models.checkpoint import segmentor_from_checkpoint
from pixcli.predictor import checkpoint_palette
from stages.common import Timer


@dataclass
class ExportConfig:
    format: str = "onnx"  # onnx or torchscript
    height: int = 512  # example input size (the only one without dynamic)
    width: int = 1024
    dynamic: bool = False  # free batch, height and width
    seed: int = 0  # the random check inputs


def sidecar_path(out: Path) -> Path:
    """Where the description of an exported file goes: ``model.onnx`` -> ``model.onnx.json``."""
    return out.with_name(out.name + ".json")


def run(cfg: ExportConfig, checkpoint: Path, out: Path) -> dict:
    """Export ``checkpoint`` to ``out``; return the sidecar's content."""
    check_requirements(cfg.format)
    if cfg.height < 1 or cfg.width < 1:
        raise UserError(f"--height/--width must be positive, got {cfg.height}x{cfg.width}")
    if out.is_dir():
        raise UserError(f"--out {out}: is a directory; give the file to write, e.g. model.onnx")
    timer = Timer()
    model, ckpt = segmentor_from_checkpoint(checkpoint)
    console.print(f"exporting {checkpoint} to {cfg.format} ({cfg.height}x{cfg.width})")
    checks = export_model(model, cfg.format, out, (cfg.height, cfg.width), cfg.dynamic, cfg.seed)
    axes = "N x 3 x H x W" if cfg.dynamic else f"1 x 3 x {cfg.height} x {cfg.width}"
    info = {
        "stage": "export",
        "complete": True,
        "format": cfg.format,
        "file": out.name,
        "input": {
            "name": "image",
            "shape": axes,
            "dtype": "float32",
            "what": "RGB in 0..1, minus mean, divided by std (ImageNet)",
            "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD),
        },
        "output": {
            "name": "logits",
            "shape": axes.replace("3", "C", 1),
            "what": "class scores at the input resolution; argmax over C = class id",
        },
        "classes": list(ckpt["classes"]),
        "palette": checkpoint_palette(ckpt).tolist(),
        "config": to_dict(cfg),
        "inputs": {"checkpoint": file_fingerprint(checkpoint)},
        "versions": versions(),
        "wall_time_s": round(timer.seconds(), 2),
        "results": {"checks": [asdict(c) for c in checks]},
    }
    write_json(sidecar_path(out), info)
    worst = max(c.max_abs_diff for c in checks)
    shapes = ", ".join("x".join(map(str, c.shape)) for c in checks)
    console.print(
        f"wrote {out} and {sidecar_path(out).name}; logits equal PyTorch's to {worst:.1e} "
        f"(max abs) on {shapes}",
        highlight=False,
    )
    return info
