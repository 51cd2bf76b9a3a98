"""CPSL: class-balanced pixel-level self-labeling, as pure tensor functions and modules.

Li et al., "Class-Balanced Pixel-Level Self-Labeling for Domain Adaptive Semantic
Segmentation", CVPR 2022 (``../shared/papers/cpsl-class-balanced-pixel-self-labeling.md``).
What the method adds to the self-training loop, equation by equation:

- rectified pseudo labels ``argmax(P_SL * P_ST)`` (Eq. 1): :func:`rectify_pseudo_labels`;
- the self-labeling head f_SL, a cosine classifier initialised with the class prototypes
  (Eq. 4, 7): :class:`SelfLabelingHead`, :func:`prototype_scores`;
- P_SL for every pixel of a target image: :func:`soft_cluster_assignment`;
- class-balanced pixel sampling (Eq. 8-9): :func:`class_balanced_sample`, and plain random
  sampling for the "w/o CB" ablation: :func:`random_sample`;
- distribution alignment (Eq. 10-12): :func:`class_distribution`,
  :func:`update_class_distribution`;
- the self-labeling loss over ``[current samples; memory bank]`` (Eq. 4-6, 12):
  :func:`self_labeling_loss` (Sinkhorn in :mod:`pixcli.losses.sinkhorn`, the bank in
  :mod:`pixcli.losses.memory_bank`);
- the weak/strong consistency L_REG (Eq. 13): :func:`symmetric_kl_consistency`;
- the paper's defaults and the Table 3 ablation switches: :class:`CPSLConfig`.

Which network computes what (Fig. 1, Algorithm 1): the features z fed to L_SL and to P_SL
come from the momentum segmentation network f'_SEG (no gradient); L_SL trains only f_SL;
P_SL uses the momentum head f'_SL; P_w in L_REG comes from f'_SEG on the weak view. The EMA
copies themselves belong to the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError
from pixcli.losses.sinkhorn import (
    DEFAULT_MAX_ITERATIONS,
    DEFAULT_TOLERANCE,
    SinkhornResult,
    sinkhorn,
)


@dataclass
class CPSLConfig:
    """CPSL hyper-parameters with the paper's defaults, and the Table 3 ablation switches.

    Sources: "Sec. 4.1" = Implementation Details; Tables 4, 6-8 are the sensitivity studies.
    Switches are True for the full method; each False is one row of Table 3.
    """

    lambda_sl: float = 0.1  # lambda_1 of Eq. 14, Sec. 4.1 (Table 6)
    # lambda_2 of Eq. 14, Sec. 4.1 (Table 7: 1-30 all work) -- at the paper's lr of 1e-4. Per
    # unit weight, L_REG's gradient is larger than the cross-entropy's (about 1.7x in norm on the
    # demo model at the start of adaptation, 8.4x at weight 5); with a larger lr scale lambda_2
    # down so that lr * lambda_2 stays near the paper's 5e-4: on the built-in benchmark, lr 5e-3
    # with lambda_2 = 5 took the source CE from 0.14 to 2.1 in 20 steps (target-val mIoU 39.6 ->
    # 5.7), lr 1e-3 to 29.8; at lr 5e-3, lambda_2 = 0.1 gave 47.0, 0.5 gave 45.6 and no L_REG
    # 46.2 (plain self-training 46.3): the demo uses lr 5e-3 and lambda_2 = 0.1.
    lambda_reg: float = 5.0
    tau: float = 0.08  # temperature of Eq. 4 and of P_SL, Sec. 4.1 (Table 8)
    epsilon: float = 0.05  # Sinkhorn temperature of Eq. 6, Sec. 4.1
    memory_length: int = 65_536  # memory bank rows, Sec. 3.2 and 4.1
    samples_per_image: int = 512  # M of Eq. 9, Sec. 4.1 (Table 4)
    momentum: float = 0.999  # EMA of f'_SEG and f'_SL, Sec. 4.1
    lr: float = 1e-4  # segmentation network, SGD, Sec. 4.1
    head_lr: float = 5e-4  # self-labeling head f_SL, Sec. 4.1
    # alpha of Eq. 11. Not given in the paper; the published code never updates delta_pseudo
    # (alpha = 1). pixcli: 0.999 per iteration, the momentum of the other moving averages
    # (about the last 1,000 iterations count).
    distribution_momentum: float = 0.999
    # Sinkhorn iterations (pixcli's choice; the published code runs 3, see
    # pixcli.losses.sinkhorn): stop at an L1 class-marginal error <= tolerance, at most
    # max_iterations; tolerance 0 always runs max_iterations.
    sinkhorn_max_iterations: int = DEFAULT_MAX_ITERATIONS
    sinkhorn_tolerance: float = DEFAULT_TOLERANCE
    # Where P_ST of Eq. 1 comes from. "file" (the paper, Sec. 3.1): the offline soft labels
    # of pseudo.h5, made once by the warm-up model, with weight 1 per pixel (Eq. 2).
    # "teacher" (a pixcli option): the EMA teacher's softmax on the weak view, every step,
    # with the loop's confidence weights (as `--method none`); pseudo.h5 still gives the
    # prototypes of Eq. 7 and delta_pseudo's start. Choice made for small budgets where the
    # online teacher soon outgrows the warm-up: see examples/demo_adapt.toml.
    pseudo_labels: str = "file"
    # Table 3 ablations.
    self_labeling: bool = True  # False = "w/o SL": no f_SL, no L_SL, targets argmax P_ST
    self_training: bool = True  # False = "w/o ST": targets argmax P_SL (P_ST unused)
    class_balance: bool = True  # False = "w/o CB": random sampling, equipartition r = 1/C
    prototype_init: bool = True  # False = "w/o Init": f_SL initialised at random
    strong_augmentation: bool = True  # False = "w/o Aug": no strong view, no L_REG
    momentum_networks: bool = True  # False = "w/o Mom": f_SEG, f_SL stand in for f'_SEG, f'_SL

    def __post_init__(self) -> None:
        positive = ("tau", "epsilon", "memory_length", "samples_per_image", "lr", "head_lr")
        for name in positive:
            if getattr(self, name) <= 0:
                raise UserError(f"cpsl.{name} must be positive, got {getattr(self, name)}")
        for name in ("momentum", "distribution_momentum"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise UserError(f"cpsl.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.pseudo_labels not in ("file", "teacher"):
            raise UserError(
                f"cpsl.pseudo_labels {self.pseudo_labels!r}: expected 'file' or 'teacher'"
            )
        if self.sinkhorn_max_iterations < 1 or self.sinkhorn_tolerance < 0:
            raise UserError("cpsl.sinkhorn_max_iterations must be >= 1 and the tolerance >= 0")


# ---------------------------------------------------------------------------- sampling


def _valid_pixels(labels: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """Flat indices and labels (long) of the pixels of ``labels`` that are not ignored."""
    flat = labels.reshape(-1).long()
    index = torch.nonzero(flat != ignore_index).squeeze(1)
    return index, flat[index]


def _permutation(n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """A random permutation of ``range(n)`` drawn from ``generator``, moved to ``device``."""
    where = generator.device if generator is not None else torch.device("cpu")
    return torch.randperm(n, generator=generator, device=where).to(device)


def random_sample(
    labels: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Uniform pixel sampling without replacement (CPSL Algorithm 1 line 9; "w/o CB").

    Args:
        labels: one image's hard labels (any shape, e.g. ``H x W``); ``ignore_index`` pixels
            are never drawn.
        num_samples: M.
        generator: source of randomness (same generator state, same pixels).

    Returns:
        Flat indices into ``labels.reshape(-1)`` (long) and their labels: ``min(M, #valid)``
        of them, so fewer than M (possibly none) when the image has fewer valid pixels.
    """
    index, label = _valid_pixels(labels, ignore_index)
    pick = _permutation(index.numel(), generator, index.device)[:num_samples]
    return index[pick], label[pick]


