"""Whole-image and sliding-window inference.

The sliding window follows mmseg's ``slide_inference``: windows step by ``stride``; the last
window in each direction is shifted back inside the image; the logits of all windows are
summed into the full-size map together with a count matrix, and divided by the count
before any softmax. Images smaller than the window are one window of their own size.

With ``multi_resolution`` (PiXL, A.4.2) each window's logits combine a low-resolution and a
high-resolution prediction (:func:`multi_resolution_logits`); off by default.

:func:`predict_on_grid` gives logits *and* decoder features on a coarse grid (e.g. the
model's output grid) for stages that store per-pixel predictions and class prototypes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pixcli.errors import UserError


@dataclass
class InferenceConfig:
    """How to predict a whole image. ``window=None`` means whole-image inference."""

    window: tuple[int, int] | None = None  # (h, w)
    stride: tuple[int, int] | None = None  # default: 2/3 of the window, as mmseg's configs
    window_batch: int = 8  # windows per forward pass
    flip: bool = False  # average with the horizontally flipped prediction
    # PiXL A.4.2: each window (or the whole image without a window) predicted as the mean of
    # its low-resolution prediction (resized by multi_resolution_scale) and its high-resolution
    # prediction (tiles of that size at full resolution); see multi_resolution_logits.
    multi_resolution: bool = False
    multi_resolution_scale: float = 0.5  # PiXL A.4.2: 1024 windows, 512 inputs
    # The image is resized by this before inference and the logits back to its size (for a
    # model trained on rescaled images, e.g. examples/pixl_benchmark.toml's 2x crops).
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scale <= 0:
            raise UserError(f"eval.scale must be positive, got {self.scale}")
        if not 0.0 < self.multi_resolution_scale <= 1.0:
            raise UserError(
                f"eval.multi_resolution_scale must be in (0, 1], got {self.multi_resolution_scale}"
            )


@dataclass
class GridPrediction:
    """Logits ``B x C x h x w`` and decoder features ``B x D x h x w`` on one grid."""

    logits: torch.Tensor
    features: torch.Tensor


def resize_map(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of ``B x K x h x w`` maps to ``size`` (align_corners=False, as the
    rest of pixcli); antialiased when shrinking; the input itself when already that size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)


def scaled_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """``size`` (h, w) times ``scale``, each side rounded and at least 1."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def upsampled_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The model's logits bilinearly resized to the input's size."""
    logits = model(x).logits
    return F.interpolate(logits.float(), size=x.shape[-2:], mode="bilinear", align_corners=False)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets along one axis; the last window is shifted back inside the image."""
    if size <= window:
        return [0]
    n = (size - window + stride - 1) // stride + 1
    return [min(i * stride, size - window) for i in range(n)]


def slide_logits(
    model: nn.Module,
    x: torch.Tensor,
    window: tuple[int, int],
    stride: tuple[int, int],
    batch: int,
    window_logits: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Sliding-window logits (B, C, H, W), averaged where windows overlap.

    ``window_logits`` maps a batch of windows to their logits at the windows' size (default:
    :func:`upsampled_logits` of ``model``).
    """
    _, _, h, w = x.shape
    wh, ww = min(window[0], h), min(window[1], w)
    boxes = [
        (y, xx) for y in window_starts(h, wh, stride[0]) for xx in window_starts(w, ww, stride[1])
    ]
    total: torch.Tensor | None = None
    count = torch.zeros(1, 1, h, w, device=x.device)
    for img in range(x.shape[0]):
        for start in range(0, len(boxes), batch):
            chunk = boxes[start : start + batch]
            crops = torch.cat([x[img : img + 1, :, y : y + wh, c : c + ww] for y, c in chunk])
            out = window_logits(crops) if window_logits else upsampled_logits(model, crops)
            if total is None:
                total = torch.zeros(x.shape[0], out.shape[1], h, w, device=x.device)
            for (y, c), logit in zip(chunk, out, strict=True):
                total[img, :, y : y + wh, c : c + ww] += logit
                if img == 0:
                    count[..., y : y + wh, c : c + ww] += 1
    assert total is not None
    return total / count


