"""Use a trained model from Python: ``pixcli.load(path)`` gives a :class:`Predictor`.

    import pixcli
    model = pixcli.load("runs/adapt-cpsl/model.pt")          # device="auto": CUDA if present
    mask = model.predict("street.jpg")                       # (H, W) uint8 class ids
    proba = model.predict_proba(image)                       # (C, H, W) float32, sums to 1
    rgb = model.colorize(mask)                               # (H, W, 3) uint8, model.palette
    model.classes                                            # ("road", "sidewalk", ...)

An image is a path, a PIL image or an ``(H, W[, C])`` uint8/uint16 array (see
:func:`pixcli.data.image_files.to_rgb`). Predictions use eval's inference
(:func:`pixcli.engine.inference.predict_logits`: whole image or sliding window, flip,
scale, PiXL's multi-resolution windows) with the settings the checkpoint was validated with
(its ``eval`` section), each overridable in :func:`load`; on CUDA under mixed precision as
``pixcli eval``. ``pixcli predict`` is built on this class.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pixcli.config import load_config
from pixcli.data.image_files import read_image, to_rgb
from pixcli.data.taxonomy import CITYSCAPES_CLASSES, CITYSCAPES_PALETTE, default_palette
from pixcli.data.transforms import normalize
from pixcli.engine.inference import InferenceConfig, predict_logits
from pixcli.engine.runtime import Runtime, local_runtime, to_device
from pixcli.models import Segmentor
from pixcli.models.checkpoint import segmentor_from_checkpoint

ImageLike = str | Path | np.ndarray | Image.Image


def checkpoint_inference(ckpt: dict) -> InferenceConfig:
    """The inference settings a checkpoint's stage validated with (``meta.config.eval``:
    e.g. PiXL's multi-resolution windows or a scale); the defaults when it has none."""
    stored = ckpt.get("meta", {}).get("config", {}).get("eval")
    if not isinstance(stored, dict):
        return InferenceConfig()
    known = {f.name for f in dataclasses.fields(InferenceConfig)}
    return load_config(InferenceConfig, None, {k: v for k, v in stored.items() if k in known})


@dataclass
class InferenceChoice:
    """The ``[eval]`` section of ``pixcli eval`` and ``pixcli predict``: the
    :class:`InferenceConfig` fields a user chose; ``None`` keeps the checkpoint's own
    (:func:`resolve_inference`). Same names and meanings as :class:`InferenceConfig`."""

    window: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    window_batch: int | None = None
    flip: bool | None = None
    multi_resolution: bool | None = None
    multi_resolution_scale: float | None = None
    scale: float | None = None

    @classmethod
    def of(cls, cfg: InferenceConfig) -> InferenceChoice:
        """Every setting of ``cfg`` chosen (whatever the checkpoint says)."""
        return cls(**dataclasses.asdict(cfg))


def resolve_inference(ckpt: dict, **given: Any) -> InferenceConfig:
    """How ``pixcli eval``, ``pixcli predict`` and :func:`load` predict with checkpoint
    ``ckpt``: its own settings (:func:`checkpoint_inference`), each replaced by the one in
    ``given`` (:class:`InferenceChoice` fields) unless that is ``None``. A window given
    without a stride gets the default stride (2/3 of that window), not the checkpoint's."""
    chosen = {k: v for k, v in given.items() if v is not None}
    if "window" in chosen and "stride" not in chosen:
        chosen["stride"] = None
    return dataclasses.replace(checkpoint_inference(ckpt), **chosen)


def checkpoint_palette(ckpt: dict) -> np.ndarray:
    """``(C, 3) uint8`` class colours: the checkpoint's own, else Cityscapes' for the
    Cityscapes classes, else :func:`default_palette`."""
    classes = list(ckpt["classes"])
    stored = ckpt.get("palette") or []
    if len(stored) == len(classes):
        return np.asarray(stored, dtype=np.uint8).reshape(len(classes), 3)
    if tuple(classes) == CITYSCAPES_CLASSES:
        return np.asarray(CITYSCAPES_PALETTE, dtype=np.uint8)
    return np.asarray(default_palette(len(classes)), dtype=np.uint8)


def class_ids(logits: torch.Tensor) -> np.ndarray:
    """The most likely class of every pixel of ``(..., C, H, W)`` logits, ``(..., H, W)
    uint8`` (the first one on ties, as ``argmax``). ``max(dim).indices`` gives the same ids
    as ``argmax(dim)`` and is several times faster on the CPU over the class dimension."""
    return logits.max(dim=-3).indices.to(torch.uint8).cpu().numpy()


def blend(rgb: np.ndarray, colors: np.ndarray, alpha: float) -> np.ndarray:
    """``(1 - alpha) rgb + alpha colors``, rounded, as ``(H, W, 3) uint8``."""
    blended = (1.0 - alpha) * rgb.astype(np.float32) + alpha * colors.astype(np.float32)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