def class_balanced_sample(
    labels: Tensor,
    num_samples: int,
    generator: torch.Generator | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor]:
    """Class-balanced pixel sampling of one image (CPSL Eq. 8-9).

    Every class is sampled with the same proportion: class c gets
    ``M_c = floor(M * delta_n^(c))`` pixels drawn uniformly without replacement from its
    pixels (Eq. 9), with ``delta_n`` the class distribution of ``labels`` over the pixels that
    are not ignored (Eq. 8; the paper divides by H x W, i.e. assumes no ignored pixel). The
    floor is computed in integers, ``M * count_c // #valid``. The ``M - sum_c M_c`` pixels the
    floors leave over (fewer than the number of classes present; classes absent from the
    image get ``M_c = 0`` anyway) are drawn uniformly without replacement from the valid
    pixels not picked yet, whatever their class ("randomly sample the rest pixels from other
    categories", Sec. 3.3). Ignored pixels are never drawn: with fewer valid pixels than M,
    all valid pixels are returned (none when the image has no valid pixel).

    Args:
        labels: one image's (rectified) hard labels (any shape, e.g. ``H x W``).
        num_samples: M (CPSL: 512).
        generator: source of randomness.
        ignore_index: label of pixels that are never sampled.

    Returns:
        Flat indices into ``labels.reshape(-1)`` (long) and their labels: first the Eq. 9
        picks grouped by class, then the fill.
    """
    index, label = _valid_pixels(labels, ignore_index)
    total = index.numel()
    if total <= num_samples:
        pick = _permutation(total, generator, index.device)
        return index[pick], label[pick]
    counts = torch.bincount(label)
    quotas = counts * num_samples // total  # Eq. 9 in exact integer arithmetic
    shuffled = _permutation(total, generator, index.device)
    grouped = shuffled[torch.argsort(label[shuffled], stable=True)]  # by class, random within
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(total, device=index.device) - starts[label[grouped]]
    chosen = rank < quotas[label[grouped]]
    rest = grouped[~chosen]
    fill = rest[_permutation(rest.numel(), generator, index.device)]
    pick = torch.cat([grouped[chosen], fill[: num_samples - int(chosen.sum())]])
    return index[pick], label[pick]


