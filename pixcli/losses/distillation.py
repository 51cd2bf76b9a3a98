"""Self-distillation into a fresh student: the losses of ``pixcli distill``.

CPSL (Li et al., CVPR 2022, Sec. 4.2, "CPSL+distill" in Tables 1-2; CPSL gives no equation)
follows ProDA (Zhang et al., CVPR 2021, Sec. 3.4 "distillation to self-supervised model"; that
paper is not in ``../shared/papers/``, so no equation number is quoted here, and the form
below is checked against ProDA's published code, ``step_distillation``): after adaptation has
converged, the adapted model is the teacher of a student that starts from pretrained weights,
for two more rounds. ProDA's student loss is

    l_KD = l_ce(p_S, y_T) + beta KL(p_T || p_S)      (plus the source cross-entropy)

with ``y_T`` the teacher's hard pseudo labels (flip-averaged prediction, pixels below a
confidence of 0.95 ignored) and ``p_T``, ``p_S`` the teacher's and the student's class
probabilities of a target pixel; beta = 1 (the published commands' ``--distillation 1``).

- :func:`confident_labels`: ``y_T`` from the teacher's probabilities.
- :func:`distillation_kl`: ``KL(p_T || p_S) = sum_c p_T,c (log p_T,c - log p_S,c)``, computed
  from the student's *log*-probabilities. The published code passes ``softmax`` output to
  ``F.kl_div``, which expects log-probabilities there, so it minimises
  ``sum_c p_T,c (log p_T,c - p_S,c)`` (a linear reward, not a KL divergence) and averages
  it over classes as well as pixels; its beta = 1 is therefore no guide to the weight of the
  real KL. pixcli sums over classes and averages over pixels (the per-pixel KL) and keeps
  beta = 1 as the default.
- :class:`KDConfig`: the defaults, with their sources.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError


@dataclass
class KDConfig:
    """Settings of the distillation plug-in (``--method distill``, ``[distill]`` section)."""

    weight: float = 1.0  # beta of l_KD; ProDA's published commands: --distillation 1
    threshold: float = 0.95  # ignore y_T where max p_T is below; ProDA: --threshold 0.95

    def __post_init__(self) -> None:
        if self.weight < 0:
            raise UserError(f"distill.weight {self.weight}: must be >= 0")
        if not 0.0 <= self.threshold < 1.0:
            raise UserError(f"distill.threshold {self.threshold}: must be in [0, 1)")


def confident_labels(probs: Tensor, threshold: float, dim: int = 1) -> Tensor:
    """Hard labels ``y_T``: the argmax of ``probs``; ``IGNORE_INDEX`` where the largest
    probability is below ``threshold``, and where a pixel has no probabilities at all (an
    all-zero row: the padding of a crop larger than its image)."""
    confidence, labels = probs.max(dim=dim)
    ignore = (confidence < threshold) | (probs.sum(dim=dim) <= 0)
    return labels.masked_fill(ignore, IGNORE_INDEX)


def distillation_kl(
    student_logits: Tensor, teacher_probs: Tensor, valid: Tensor | None = None, dim: int = 1
) -> Tensor:
    """``KL(p_T || p_S)`` per pixel, summed over classes, averaged over the valid pixels.

    Args:
        student_logits: the student's class scores (``p_S = softmax``), with gradient.
        teacher_probs: ``p_T``, the same shape, rows summing to 1 (or all zero: no teacher
            there; such pixels add 0 but count in the mean unless ``valid`` excludes them).
            Detached: no gradient ever reaches the teacher.
        valid: optional boolean mask of the pixels that count (the shape without ``dim``).
            No valid pixel gives 0.

    Terms with ``p_T,c = 0`` are 0 (``0 log 0 = 0``), so quantised soft labels are fine.
    """
    if student_logits.shape != teacher_probs.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_probs.shape)}"
        )
    log_ps = F.log_softmax(student_logits.float(), dim=dim)
    per_pixel = F.kl_div(log_ps, teacher_probs.detach().float(), reduction="none").sum(dim=dim)
    if valid is None:
        return per_pixel.mean()
    valid = valid.to(per_pixel.device, torch.bool)
    return torch.where(valid, per_pixel, 0.0).sum() / valid.sum().clamp(min=1)
