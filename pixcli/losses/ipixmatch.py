"""IPixMatch's inter-pixel relation loss (Wu, Li & Xiao, "IPixMatch: Boost Semi-supervised
Semantic Segmentation with Inter-Pixel Relation").

For one image with teacher logits p and student logits q (C x HW):

- Omega (Eq. 3): the pixels whose teacher maximum softmax probability exceeds tau;
- psi (Eq. 4): per class channel k, a softmax over the pixels of Omega of the logits / t,
  a spatial distribution of where class k is;
- L (Eq. 2) = sum_k phi(psi(p_k), psi(q_k)) / (C log|Omega|), with phi the KL divergence
  (L_KL, the paper's choice, Table I) or 1 - Pearson correlation (L_CR, Eq. 5);
- the total (Eq. 6) is L_o + alpha L, alpha ramped up by exp(-5 (1 - i/i_w)^2) over i_w
  warm-up iterations (Sec. IV-C, after Laine & Aila).

Choices where the paper is silent:

- KL direction: KL(psi(p) || psi(q)), the teacher's distribution as the target, as in the
  channel-wise distillation the paper cites for psi ([20]); no t^2 factor (Eq. 2 has none).
- The log|Omega| normalisation is part of Eq. 2, so it divides L_CR as well as L_KL.
- Per image; the batch's loss is the mean over images with |Omega| >= 2 (log 1 = 0), and
  zero when there is none.
- Pearson correlation of constant vectors is taken as 0 (their norms are clamped at a tiny eps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

DISTANCES = ("kl", "correlation")


@dataclass
class IPixMatchConfig:
    """``[ipixmatch]`` section of ``pixcli adapt``; defaults are the paper's."""

    tau: float = 0.8  # confidence threshold of Omega, Eq. 3 ("0.8 by default")
    temperature: float = 4.0  # t of psi, Eq. 4 ("set to 4 by default")
    distance: str = "kl"  # kl (L_KL) | correlation (L_CR, Eq. 5); KL in all results (Sec. IV-C)
    alpha: float = 1.0  # balancing weight of Eq. 6 (Table I: 1)
    warmup_fraction: float = 0.125  # ramp-up share of training: 30 of UniMatch's 240
    # Cityscapes epochs (Sec. IV-C; 5 of 80 on Pascal VOC = 0.0625); 0 = no ramp-up


def confident_region(teacher_logits: Tensor, tau: float, valid: Tensor | None = None) -> Tensor:
    """Omega (Eq. 3): (B, C, H, W) logits -> (B, H, W) bool, max softmax > ``tau`` (and
    ``valid``, e.g. not padding)."""
    omega = teacher_logits.detach().float().softmax(dim=1).amax(dim=1) > tau
    return omega if valid is None else omega & valid


def kl_distance(log_p: Tensor, log_q: Tensor) -> Tensor:
    """sum_k KL(p_k || q_k) for (C, n) log-distributions over the n pixels of each row."""
    return (log_p.exp() * (log_p - log_q)).sum()


def correlation_distance(p: Tensor, q: Tensor, eps: float = 1e-12) -> Tensor:
    """sum_k (1 - Pearson(p_k, q_k)) (Eq. 5) for (C, n) distributions."""
    pc = p - p.mean(dim=1, keepdim=True)
    qc = q - q.mean(dim=1, keepdim=True)
    rho = (pc * qc).sum(dim=1) / (pc.norm(dim=1) * qc.norm(dim=1)).clamp_min(eps)
    return (1 - rho).sum()


def inter_pixel_distance(
    teacher: Tensor, student: Tensor, temperature: float = 4.0, distance: str = "kl"
) -> Tensor:
    """Eq. 2 for one image: (C, n) teacher and student logits at the n >= 2 pixels of Omega
    -> sum_k phi(psi(p_k), psi(q_k)) / (C log n), psi of Eq. 4."""
    c, n = teacher.shape
    log_p = F.log_softmax(teacher / temperature, dim=1)
    log_q = F.log_softmax(student / temperature, dim=1)
    if distance == "kl":
        total = kl_distance(log_p, log_q)
    elif distance == "correlation":
        total = correlation_distance(log_p.exp(), log_q.exp())
    else:
        raise ValueError(f"unknown distance {distance!r} (one of {', '.join(DISTANCES)})")
    return total / (c * math.log(n))


def inter_pixel_loss(
    teacher_logits: Tensor,
    student_logits: Tensor,
    omega: Tensor,
    temperature: float = 4.0,
    distance: str = "kl",
) -> Tensor:
    """L_KL / L_CR (Eq. 2) of a batch: (B, C, H, W) logits of teacher and student at one
    resolution, ``omega`` (B, H, W) from :func:`confident_region`; the mean over the images
    with |Omega| >= 2 (zero, still a graph node of ``student_logits``, when none has).
    The teacher gets no gradient."""
    teacher = teacher_logits.detach().float()
    student = student_logits.float()
    per_image = [
        inter_pixel_distance(p[:, m], q[:, m], temperature, distance)
        for p, q, m in zip(teacher, student, omega, strict=True)
        if int(m.sum()) >= 2
    ]
    if not per_image:
        return student.sum() * 0.0
    return torch.stack(per_image).mean()


def ramp_up(step: int, warmup_steps: int) -> float:
    """exp(-5 (1 - step / warmup_steps)^2) during the warm-up, 1 after (Sec. IV-C)."""
    if warmup_steps <= 0 or step >= warmup_steps:
        return 1.0
    return math.exp(-5.0 * (1.0 - step / warmup_steps) ** 2)
