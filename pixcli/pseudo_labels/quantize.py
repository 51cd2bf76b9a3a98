"""The numbers of a pseudo.h5: soft labels quantised to uint8 and back, and the grid that
maps an image's pixels to cells (grid size, a resized crop of a grid).

Pure tensor/array functions; no HDF5. The quantisation is described in
:mod:`pixcli.pseudo_labels`.
"""

from __future__ import annotations

import math

import numpy as np
import torch

SCALE = 255


def grid_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Grid cells (h, w) of an (H, W) image at ``stride``: ``ceil(H / stride)``, ..."""
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
    """``C x ...`` probabilities -> uint8 ``q`` with ``sum_c q = 255`` at every position.

    Largest-remainder rounding: ``floor(255 p)``, plus one for the classes with the largest
    remainders until the sum is 255 (ties by class index). See :mod:`pixcli.pseudo_labels`. Runs
    on the input's device (a GPU sorts the remainders of a Cityscapes grid in well under a
    millisecond; a CPU takes tens of milliseconds).
    """
    num_classes = probs.shape[0]
    scaled = probs.double().clamp(0, 1) * SCALE
    base = scaled.floor()
    missing = (SCALE - base.sum(0, keepdim=True)).round().clamp(0, num_classes)
    order = (scaled - base).argsort(dim=0, descending=True, stable=True)
    place = torch.arange(num_classes, device=probs.device).view(-1, *[1] * (probs.dim() - 1))
    return base.scatter_add_(0, order, (place < missing).double()).to(torch.uint8)


def quantize_unit(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> uint8 ``round(255 v)``."""
    return (values.double().clamp(0, 1) * SCALE).round().to(torch.uint8)


def dequantize_probs(q: np.ndarray) -> np.ndarray:
    """uint8 ``C x ...`` -> float32 distributions ``q / sum_c q`` (all-zero columns stay 0)."""
    q = q.astype(np.float32)
    return q / np.maximum(q.sum(axis=0, keepdims=True), 1.0)


def crop_resized(
    maps: torch.Tensor,
    size: tuple[int, int],
    top: int,
    left: int,
    crop: tuple[int, int],
    flip: bool = False,
) -> torch.Tensor:
    """``maps`` (``K x h x w``) bilinearly resized to ``size`` = (H, W), then the ``crop`` =
    (ch, cw) window at (``top``, ``left``), mirrored if ``flip``; zero outside (H, W).

    Equals ``F.interpolate(mode="bilinear", align_corners=False)`` followed by slicing, but
    samples only the window (a Cityscapes image's 19 classes at full size are 160 MB).
    """
    big_h, big_w = size
    rows = torch.arange(top, top + crop[0], dtype=torch.float64, device=maps.device)
    cols = torch.arange(left, left + crop[1], dtype=torch.float64, device=maps.device)
    # interpolate's source row (y + 0.5) * h / H - 0.5 is grid_sample's (y + 0.5) * 2 / H - 1
    gy, gx = (rows + 0.5) * 2 / big_h - 1, (cols + 0.5) * 2 / big_w - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).float()
    out = torch.nn.functional.grid_sample(
        maps[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    inside_rows, inside_cols = (rows >= 0) & (rows < big_h), (cols >= 0) & (cols < big_w)
    out = out * (inside_rows[:, None] & inside_cols[None, :]).to(out.dtype)
    return out.flip(-1) if flip else out
