"""Online hard example mining cross-entropy: UniMatch's labelled loss on Cityscapes (its
``configs/cityscapes.yaml``: ``criterion: OHEM, thresh 0.7, min_kept 200000``, the
``ProbOhemCrossEntropy2d`` of its ``util/ohem.py``, used by its ``supervised.py`` and
``unimatch.py`` alike).

Over the batch's non-ignored pixels, with p the softmax probability of each pixel's label:

- keep the pixels with p <= threshold (the "hard" ones);
- but never fewer than ``min_kept``: if the ``min_kept``-th smallest p exceeds the threshold,
  that p becomes the threshold;
- if there are no more than ``min_kept`` valid pixels, keep them all;
- the loss is the mean cross-entropy over the kept pixels.

Choice: UniMatch's ``min_kept`` is a pixel count, 200,000 of the two 801 x 801 crops one GPU
sees, 15.6% of their pixels; here it is that share of the batch's valid pixels
(``min_kept_share``), so that it scales with the crop and batch size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX


def ohem_cross_entropy(
    logits: Tensor, labels: Tensor, threshold: float = 0.7, min_kept_share: float = 0.156
) -> Tensor:
    """Mean CE over the hard pixels. ``logits`` (B, C, H, W) at the labels' resolution;
    ``labels`` (B, H, W), 255 ignored."""
    ce_all = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="none")
    ce = ce_all[labels != IGNORE_INDEX]
    n_valid = ce.numel()
    min_kept = int(min_kept_share * n_valid)
    if n_valid == 0:
        return ce_all.sum() * 0.0
    if n_valid <= min_kept:
        return ce.mean()
    label_prob = torch.exp(-ce.detach())  # softmax probability of the label
    cut = torch.tensor(threshold, device=ce.device, dtype=label_prob.dtype)
    if min_kept > 0:
        kth = torch.kthvalue(label_prob, min_kept).values
        cut = torch.maximum(cut, kth)
    kept = (label_prob <= cut).float()
    return (ce * kept).sum() / kept.sum().clamp_min(1.0)
