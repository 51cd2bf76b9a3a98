"""Image/label transforms for training and evaluation.

Images are ``(H, W, 3) uint8`` RGB numpy arrays, labels ``(H, W) uint8`` train ids or
``None`` (unlabelled data). Labels are always resampled nearest-neighbour (no new ids
appear), images bilinearly. Resizing and blurring use Pillow (fast C code); the rest is
numpy. Every random choice comes from the ``np.random.Generator`` passed in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageFilter

from pixcli.data.taxonomy import IGNORE_INDEX

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)

Pair = tuple[np.ndarray, np.ndarray | None]


def _mean_std() -> tuple[torch.Tensor, torch.Tensor]:
    """ImageNet mean and std as (3, 1, 1) tensors on the 0..1 scale."""
    return torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)


def normalize(image: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32, ImageNet mean/std normalised."""
    mean, std = _mean_std()
    x = torch.from_numpy(np.require(image, requirements="CW")).permute(2, 0, 1).float()
    return x.div_(255.0).sub_(mean).div_(std)


def denormalize(tensor: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize`: (..., 3, H, W) float -> (..., H, W, 3) uint8."""
    mean, std = _mean_std()
    x = (
        (tensor.detach().float().cpu() * std + mean)
        .mul(255.0)
        .round()
        .clamp(0, 255)
        .to(torch.uint8)
    )
    return x.movedim(-3, -1).numpy()


def _resize_array(array: np.ndarray, size: tuple[int, int], resample: int) -> np.ndarray:
    h, w = size
    if array.shape[:2] == (h, w):
        return array
    return np.asarray(Image.fromarray(array).resize((w, h), resample=resample))


def resize(image: np.ndarray, label: np.ndarray | None, size: tuple[int, int]) -> Pair:
    """Resize to ``size`` = (h, w): image bilinear, label nearest-neighbour."""
    out_label = None if label is None else _resize_array(label, size, Image.Resampling.NEAREST)
    return _resize_array(image, size, Image.Resampling.BILINEAR), out_label


def _pad_to(array: np.ndarray, size: tuple[int, int], value: int) -> np.ndarray:
    """Pad bottom/right with ``value`` so the array is at least ``size`` = (h, w)."""
    ph, pw = max(size[0] - array.shape[0], 0), max(size[1] - array.shape[1], 0)
    if not (ph or pw):
        return array
    pad = ((0, ph), (0, pw)) + ((0, 0),) * (array.ndim - 2)
    return np.pad(array, pad, constant_values=value)


def random_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    crop: tuple[int, int],
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> Pair:
    """A random ``crop`` = (h, w) window; smaller inputs are padded (image 0, label ignore)."""
    image, label, _ = _random_crop_at(image, label, crop, rng, ignore_index)
    return image, label


def _random_crop_at(
    image: np.ndarray,
    label: np.ndarray | None,
    crop: tuple[int, int],
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int]]:
    """:func:`random_crop`, also returning the window's (top, left)."""
    image = _pad_to(image, crop, 0)
    top = int(rng.integers(0, image.shape[0] - crop[0] + 1))
    left = int(rng.integers(0, image.shape[1] - crop[1] + 1))
    window = (slice(top, top + crop[0]), slice(left, left + crop[1]))
    if label is not None:
        label = _pad_to(label, crop, ignore_index)[window]
    return image[window], label, (top, left)


def random_scale(
    image: np.ndarray,
    label: np.ndarray | None,
    scale_range: tuple[float, float],
    rng: np.random.Generator,
) -> Pair:
    """Rescale by a factor drawn uniformly from ``scale_range`` (sides rounded, >= 1)."""
    scale = float(rng.uniform(*scale_range))
    size = (max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale)))
    return resize(image, label, size)


def random_scale_crop(
    image: np.ndarray,
    label: np.ndarray | None,
    crop: tuple[int, int],
    scale_range: tuple[float, float],
    rng: np.random.Generator,
    ignore_index: int = IGNORE_INDEX,
) -> Pair:
    """:func:`random_scale`, then :func:`random_crop`."""
    image, label = random_scale(image, label, scale_range, rng)
    return random_crop(image, label, crop, rng, ignore_index)


def hflip(image: np.ndarray, label: np.ndarray | None) -> Pair:
    """Mirror image and label left-right."""
    return image[:, ::-1].copy(), None if label is None else label[:, ::-1].copy()


def _gray(x: np.ndarray) -> np.ndarray:
    """Luma of a float (H, W, 3) image as (H, W, 1)."""
    return (x @ np.array([0.299, 0.587, 0.114], dtype=np.float32))[:, :, None]


def _hue_rotation(angle: float) -> np.ndarray:
    """An RGB -> RGB matrix rotating chroma by ``angle`` radians in YIQ space."""
    yiq = np.array(
        [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]],
        dtype=np.float64,
    )
    c, s = np.cos(angle), np.sin(angle)
    rot = np.array([[1, 0, 0], [0, c, -s], [0, s, c]], dtype=np.float64)
    return (np.linalg.inv(yiq) @ rot @ yiq).T.astype(np.float32)


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Random brightness, contrast, saturation (factors in 1 +- strength) and hue.

    Hue is rotated by up to ``strength * 0.25`` turns (0.5 * pi at strength 1).
    """
    if strength <= 0:
        return image
    brightness, contrast, saturation = rng.uniform(1 - strength, 1 + strength, 3)
    angle = float(rng.uniform(-strength, strength)) * 0.5 * np.pi
    x = image.astype(np.float32) * max(brightness, 0.0)
    mean = x.mean()
    x = (x - mean) * max(contrast, 0.0) + mean
    gray = _gray(x)
    x = (x - gray) * max(saturation, 0.0) + gray
    x = x @ _hue_rotation(angle)
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def gaussian_blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with standard deviation ``sigma`` pixels (no-op for sigma <= 0)."""
    if sigma <= 0:
        return image
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius=sigma)))


@dataclass
class AugmentConfig:
    """Training augmentation, applied in field order by :func:`augment`.

    ``crop_size`` and ``base_size`` are (h, w); ``base_size`` resizes first (None keeps the
    size); ``crop_size`` None keeps the whole rescaled image. ``color_jitter`` is the jitter
    strength (0 = off); ``blur_prob`` the probability of a Gaussian blur with sigma drawn
    from [0.1, 2.0] (DACS's strong augmentation).
    """

    crop_size: tuple[int, int] | None = (512, 512)
    base_size: tuple[int, int] | None = None
    scale_range: tuple[float, float] = (0.5, 2.0)
    flip: bool = True
    color_jitter: float = 0.0
    blur_prob: float = 0.0


@dataclass(frozen=True)
class CropGeometry:
    """Where a training crop came from: the image was resized to ``resized`` (h, w), a
    ``crop`` window taken at (``top``, ``left``) (padded where it leaves the image), then
    mirrored if ``flip``. Enough to cut the same window out of any per-image map (e.g. the
    soft labels of ``pseudo.h5``: ``PseudoLabelFile.soft_crop``)."""

    resized: tuple[int, int]
    top: int
    left: int
    crop: tuple[int, int]
    flip: bool


def augment(
    image: np.ndarray, label: np.ndarray | None, cfg: AugmentConfig, rng: np.random.Generator
) -> Pair:
    """Resize to base size, random scale + crop, flip, colour jitter, blur."""
    image, label, _ = augment_with_geometry(image, label, cfg, rng)
    return image, label


def augment_with_geometry(
    image: np.ndarray, label: np.ndarray | None, cfg: AugmentConfig, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None, CropGeometry]:
    """:func:`augment`, also returning the :class:`CropGeometry` of the crop."""
    if cfg.base_size is not None:
        image, label = resize(image, label, cfg.base_size)
    image, label = random_scale(image, label, cfg.scale_range, rng)
    resized = (image.shape[0], image.shape[1])
    top, left, crop = 0, 0, resized
    if cfg.crop_size is not None:
        image, label, (top, left) = _random_crop_at(image, label, cfg.crop_size, rng)
        crop = cfg.crop_size
    flip = bool(cfg.flip and rng.random() < 0.5)
    if flip:
        image, label = hflip(image, label)
    image = color_jitter(image, cfg.color_jitter, rng)
    if cfg.blur_prob > 0 and rng.random() < cfg.blur_prob:
        image = gaussian_blur(image, float(rng.uniform(0.1, 2.0)))
    return image, label, CropGeometry(resized, top, left, tuple(crop), flip)  # type: ignore[arg-type]
