"""Sinkhorn-Knopp in the log domain: the optimal-transport assignment of CPSL (Eq. 5-6, 12).

CPSL (Li et al., "Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic
Segmentation", CVPR 2022) assigns M pixel features to C classes by solving

    max_Q <Q, S> + eps * H(Q)   s.t.  Q 1_M = r,  Q^T 1_C = h            (Eq. 5)

whose solution is Q* = diag(alpha) exp(S / eps) diag(beta) (Eq. 6), with S the self-labeling
head's scores, r the class marginal (delta_pseudo under distribution alignment, Eq. 12, or
1/C for the equipartition of Asano et al.) and h = 1/M the sample marginal.

Layout: pixcli keeps **samples in rows**: ``scores`` is ``M x C`` (what a head returns for M
feature rows) and the plan is ``M x C`` too, i.e. the *transpose* of the paper's ``C x M``
matrix Q. So ``plan.sum(0) == r`` (classes) and ``plan.sum(1) == h`` (samples).

The scalings are kept as logarithms (``log alpha``, ``log beta``) and every normalisation is
a ``logsumexp``: nothing is exponentiated before the end, so epsilon = 0.01 with scores of
1e3 (exponents of 1e5) neither overflows nor divides 0 by 0.

Iterations. Each iteration normalises the classes, then the samples (the order of the
published code), so the sample marginal h is exact after every iteration and the class
marginal r is what convergence is measured on. The published CPSL code runs 3 iterations. On
synthetic clustered cosine scores of the paper's size (65,792 samples = 512 + 65,536 bank
rows, 19 classes, a Cityscapes-like r, epsilon 0.05) 3 iterations left the class marginal off
by 0.01-0.3 in L1 norm, i.e. the distribution alignment of Eq. 12 is only loosely applied.
pixcli's default iterates until the L1 error of the class marginal is at most ``tolerance``
(1e-4), at most ``max_iterations`` (100) times: that took 9-60 iterations on those inputs,
except for very tight clusters (L1 error 1e-3 after 100). ``SinkhornResult`` reports the
iterations run and the error left. Pass ``tolerance=None`` for a fixed number of iterations
(``max_iterations=3`` reproduces the published behaviour exactly; a test checks it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

DEFAULT_MAX_ITERATIONS = 100
DEFAULT_TOLERANCE = 1e-4


class SinkhornResult(NamedTuple):
    """Output of :func:`sinkhorn` (CPSL Eq. 6).

    Attributes:
        plan: ``M x C`` transport plan (the paper's Q transposed); sums to 1, rows sum to h,
            columns to r (up to ``marginal_error``).
        assignments: ``M x C`` per-sample class distributions ``q_m = Q[:, m] / h_m`` (each
            row sums to 1; with h = 1/M this is the paper's ``q_m = M * Q[:, m]``, Eq. 5).
        iterations: iterations run.
        marginal_error: L1 distance between ``plan.sum(0)`` and r at the end.
    """

    plan: Tensor
    assignments: Tensor
    iterations: int
    marginal_error: float


def _log_marginal(
    marginal: Tensor | None, size: int, like: Tensor, name: str, allow_zero: bool
) -> Tensor:
    """Log of a marginal normalised to sum 1; uniform when ``marginal`` is None."""
    if marginal is None:
        marginal = torch.ones(size)
    if marginal.shape != (size,):
        raise ValueError(f"{name} marginal has shape {tuple(marginal.shape)}, expected ({size},)")
    marginal = marginal.to(dtype=like.dtype, device=like.device)
    low = bool((marginal < 0).any()) if allow_zero else bool((marginal <= 0).any())
    if low or not bool(marginal.sum() > 0):
        sign = "non-negative" if allow_zero else "positive"
        raise ValueError(f"{name} marginal must be {sign} with a positive sum")
    return torch.log(marginal / marginal.sum())


def _l1_gap(log_mass: Tensor, log_target: Tensor) -> float:
    return float((torch.exp(log_mass) - torch.exp(log_target)).abs().sum())


@torch.no_grad()
def sinkhorn(
    scores: Tensor,
    epsilon: float,
    class_marginal: Tensor | None = None,
    sample_marginal: Tensor | None = None,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    tolerance: float | None = DEFAULT_TOLERANCE,
) -> SinkhornResult:
    """Entropic optimal transport of M samples onto C classes, in the log domain (CPSL Eq. 5-6).

    Args:
        scores: ``M x C`` scores (CPSL: ``f_SL(Z_aug)``, cosine similarities to the class
            prototypes). Never differentiated: the plan is a fixed target (CPSL Sec. 3.2).
        epsilon: entropic temperature (CPSL: 0.05).
        class_marginal: r, ``C`` non-negative weights (CPSL Eq. 12: ``delta_pseudo``); None =
            equipartition 1/C (the "w/o CB" ablation, Asano et al.). Zero entries get no mass.
        sample_marginal: h, ``M`` positive weights; None = 1/M (CPSL Eq. 12).
        max_iterations: upper bound on iterations (each = class then sample normalisation).
        tolerance: stop once ``|plan.sum(0) - r|_1 <= tolerance``; None runs exactly
            ``max_iterations`` iterations. Both marginals are first normalised to sum 1.

    Returns:
        :class:`SinkhornResult` in float32 (float64 if ``scores`` is float64).
    """
    if scores.ndim != 2 or scores.shape[0] == 0:
        raise ValueError(f"scores must be a non-empty M x C matrix, got {tuple(scores.shape)}")
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores contain NaN or inf")
    if epsilon <= 0 or max_iterations < 1:
        raise ValueError("epsilon must be positive and max_iterations at least 1")
    work = scores if scores.dtype == torch.float64 else scores.float()
    num_samples, num_classes = work.shape
    # Subtracting each row's maximum (absorbed by beta, whose start value gives it back) and
    # shifting alpha to a maximum of 0 (absorbed by the next beta) keep the dominant entries
    # near 0, where float32 is precise even when scores / epsilon is ~1e5.
    scaled = work / epsilon
    row_max = scaled.max(dim=1).values
    log_kernel = scaled - row_max[:, None]
    log_r = _log_marginal(class_marginal, num_classes, work, "class", allow_zero=True)
    log_h = _log_marginal(sample_marginal, num_samples, work, "sample", allow_zero=False)
    log_alpha = torch.zeros_like(log_r)
    log_beta = row_max  # beta = 1 on the original kernel, as in the published code
    iterations = 0
    while iterations < max_iterations:
        log_class_mass = torch.logsumexp(log_kernel + log_beta[:, None], dim=0)
        check = iterations > 0 and tolerance is not None
        if check and _l1_gap(log_class_mass + log_alpha, log_r) <= tolerance:
            break
        log_alpha = log_r - log_class_mass
        log_alpha = log_alpha - log_alpha.max()
        log_beta = log_h - torch.logsumexp(log_kernel + log_alpha[None, :], dim=1)
        iterations += 1
    # The last sample normalisation as a softmax: rows of q sum to 1 to working precision.
    assignments = torch.softmax(log_kernel + log_alpha[None, :], dim=1)
    plan = assignments * torch.exp(log_h)[:, None]
    error = float((plan.sum(0) - torch.exp(log_r)).abs().sum())
    return SinkhornResult(plan, assignments, iterations, error)
