"""The self-training baseline's losses (DAFormer / DACS), shared by every method.

- Pseudo labels are the teacher's argmax on the weak view.
- Confidence weighting (DAFormer Eq. 5; PGPC Eq. 3; PiXL Eq. 11): ONE scalar per image,
  the fraction of its pixels whose maximum probability exceeds delta = 0.968, not a
  per-pixel mask.
- The target loss is the pixel-wise cross-entropy weighted by that map (Eq. 4 of DAFormer),
  averaged over all pixels that are not ignored.
- The semi-supervised step (UniMatch) masks per pixel instead: ``confident_pseudo_labels``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX


def pseudo_labels_and_weights(probs: Tensor, threshold: float = 0.968) -> tuple[Tensor, Tensor]:
    """(B, C, H, W) teacher probabilities -> hard labels (B, H, W) and weight maps (B, H, W)
    holding each image's fraction of pixels with max probability above ``threshold``."""
    confidence, labels = probs.max(dim=1)
    fraction = (confidence > threshold).float().mean(dim=(1, 2), keepdim=True)
    return labels, fraction.expand_as(confidence).clone()


def confident_pseudo_labels(
    probs: Tensor, threshold: float = 0.95, valid: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """FixMatch/UniMatch pseudo labels: (B, C, H, W) teacher probabilities -> hard labels
    (B, H, W), IGNORE_INDEX where ``valid`` is False (padding), and a per-pixel 0/1 weight,
    1 where the maximum probability is >= ``threshold`` (UniMatch's ``conf >= conf_thresh``).

    With :func:`weighted_cross_entropy` this is UniMatch's unlabelled loss: the CE of the
    confident pixels summed over all valid pixels' count.
    """
    confidence, labels = probs.max(dim=1)
    if valid is not None:
        labels = labels.masked_fill(~valid, IGNORE_INDEX)
    return labels, (confidence >= threshold).float()


def weighted_cross_entropy(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """Mean over non-ignored pixels of ``weights * CE(logits, labels)``.

    ``logits`` (B, C, H, W) at the labels' resolution; ``labels`` (B, H, W) with 255 ignored.
    """
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    valid = (labels != IGNORE_INDEX).float()
    return (ce * weights * valid).sum() / valid.sum().clamp_min(1.0)


@torch.no_grad()
def ema_update(teacher: torch.nn.Module, student: torch.nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student (DAFormer/Mean Teacher).
    Buffers (BatchNorm statistics) are copied likewise; integer buffers are copied."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
        if t.dtype.is_floating_point:
            t.mul_(momentum).add_(s, alpha=1 - momentum)
        else:
            t.copy_(s)


def ema_momentum(step: int, momentum: float, ramp: bool) -> float:
    """DAFormer's ramp min(1 - 1/(t + 1), momentum) when ``ramp``, else ``momentum``."""
    return min(1 - 1 / (step + 1), momentum) if ramp else momentum
