"""Batch-level augmentation on normalised tensors: ClassMix (DACS), CutMix (UniMatch) and the
photometric "strong" views.

Strong augmentation here is photometric only (colour jitter, grayscale, Gaussian blur), so
weak and strong views share one geometry and teacher labels, features and pseudo-label maps
line up with the student's input pixel for pixel. DACS (Tranheden et al., WACV 2021) applies
it after mixing (:func:`strong_view`); UniMatch (Yang et al., CVPR 2023) to each image before
CutMix (:func:`photometric_view`, :func:`cutmix_boxes`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.transforms import IMAGENET_MEAN, IMAGENET_STD, _hue_rotation


def classmix_masks(labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """ClassMix masks (Olsson et al., WACV 2021; DACS): for each labelled image, half of the
    classes present (rounded up, ignore excluded), chosen at random; mask = 1 on their pixels.

    ``labels``: (B, H, W) int64 -> (B, 1, H, W) float32.
    """
    masks = torch.zeros(labels.shape[0], 1, *labels.shape[1:], device=labels.device)
    for i, lab in enumerate(labels):
        classes = lab.unique()
        classes = classes[classes != IGNORE_INDEX]
        if classes.numel() == 0:
            continue
        order = torch.randperm(classes.numel(), generator=generator).to(classes.device)
        chosen = classes[order[: math.ceil(classes.numel() / 2)]]
        masks[i, 0] = torch.isin(lab, chosen).float()
    return masks


def mix(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a`` where ``mask`` is 1, ``b`` elsewhere; ``mask`` (B,1,H,W) broadcasts over channels
    of images and is squeezed for (B,H,W) label or weight maps."""
    if a.dim() == 3:
        mask = mask[:, 0]
    return torch.where(mask.bool(), a, b)


def _stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return mean, std