class Predictor:
    """A segmentation model ready to predict images (make one with :func:`load`).

    Attributes:
        classes: class names; index = the class id in predicted masks.
        palette: ``(C, 3) uint8`` colour per class (:meth:`colorize`).
        inference: how an image is predicted (window, stride, flip, scale, ...).
        runtime: device and mixed precision.
        model: the underlying :class:`~pixcli.models.Segmentor` (eval mode).
    """

    def __init__(
        self,
        model: Segmentor,
        classes: Sequence[str],
        palette: np.ndarray,
        inference: InferenceConfig,
        runtime: Runtime,
    ) -> None:
        self.model = to_device(model, runtime).eval()
        self.classes: tuple[str, ...] = tuple(classes)
        self.palette: np.ndarray = np.asarray(palette, dtype=np.uint8)
        self.inference = inference
        self.runtime = runtime

    @classmethod
    def from_checkpoint(
        cls, path: Path, runtime: Runtime, **inference: Any
    ) -> tuple[Predictor, dict]:
        """The predictor of checkpoint ``path`` and the checkpoint dict. ``inference``:
        :class:`InferenceChoice` fields (see :func:`resolve_inference`)."""
        model, ckpt = segmentor_from_checkpoint(Path(path))
        settings = resolve_inference(ckpt, **inference)
        predictor = cls(model, ckpt["classes"], checkpoint_palette(ckpt), settings, runtime)
        return predictor, ckpt

    @property
    def device(self) -> torch.device:
        return self.runtime.device

    @torch.no_grad()
    def logits(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Logits ``(B, C, H, W)`` float32 on the model's device of equal-sized ``(H, W, 3)
        uint8`` RGB images, at their resolution (one batch: the images must share a size)."""
        x = torch.stack([normalize(image) for image in images]).to(self.device)
        with self.runtime.autocast():
            return predict_logits(self.model, x, self.inference).float()

    def predict(self, image: ImageLike) -> np.ndarray:
        """The class id of every pixel, ``(H, W) uint8``."""
        return class_ids(self.logits([self.as_rgb(image)]))[0]

    def predict_proba(self, image: ImageLike) -> np.ndarray:
        """Class probabilities ``(C, H, W) float32`` (softmax of the logits; sums to 1)."""
        return self.logits([self.as_rgb(image)]).softmax(1)[0].cpu().numpy()

    def colorize(self, mask: np.ndarray) -> np.ndarray:
        """A mask of class ids as ``(H, W, 3) uint8`` colours; ids outside the classes
        (e.g. 255 = ignore) are black."""
        return self.palette_table()[np.asarray(mask, dtype=np.uint8)]

    def palette_table(self) -> np.ndarray:
        """``(256, 3) uint8``: :attr:`palette`, then black for the ids no class has."""
        table = np.zeros((256, 3), dtype=np.uint8)
        table[: len(self.palette)] = self.palette
        return table

    def overlay(self, image: ImageLike, mask: np.ndarray, alpha: float = 0.5) -> np.ndarray:
        """The image blended with the colours of ``mask``: ``(1 - alpha) image + alpha
        colours``, ``(H, W, 3) uint8``."""
        return blend(self.as_rgb(image), self.colorize(mask), alpha)

    @staticmethod
    def as_rgb(image: ImageLike) -> np.ndarray:
        """A path, PIL image or array as ``(H, W, 3) uint8`` RGB (as ``pixcli predict``
        reads files: :func:`pixcli.data.image_files.read_image`)."""
        if isinstance(image, str | Path):
            return read_image(Path(image))
        return to_rgb(image)

    def __repr__(self) -> str:
        cfg = self.model.config
        return (
            f"Predictor({cfg.backbone}+{cfg.head}, {len(self.classes)} classes, "
            f"device={self.device}, inference={self.inference})"
        )


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    *,
    window: tuple[int, int] | None = None,
    stride: tuple[int, int] | None = None,
    flip: bool | None = None,
    scale: float | None = None,
    amp: bool = True,
) -> Predictor:
    """Load a pixcli checkpoint (``model.pt``) for prediction.

    Args:
        path: the checkpoint (loaded with ``weights_only=True``: it cannot run code).
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda`` or a ``torch.device``.
        window, stride: sliding-window inference, ``(h, w)``; flip: average with the
            mirrored image; scale: resize the image by this first. ``None`` keeps the
            checkpoint's own setting (whole image, no flip, scale 1 unless it says otherwise).
        amp: mixed precision on CUDA (bf16 where supported), as ``pixcli eval``.

    Raises:
        pixcli.errors.UserError: the file is missing or not a usable pixcli checkpoint.
    """
    predictor, _ = Predictor.from_checkpoint(
        Path(path), local_runtime(device, amp), window=window, stride=stride, flip=flip,
        scale=scale,
    )  # fmt: skip
    return predictor