# ---------------------------------------------------------------- distribution alignment


def class_distribution(
    labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Class distribution of hard labels, delta_n (CPSL Eq. 8; Eq. 10 over many images).

    Normalised by the pixels that are not ``ignore_index`` (the paper's H x W assumes none
    is ignored), so the result sums to 1 and can serve as the Sinkhorn marginal r (Eq. 12).
    All pixels given count together: pass one image for the paper's delta_n, a batch for the
    batch's pooled distribution. Returns float32 zeros when no pixel is valid.
    """
    counts = _class_counts(labels, num_classes, ignore_index)
    return counts / counts.sum().clamp(min=1)


def _class_counts(labels: Tensor, num_classes: int, ignore_index: int) -> Tensor:
    _, label = _valid_pixels(labels, ignore_index)
    if label.numel() and int(label.max()) >= num_classes:
        raise ValueError(f"label {int(label.max())} outside {num_classes} classes")
    return torch.bincount(label, minlength=num_classes).float()


def pooled_class_distribution(
    labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """:func:`class_distribution` of the labels of every torchrun rank together: the pixel
    counts are summed across ranks (``all_reduce``), so every rank gets the same delta_n and
    delta_pseudo (Eq. 11) stays identical on all of them. One process: ``class_distribution``.
    """
    counts = _class_counts(labels, num_classes, ignore_index)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(counts)
    return counts / counts.sum().clamp(min=1)


def update_class_distribution(delta_pseudo: Tensor, delta_n: Tensor, alpha: float) -> Tensor:
    """Moving average of the pseudo-label class distribution (CPSL Eq. 11).

    ``alpha * delta_pseudo + (1 - alpha) * delta_n``; CPSL updates once per training
    iteration, pixcli's loop with the iteration's ``delta_n`` (one image in Algorithm 1, the
    pooled batch otherwise). ``delta_n`` of zeros (no valid pixel) leaves ``delta_pseudo``
    unchanged instead of shrinking its mass. Returns a new tensor.
    """
    if delta_n.shape != delta_pseudo.shape:
        raise ValueError(f"delta_n {tuple(delta_n.shape)} vs {tuple(delta_pseudo.shape)}")
    if not bool(delta_n.sum() > 0):
        return delta_pseudo.clone()
    return alpha * delta_pseudo + (1.0 - alpha) * delta_n.to(delta_pseudo)


# ------------------------------------------------------------------- self-labeling head


def prototype_scores(features: Tensor, weight: Tensor, dim: int = -1) -> Tensor:
    """Cosine similarities of features to class prototypes: f_SL(z) (CPSL Eq. 4, 6).

    Both the features (along ``dim``) and the ``C x D`` prototypes are L2-normalised, so the
    scores lie in [-1, 1]. ``dim`` is the feature axis: -1 for ``N x D`` rows, 1 for
    ``B x D x H x W`` maps (the scores then are ``B x C x H x W``). Used by f_SL and its
    momentum copy f'_SL alike.
    """
    z = F.normalize(features, dim=dim).movedim(dim, -1)
    w = F.normalize(weight, dim=1).to(z.dtype)
    return (z @ w.T).movedim(-1, dim)


class SelfLabelingHead(nn.Module):
    """The self-labeling head f_SL of CPSL: a bias-free 1x1 cosine classifier (Eq. 4, 7).

    Its ``C x D`` weight holds one prototype per class. The weight is normalised inside
    every forward pass (a reparametrisation; the published code does so for the current
    samples but not for the queue), so the scores are always cosine similarities whatever
    the optimizer does to the raw parameter's norm. The stored parameter is not renormalised
    in place (weight decay then only shrinks its norm, raising the effective step a little).

    Args:
        num_classes: C.
        dim: feature dimension D.
        generator: randomness of the initial weight.
    """

    def __init__(self, num_classes: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_classes, dim))
        self.reset_parameters(generator)

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Random unit prototypes, uniform on the sphere (the "w/o Init" ablation, Table 3)."""
        noise = torch.randn(self.weight.shape, generator=generator)
        self.weight.copy_(F.normalize(noise, dim=1))

    @torch.no_grad()
    def init_from_prototypes(
        self, prototypes: Tensor, generator: torch.Generator | None = None
    ) -> None:
        """Weight Initialization (CPSL Sec. 3.2, Eq. 7): f_SL's weight = the L2-normalised
        ``C x D`` class prototypes (e.g. from ``pseudo.h5``).

        A class without prototype (an all-zero row: no pixel had that pseudo label) keeps a
        random unit vector, since a zero row has no direction.
        """
        if prototypes.shape != self.weight.shape:
            raise ValueError(f"prototypes {tuple(prototypes.shape)} vs {tuple(self.weight.shape)}")
        self.reset_parameters(generator)
        present = prototypes.norm(dim=1) > 0
        unit = F.normalize(prototypes.double(), dim=1).to(self.weight)
        self.weight[present] = unit[present]

    def forward(self, features: Tensor, dim: int = -1) -> Tensor:
        """Scores f_SL(z): see :func:`prototype_scores` (``dim`` = feature axis)."""
        return prototype_scores(features, self.weight, dim)


@torch.no_grad()
def soft_cluster_assignment(head: nn.Module, features: Tensor, tau: float, dim: int = 1) -> Tensor:
    """P_SL: ``softmax(f'_SL(z) / tau)`` over classes, for every pixel (CPSL Eq. 1, 4).

    Following Algorithm 1 (line 17) and Fig. 1, pass the momentum head f'_SL and the
    momentum network's features of the weak view (the view P_ST is aligned with); without
    momentum networks ("w/o Mom") pass f_SL and the student's features. No gradient.

    Args:
        head: f'_SL (a :class:`SelfLabelingHead` or anything with ``head(features, dim)``).
        features: ``B x D x H x W`` (``dim=1``) or ``N x D`` (``dim=-1``) pixel features.
        tau: temperature (CPSL: 0.08).

    Returns:
        float32 probabilities, the feature axis replaced by C classes.
    """
    return torch.softmax(head(features, dim=dim).float() / tau, dim=dim)


# ------------------------------------------------------------------ self-labeling loss


def self_labeling_cross_entropy(scores: Tensor, assignments: Tensor, tau: float) -> Tensor:
    """``-(1/M) sum_m sum_c q_m^(c) log p_m^(c)`` with ``p_m = softmax(scores_m / tau)``
    (CPSL Eq. 4-5). ``scores`` and ``assignments`` are ``M x C``; q is a fixed target.
    """
    log_p = F.log_softmax(scores.float() / tau, dim=1)
    return -(assignments.detach() * log_p).sum(dim=1).mean()


def self_labeling_loss(
    head: nn.Module,
    features: Tensor,
    bank_features: Tensor,
    class_marginal: Tensor | None,
    tau: float = 0.08,
    epsilon: float = 0.05,
    max_iterations: int = DEFAULT_MAX_ITERATIONS,
    tolerance: float | None = DEFAULT_TOLERANCE,
) -> tuple[Tensor, SinkhornResult | None]:
    """L_SL of CPSL (Eq. 4-6, 12) over the augmented set ``Z_aug = [Z_hat; M]``.

    Sinkhorn (epsilon, ``r = class_marginal``, ``h = 1/M_total``) runs on the head's scores
    of the current samples and of the memory bank together (Q_aug); only the current rows'
    assignments (Q_cur) enter the cross-entropy, averaged over the current samples.

    Gradient: only f_SL's weight, through the current samples' scores. The features are
    detached (they come from f'_SEG and L_SL trains the head only, Sec. 3.2), the bank's
    scores and the assignments are computed without gradient. Push the current features
    into the bank *after* this call (the published order), so they are not counted twice.
    Algorithm 1 treats one target image per step and the published code runs one Sinkhorn
    per image of the batch against the bank: pass one image's samples for that, or the whole
    batch's samples for a single Sinkhorn (then h = 1 / (B M + K)).

    Args:
        head: f_SL.
        features: ``M x D`` current samples (L2-normalised by the head anyway).
        bank_features: ``K x D`` memory bank rows (``K`` may be 0).
        class_marginal: r = delta_pseudo (Eq. 12); None = equipartition ("w/o CB").
        tau, epsilon: temperatures of Eq. 4 and Eq. 6.
        max_iterations, tolerance: see :func:`pixcli.losses.sinkhorn.sinkhorn`.

    Returns:
        The loss (a scalar; 0, still attached to the head, when ``M = 0``) and the Sinkhorn
        result over ``Z_aug`` (rows: current samples first), None when ``M = 0``.
    """
    scores = head(features.detach())
    if scores.shape[0] == 0:
        return scores.sum() * 0.0, None
    with torch.no_grad():
        all_scores = torch.cat([scores.detach(), head(bank_features.detach()).to(scores)])
    result = sinkhorn(all_scores, epsilon, class_marginal, None, max_iterations, tolerance)
    current = result.assignments[: scores.shape[0]]
    return self_labeling_cross_entropy(scores, current, tau), result


# ---------------------------------------------------------------------- rectification


def rectify_pseudo_labels(
    p_sl: Tensor,
    p_st: Tensor,
    ignore: Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    dim: int = 1,
) -> Tensor:
    """Rectified hard pseudo labels ``argmax_c P_SL^(c) * P_ST^(c)`` (CPSL Eq. 1).

    Args:
        p_sl: soft cluster assignment P_SL (:func:`soft_cluster_assignment`).
        p_st: soft pseudo label P_ST, same shape; a pixel with any NaN in P_ST or P_SL is
            ignored.
        ignore: optional boolean mask of ignored pixels (the shape without ``dim``).
        dim: class axis (1 for ``B x C x H x W``, 0 for ``C x H x W``, -1 for ``N x C``).

    Returns:
        long labels, ``ignore_index`` at ignored pixels; ties go to the lower class index.
    """
    if p_sl.shape != p_st.shape:
        raise ValueError(f"P_SL {tuple(p_sl.shape)} and P_ST {tuple(p_st.shape)} differ")
    product = p_sl.float() * p_st.float()
    invalid = torch.isnan(product).any(dim=dim)
    if ignore is not None:
        invalid = invalid | ignore.to(invalid.device, torch.bool)
    labels = torch.nan_to_num(product, nan=0.0).argmax(dim=dim)
    return labels.masked_fill(invalid, ignore_index)


# ---------------------------------------------------------------------------- L_REG


def symmetric_kl_consistency(
    student_logits: Tensor, teacher_logits: Tensor, valid: Tensor | None = None, dim: int = 1
) -> Tensor:
    """L_REG of CPSL (Eq. 13): ``KL(P_w || P_s) + KL(P_s || P_w)`` per pixel.

    ``P_s = softmax(student_logits)`` (f_SEG on the strong view) and
    ``P_w = softmax(teacher_logits)`` (f'_SEG on the weak view, warped to the strong view by
    the caller). The KLs are summed over classes and *averaged* over the (valid) pixels of
    the batch; Eq. 13 sums over pixels and images, which only rescales lambda_2 by the pixel
    count. Both KLs are computed from log-probabilities (``log_softmax``), never from
    probabilities in place of logs (a defect of the published code's ``F.kl_div`` call);
    ``teacher_logits`` may also be log-probabilities (``log_softmax`` leaves them unchanged).

    Gradient: P_w is detached (momentum network); in both KL terms only P_s carries gradient,
    including P_s's own entropy in ``KL(P_s || P_w)``.

    Args:
        student_logits, teacher_logits: same shape, classes along ``dim``.
        valid: optional boolean mask of the pixels that count (the shape without ``dim``),
            e.g. False where the warped teacher has no pixel (NaN teacher logits there are read
            as 0). No valid pixel gives 0.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)}"
        )
    log_ps = F.log_softmax(student_logits.float(), dim=dim)
    log_pw = F.log_softmax(teacher_logits.detach().float().nan_to_num(nan=0.0), dim=dim)
    # KL(p||q) + KL(q||p) = sum_c (p - q)(log p - log q)
    per_pixel = ((log_pw.exp() - log_ps.exp()) * (log_pw - log_ps)).sum(dim=dim)
    if valid is None:
        return per_pixel.mean()
    valid = valid.to(per_pixel.device, torch.bool)
    return torch.where(valid, per_pixel, 0.0).sum() / valid.sum().clamp(min=1)