def _masked_mean_std(
    x: torch.Tensor, valid: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel of ``x`` (B,C,H,W): mean and (population) standard deviation over
    the pixels where ``valid`` (B,H,W) is True (all pixels when None), each (B,C,1,1)."""
    w = torch.ones_like(x[:, :1]) if valid is None else valid[:, None].to(x.dtype)
    n = w.sum((2, 3), keepdim=True).clamp_min(1)
    mean = (x * w).sum((2, 3), keepdim=True) / n
    var = ((x - mean) ** 2 * w).sum((2, 3), keepdim=True) / n
    return mean, var.sqrt()


def match_colour_statistics(
    images: torch.Tensor,
    references: torch.Tensor,
    valid: torch.Tensor | None = None,
    reference_valid: torch.Tensor | None = None,
    eps: float = 1e-3,
) -> torch.Tensor:
    """Colour transfer by channel statistics (Reinhard et al., IEEE CG&A 2001): each of the
    normalised ``images`` (B,3,H,W) gets, per RGB channel, the mean and standard deviation of
    the reference with its index (``references``: (B,3,H',W')), then is clipped to what an
    8-bit image can hold. The statistics are over the ``valid`` (B,H,W) pixels (a crop's
    padding left out). Choice: RGB (of the normalised tensors: the same as RGB up to an
    affine map per channel), not Reinhard's l-alpha-beta space, so no colour-space
    conversion; the per-channel means and spreads are what a dusk or fog gap shifts most."""
    mean_i, std_i = _masked_mean_std(images.float(), valid)
    mean_r, std_r = _masked_mean_std(references.float(), reference_valid)
    out = (images.float() - mean_i) / (std_i + eps) * std_r + mean_r
    mean, std = _stats(images)
    return torch.maximum(torch.minimum(out, (1 - mean) / std), -mean / std).to(images.dtype)


def _luma(img: torch.Tensor) -> torch.Tensor:
    """(B,3,H,W) RGB -> (B,1,H,W) luma, ITU-R 601 weights (PIL's and torchvision's)."""
    return 0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:]


def color_jitter(
    x: torch.Tensor, strength: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per-image brightness, contrast and saturation factors in [1 - s, 1 + s] on the 0..1
    image behind normalised ``x`` (B,3,H,W); returns normalised images."""
    if strength <= 0:
        return x
    mean, std = _stats(x)
    img = x * std + mean
    b = img.shape[0]

    def factor() -> torch.Tensor:
        u = torch.rand(b, 1, 1, 1, generator=generator).to(x.device)
        return 1 + strength * (2 * u - 1)

    img = img * factor()
    grey_mean = img.mean(dim=(1, 2, 3), keepdim=True)
    img = (img - grey_mean) * factor() + grey_mean
    grey = _luma(img).expand_as(img)
    img = (img - grey) * factor() + grey
    return (img.clamp(0, 1) - mean) / std


def gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (B,C,H,W) with standard deviation ``sigma`` pixels."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    c = x.shape[1]
    x = F.conv2d(
        F.pad(x, (radius, radius, 0, 0), mode="replicate"),
        k.view(1, 1, 1, -1).repeat(c, 1, 1, 1),
        groups=c,
    )
    return F.conv2d(
        F.pad(x, (0, 0, radius, radius), mode="replicate"),
        k.view(1, 1, -1, 1).repeat(c, 1, 1, 1),
        groups=c,
    )


def random_blur(
    x: torch.Tensor,
    prob: float,
    sigma_range: tuple[float, float],
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per image, with ``prob``, a Gaussian blur with sigma uniform in ``sigma_range``."""
    low, high = sigma_range
    out = []
    for img in x:
        if float(torch.rand(1, generator=generator)) < prob:
            sigma = low + (high - low) * float(torch.rand(1, generator=generator))
            img = gaussian_blur(img[None], sigma)[0]
        out.append(img)
    return torch.stack(out)


def strong_view(
    x: torch.Tensor,
    jitter: float = 0.2,
    blur_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DACS's strong augmentation: colour jitter, then (per image, with ``blur_prob``) a
    Gaussian blur with sigma in [0.15, 1.15] (DACS's range)."""
    return random_blur(color_jitter(x, jitter, generator), blur_prob, (0.15, 1.15), generator)


def _on_some(
    x: torch.Tensor,
    prob: float,
    fn: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
) -> torch.Tensor:
    """``fn`` applied to the images of ``x`` chosen each with probability ``prob``."""
    chosen = torch.rand(x.shape[0], generator=generator) < prob
    if not bool(chosen.any()):
        return x
    chosen = chosen.to(x.device)
    out = x.clone()
    out[chosen] = fn(x[chosen])
    return out


def hue_shift(
    x: torch.Tensor, max_turns: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image, rotate the hue by a uniform fraction of a turn in [-max_turns, max_turns]
    (torchvision's ``ColorJitter(hue=max_turns)``), as a chroma rotation in YIQ space."""
    if max_turns <= 0:
        return x
    mean, std = _stats(x)
    img = x * std + mean
    turns = (2 * torch.rand(x.shape[0], generator=generator) - 1) * max_turns
    rot = torch.stack([torch.from_numpy(_hue_rotation(2 * math.pi * float(t))) for t in turns])
    img = torch.einsum("bchw,bcd->bdhw", img, rot.to(img))
    return (img.clamp(0, 1) - mean) / std


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (0.299 R + 0.587 G + 0.114 B, torchvision's) in all three channels of the 0..1
    image behind normalised ``x``; returns normalised images."""
    mean, std = _stats(x)
    img = x * std + mean
    return (_luma(img).expand_as(img) - mean) / std


@dataclass
class PhotometricConfig:
    """UniMatch's strong view of one image (its ``dataset/semi.py``): with ``jitter_prob``
    torchvision's ``ColorJitter(0.5, 0.5, 0.5, 0.25)``, ``RandomGrayscale(0.2)``, a Gaussian
    blur with probability 0.5 and sigma in [0.1, 2.0]."""

    jitter: float = 0.5  # brightness, contrast, saturation factors in 1 +- jitter (UniMatch)
    hue: float = 0.25  # hue shift in turns (UniMatch)
    jitter_prob: float = 0.8  # UniMatch
    grayscale_prob: float = 0.2  # UniMatch
    blur_prob: float = 0.5  # UniMatch
    blur_sigma: tuple[float, float] = (0.1, 2.0)  # UniMatch


def photometric_view(
    x: torch.Tensor, cfg: PhotometricConfig, generator: torch.Generator | None = None
) -> torch.Tensor:
    """UniMatch's strong view of normalised ``x`` (B,3,H,W), each image drawn on its own.

    Choice: torchvision's ColorJitter applies its four changes in a random order; here the
    order is fixed (brightness, contrast, saturation, hue).
    """

    def jitter(imgs: torch.Tensor) -> torch.Tensor:
        return hue_shift(color_jitter(imgs, cfg.jitter, generator), cfg.hue, generator)

    x = _on_some(x, cfg.jitter_prob, jitter, generator)
    x = _on_some(x, cfg.grayscale_prob, grayscale, generator)
    return random_blur(x, cfg.blur_prob, cfg.blur_sigma, generator)


def cutmix_boxes(
    batch: int,
    size: tuple[int, int],
    generator: torch.Generator | None = None,
    prob: float = 0.5,
    area: tuple[float, float] = (0.02, 0.4),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> torch.Tensor:
    """CutMix masks as UniMatch draws them (``obtain_cutmix_box``): per image, with ``prob``,
    one box of ``area`` (a uniform share of the image) and aspect ``ratio`` (h/w, uniform)
    at a uniform position; mask = 1 inside. ``size`` = (H, W) -> (B, 1, H, W) float32.

    Choice: UniMatch's crops are square; for H != W the box area is a share of H * W and a
    ratio whose box does not fit is redrawn (UniMatch redraws ratio and position together).
    """
    h, w = size
    masks = torch.zeros(batch, 1, h, w)

    def uniform(low: float, high: float) -> float:
        return low + (high - low) * float(torch.rand(1, generator=generator))

    for i in range(batch):
        if float(torch.rand(1, generator=generator)) >= prob:
            continue
        target = uniform(*area) * h * w
        for _ in range(100):
            r = uniform(*ratio)
            bw, bh = int(math.sqrt(target / r)), int(math.sqrt(target * r))
            if bw <= w and bh <= h:
                break
        bw, bh = min(bw, w), min(bh, h)
        top = int(torch.randint(0, h - bh + 1, (1,), generator=generator))
        left = int(torch.randint(0, w - bw + 1, (1,), generator=generator))
        masks[i, 0, top : top + bh, left : left + bw] = 1.0
    return masks
