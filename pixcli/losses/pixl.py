"""PiXL: pixel learning, as pure tensor functions.

Gan, Yin, He, Gao and Zhang, "Diving Segmentation Model into Pixels"
(``../shared/papers/pixl-diving-segmentation-model-into-pixels.md``). What the method adds to
the self-training loop, equation by equation:

- multi-resolution crops (Sec. 3.3, A.4.1): X^L is the training crop resized by
  ``lr_scale``, X^H a window of the same size cut from the crop at full resolution, at random
  first and, after ``entropy_crop_start`` iterations, where the entropy is highest:
  :func:`low_resolution_size`, :func:`random_window`, :func:`entropy_window`;
- per-pixel entropy (Eq. 17): :func:`pixel_entropy`;
- the quantile eta, linear from 0.2 to 0.001 (Sec. 4.3): :func:`eta_at`;
- pixel-level sub-domain partition into joint and drift pixels (Sec. 3.4, Eq. 4):
  :func:`partition_pixels`;
- local prototypes with their pixel counts (Eq. 5, Sec. 3.6): :func:`local_prototypes`;
- adaptive prototype generation, the median rule (Eq. 8): :func:`adaptive_prototypes`;
- drift pixel asymmetric contrast (Eq. 6-7): :func:`drift_pixel_contrast`;
- the thing-class ImageNet feature distance (Eq. 13-14): :func:`thing_mask`,
  :func:`feature_distance` (shared with the loop, in :mod:`pixcli.losses.feature_distance`);
- the paper's defaults and the Table 4 / Table 5 switches: :class:`PiXLConfig`.

The cross-entropy terms of Eq. 12 are the loop's weighted cross-entropy
(:func:`pixcli.losses.self_training.weighted_cross_entropy`, weights of Eq. 11).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pixcli.errors import UserError
from pixcli.losses.feature_distance import CITYSCAPES_THING_CLASSES
from pixcli.losses.feature_distance import feature_distance as feature_distance  # re-export
from pixcli.losses.feature_distance import thing_mask as thing_mask  # re-export


@dataclass
class PiXLConfig:
    """PiXL hyper-parameters with the paper's defaults, and the ablation switches.

    ``apg = False`` is Table 4's "DPA only" row (low-resolution prototypes only), ``dpa =
    False`` its baseline row (no L_DPA). Table 5 varies eta: set ``eta_start`` (and
    ``eta_end = eta_start`` for a constant eta).
    """

    lr_scale: float = 0.5  # X^L = crop resized by this; X^H of the same size (1024 -> 512, A.4.1)
    entropy_crop_start: int = 12_000  # random X^H before, highest-entropy window after (A.4.1)
    eta_start: float = 0.2  # drift share at the first iteration (Sec. 4.3)
    eta_end: float = 0.001  # ... decreased linearly to this at the last iteration (Sec. 4.3)
    lambda_h: float = 0.1  # lambda_H of Eq. 12
    # lambda_FD of Eq. 9 (A.3). Applied only with an ImageNet-pretrained backbone
    # (model.pretrained or model.weights_file) and an unlabelled stream: A.3 sets it to 0 in
    # the fully supervised setting.
    lambda_fd: float = 0.005
    lambda_dpa: float = 1.0  # weight of L_DPA in Eq. 9 (1 in the paper)
    # Temperature of Eq. 6; the paper gives none. pixcli's choice: 0.5 (PGPC's tau). On the
    # built-in benchmark tau = 0.1 cost 3 to 11 points against 0.5 (36.6 vs 39.7 with 128
    # crops, 30.1 vs 41.0 with 256 crops of 2x images; README "Methods on the built-in benchmark").
    tau: float = 0.5
    apg: bool = True  # adaptive prototype generation, Eq. 8 (Table 4)
    dpa: bool = True  # drift pixel alignment, Eq. 6-7 (Table 4)
    # pixcli's option, off in the paper (Eq. 7 is a plain mean over the drift pixels): weight
    # each drift pixel's L_DPA term by its cross-entropy weight w_t (Eq. 10-11: 1 with a label,
    # the image's confident share with a pseudo label). The drift pixels are the
    # highest-entropy ones, where the teacher's pseudo labels are least often right.
    dpa_pseudo_weight: bool = False
    # Pixel features: the decoder's (A.2: the ASPP/fusion output the classifier reads) or,
    # when True, a projection head of proj_dim (the checkpoint's, or a new one).
    use_projection: bool = False
    proj_dim: int = 256  # used with use_projection (pixcli's choice: PGPC's 256-d head)
    fd_thing_classes: tuple[int, ...] = CITYSCAPES_THING_CLASSES  # DAFormer/HRDA, A.3
    fd_min_ratio: float = 0.75  # a feature cell is "thing" when one thing class covers this share

    def __post_init__(self) -> None:
        if not 0.0 < self.lr_scale <= 1.0:
            raise UserError(f"pixl.lr_scale must be in (0, 1], got {self.lr_scale}")
        for name in ("eta_start", "eta_end"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise UserError(f"pixl.{name} must be in (0, 1), got {getattr(self, name)}")
        for name in ("lambda_h", "lambda_fd", "lambda_dpa", "entropy_crop_start", "proj_dim"):
            if getattr(self, name) < 0:
                raise UserError(f"pixl.{name} must be >= 0, got {getattr(self, name)}")
        if self.tau <= 0:
            raise UserError(f"pixl.tau must be positive, got {self.tau}")
        if not 0.0 < self.fd_min_ratio <= 1.0:
            raise UserError(f"pixl.fd_min_ratio must be in (0, 1], got {self.fd_min_ratio}")


# ---------------------------------------------------------------- multi-resolution crops


def low_resolution_size(size: tuple[int, int], scale: float) -> tuple[int, int]:
    """(h, w) of X^L for a crop of ``size``: each side times ``scale``, rounded, >= 1. X^H is
    a window of the same size (Sec. 3.3: "resizing X to the same size of X^H")."""
    return max(1, round(size[0] * scale)), max(1, round(size[1] * scale))


def random_window(
    size: tuple[int, int], window: tuple[int, int], generator: torch.Generator | None = None
) -> tuple[int, int]:
    """(top, left) of a ``window`` placed uniformly inside ``size`` (A.4.1, first iterations)."""
    top = int(torch.randint(0, size[0] - window[0] + 1, (1,), generator=generator))
    left = int(torch.randint(0, size[1] - window[1] + 1, (1,), generator=generator))
    return top, left


def entropy_window(
    entropy: Tensor, size: tuple[int, int], window: tuple[int, int]
) -> tuple[int, int]:
    """(top, left), in crop pixels, of the ``window`` with the highest mean entropy (A.4.1,
    after the first iterations: "regions with high entropy are selectively cropped").

    ``entropy`` is an ``h x w`` map on a grid covering the crop of ``size`` (e.g. the
    model's output grid on X^L). The search runs on that grid: the window spans
    ``round(window * h / size)`` cells (at least 1, at most the grid), every position is
    scored by its mean entropy, the best (the first in row-major order on ties) is mapped
    back to crop pixels and kept inside the crop.
    """
    gh, gw = entropy.shape[-2:]
    kh = min(gh, max(1, round(window[0] * gh / size[0])))
    kw = min(gw, max(1, round(window[1] * gw / size[1])))
    scores = F.avg_pool2d(entropy.detach().float().reshape(1, 1, gh, gw), (kh, kw), stride=1)[0, 0]
    gy, gx = divmod(int(scores.flatten().argmax()), scores.shape[1])
    top = min(round(gy * size[0] / gh), size[0] - window[0])
    left = min(round(gx * size[1] / gw), size[1] - window[1])
    return max(0, top), max(0, left)


# ---------------------------------------------------------------------- partition (PSP)


def pixel_entropy(logits: Tensor, dim: int = 1) -> Tensor:
    """Per-pixel entropy ``-sum_k p_k log p_k`` of ``softmax(logits)`` (Eq. 17; natural log).

    float32, without gradient: the entropy only ranks pixels.
    """
    log_p = F.log_softmax(logits.detach().float(), dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def eta_at(step: int, total: int, start: float = 0.2, end: float = 0.001) -> float:
    """eta at 0-based ``step`` of ``total``: linear from ``start`` at the first step to ``end``
    at the last (Sec. 4.3: "set eta to 0.2 initially, and decrease it linearly until eta =
    0.001 during training"); steps past the end keep ``end``."""
    progress = min(max(step, 0) / max(total - 1, 1), 1.0)
    return start + (end - start) * progress


def quantile(values: Tensor, q: float) -> Tensor:
    """The ``q`` quantile of a 1-D tensor with linear interpolation between order statistics
    (``torch.quantile``'s default, without its limit on the input size)."""
    ordered = values.detach().float().flatten().sort().values
    position = q * (ordered.numel() - 1)
    low = math.floor(position)
    high = min(low + 1, ordered.numel() - 1)
    return ordered[low] + (position - low) * (ordered[high] - ordered[low])


def partition_pixels(entropy: Tensor, image: Tensor, eta: float) -> Tensor:
    """Pixel-level sub-domain partition (Sec. 3.4, Eq. 4): the mask of joint pixels.

    For each image separately ("to ensure fairness, considering the entropy gap across
    images"), its pixels' entropies (low- and high-resolution pixels together: pass them
    with the same image index) give the threshold epsilon = their ``1 - eta`` quantile
    (:func:`quantile`); pixels with ``h < epsilon`` are joint, the others (``h >= epsilon``,
    about a share eta) drift.

    Args:
        entropy: ``(N,)`` per-pixel entropies (Eq. 17).
        image: ``(N,)`` the index of the image (distribution) each pixel belongs to.
        eta: the drift share.

    Returns:
        ``(N,)`` bool, True for joint pixels; drift pixels are the rest.
    """
    joint = torch.zeros(entropy.shape, dtype=torch.bool, device=entropy.device)
    for index in image.unique():
        chosen = image == index
        values = entropy[chosen]
        joint[chosen] = values < quantile(values, 1.0 - eta)
    return joint


# ------------------------------------------------------------------------- prototypes


def local_prototypes(
    features: Tensor, labels: Tensor, mask: Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Local prototypes (Eq. 5) and their pixel counts N^(k) (Sec. 3.6).

    Prototype k is the mean of the features of the ``mask``ed (joint) pixels of class k
    (over all the images passed: Eq. 5 pools the joint pixels of the two images of a step).
    Computed without gradient (the prototypes are under stop-gradient, Sec. 3.5).

    Args:
        features: ``(N, D)`` pixel features.
        labels: ``(N,)`` class indices in ``[0, num_classes)`` (drop ignored pixels first).
        mask: ``(N,)`` bool, the pixels that count (joint pixels of one resolution).

    Returns:
        ``(C, D)`` float32 prototypes (zero rows for classes without pixel) and ``(C,)`` long
        counts.
    """
    feats = features.detach().float()[mask]
    labs = labels[mask].long()
    sums = torch.zeros(num_classes, feats.shape[1], device=feats.device).index_add_(0, labs, feats)
    counts = torch.bincount(labs, minlength=num_classes)
    return sums / counts.clamp(min=1).unsqueeze(1).to(sums), counts


def adaptive_prototypes(
    low: Tensor, low_counts: Tensor, high: Tensor, high_counts: Tensor, apg: bool = True
) -> tuple[Tensor, Tensor]:
    """Adaptive prototype generation (Sec. 3.6, Eq. 8).

    With m the median of the low-resolution counts N_L^(k), class k takes

    - p_L^(k) when ``N_L >= m``,
    - p_L^(k) when ``N_L < m`` and ``N_H < N_L``,
    - p_H^(k) otherwise.

    Choices: m is the median over the classes that have a low-resolution prototype
    (``N_L > 0``; the paper sorts "these low-resolution prototypes"), the mean of the two
    middle values for an even number of them; with none, every class takes p_H. A class
    whose chosen prototype has no pixel has no prototype. ``apg=False`` (Table 4) keeps the
    low-resolution prototypes only.

    Returns:
        ``(C, D)`` prototypes and ``(C,)`` bool: which classes have one.
    """
    if not apg:
        return low, low_counts > 0
    present = low_counts > 0
    median = quantile(low_counts[present], 0.5) if bool(present.any()) else math.inf
    use_low = (low_counts >= median) | (high_counts < low_counts)
    prototypes = torch.where(use_low.unsqueeze(1), low, high)
    counts = torch.where(use_low, low_counts, high_counts)
    return prototypes, counts > 0


# ------------------------------------------------------------------------------- DPA


def drift_pixel_contrast(
    features: Tensor,
    labels: Tensor,
    prototypes: Tensor,
    present: Tensor,
    tau: float = 0.5,
    weights: Tensor | None = None,
) -> Tensor:
    """Drift pixel asymmetric contrast, L_DPA (Eq. 6-7).

    For a drift pixel f of class k, InfoNCE with the positive p^(k) and the negatives
    {p^(j), j != k}: ``-log(exp(f.p_k / tau) / sum_j exp(f.p_j / tau))``, averaged over the
    drift pixels (Eq. 7).

    Asymmetric: the prototypes are detached (stop-gradient, Sec. 3.5), so only the drift
    pixels move. Choices: f and p are L2-normalised (Eq. 6 writes a plain dot product;
    unnormalised 256-d features make ``exp(f.p / tau)`` overflow); only classes with a
    prototype (``present``) are negatives; a drift pixel whose class has no prototype has
    no positive and is left out.

    Args:
        features: ``(M, D)`` drift-pixel features (with gradient).
        labels: ``(M,)`` their classes.
        prototypes: ``(C, D)`` local prototypes; ``present``: ``(C,)`` bool.
        tau: temperature.
        weights: ``(M,)`` per-pixel weights (``dpa_pseudo_weight``); the loss is then the mean
            of ``weight * InfoNCE`` over the kept pixels. None: every weight 1 (Eq. 7).

    Returns:
        The mean loss; 0 (still attached to ``features``) when no drift pixel is left.
    """
    keep = present[labels]
    if not bool(keep.any()):
        return features.sum() * 0.0
    z = F.normalize(features[keep].float(), dim=1)
    p = F.normalize(prototypes.detach().float(), dim=1)
    logits = (z @ p.T / tau).masked_fill(~present, float("-inf"))
    if weights is None:
        return F.cross_entropy(logits, labels[keep].long())
    per_pixel = F.cross_entropy(logits, labels[keep].long(), reduction="none")
    return (weights[keep].float() * per_pixel).mean()