def multi_resolution_logits(
    model: nn.Module, x: torch.Tensor, scale: float, batch: int
) -> torch.Tensor:
    """PiXL's prediction of a window (A.4.2), the counterpart of its training crops: the mean of

    - the low-resolution logits: ``x`` resized by ``scale`` (X^L), logits resized back, and
    - the high-resolution logits: ``x`` at full resolution in tiles of X^L's size (X^H), by
      :func:`slide_logits` with stride = tile (tiles overlap only where the last one is
      shifted back inside).

    Choice: HRDA (and PiXL on it) fuses the two with a learned scale attention; pixcli's
    models have no attention head, so the logits are averaged with equal weights. With
    ``scale = 1`` both are the plain prediction of ``x``.
    """
    h, w = x.shape[-2:]
    size = scaled_size((h, w), scale)
    low = resize_map(upsampled_logits(model, resize_map(x, size)), (h, w))
    high = slide_logits(model, x, size, size, batch)
    return (low + high) / 2


@torch.no_grad()
def predict_logits(model: nn.Module, x: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Logits at input resolution, whole-image or sliding window, optionally flip-averaged;
    with ``cfg.multi_resolution`` every window is :func:`multi_resolution_logits`; with
    ``cfg.scale`` all of it runs on the image resized by that factor."""

    def window_logits(crops: torch.Tensor) -> torch.Tensor:
        if cfg.multi_resolution:
            return multi_resolution_logits(
                model, crops, cfg.multi_resolution_scale, cfg.window_batch
            )
        return upsampled_logits(model, crops)

    def once(inp: torch.Tensor) -> torch.Tensor:
        if cfg.window is None:
            return window_logits(inp)
        stride = cfg.stride or (max(1, cfg.window[0] * 2 // 3), max(1, cfg.window[1] * 2 // 3))
        return slide_logits(model, inp, cfg.window, stride, cfg.window_batch, window_logits)

    size = (int(x.shape[-2]), int(x.shape[-1]))
    if cfg.scale != 1.0:
        x = resize_map(x, scaled_size(size, cfg.scale))
    logits = once(x)
    if cfg.flip:
        logits = (logits + once(x.flip(-1)).flip(-1)) / 2
    return resize_map(logits, size)


@torch.no_grad()
def predict_probs(model: nn.Module, x: torch.Tensor, cfg: InferenceConfig) -> torch.Tensor:
    """Softmax probabilities at input resolution (B, C, H, W)."""
    return predict_logits(model, x, cfg).softmax(dim=1)


@torch.no_grad()
def predict_on_grid(
    model: nn.Module, x: torch.Tensor, cfg: InferenceConfig, grid: tuple[int, int]
) -> GridPrediction:
    """Logits and decoder features of a batch of equal-sized images, resized to ``grid``.

    Features always come from whole-image forward passes (averaged with the flipped pass when
    ``cfg.flip``); with whole-image inference the logits come from the same passes, so they
    are exactly the classifier applied to these features. With a sliding window the logits
    are :func:`predict_logits` at input resolution, resized down to ``grid``, while the
    features still come from one whole-image pass: gathering them window by window would
    mean ``D`` channels at input resolution. ``cfg.multi_resolution`` and ``cfg.scale``
    likewise take the logits from :func:`predict_logits`. Both are resized only when the model's own
    output grid differs from ``grid`` (see :func:`resize_map`).
    """
    out = model(x)
    logits, features = out.logits.float(), out.features.float()
    if cfg.flip:
        flipped = model(x.flip(-1))
        logits = (logits + flipped.logits.float().flip(-1)) / 2
        features = (features + flipped.features.float().flip(-1)) / 2
    if cfg.window is not None or cfg.multi_resolution or cfg.scale != 1.0:
        logits = predict_logits(model, x, cfg)
    return GridPrediction(resize_map(logits, grid), resize_map(features, grid))
