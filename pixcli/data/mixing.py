"""Batch-level augmentation on normalised tensors: ClassMix (DACS) and the photometric
"strong" view.

Strong augmentation here is photometric only (colour jitter, Gaussian blur), applied after
mixing as in DACS (Tranheden et al., WACV 2021). Weak and strong views therefore share one
geometry, so teacher labels, features and pseudo-label maps line up with the student's
input pixel for pixel.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.transforms import IMAGENET_MEAN, IMAGENET_STD


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
    grey = (0.299 * img[:, :1] + 0.587 * img[:, 1:2] + 0.114 * img[:, 2:]).expand_as(img)
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


def strong_view(
    x: torch.Tensor,
    jitter: float = 0.2,
    blur_prob: float = 0.5,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DACS's strong augmentation: colour jitter, then (per image, with ``blur_prob``) a
    Gaussian blur with sigma in [0.15, 1.15] (DACS's range)."""
    x = color_jitter(x, jitter, generator)
    out = []
    for img in x:
        if float(torch.rand(1, generator=generator)) < blur_prob:
            sigma = 0.15 + float(torch.rand(1, generator=generator))
            img = gaussian_blur(img[None], sigma)[0]
        out.append(img)
    return torch.stack(out)
