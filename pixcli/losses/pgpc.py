"""PGPC: pseudo-label guided pixel contrast, as pure tensor functions and modules.

Xiang, Wan and Cao, "Pseudolabel guided pixels contrast for domain adaptive semantic
segmentation" (arXiv 2501.09040; ``../shared/papers/pgpc-pseudolabel-guided-pixel-contrast.md``).
What the method adds to the self-training loop, equation by equation:

- the per-pixel entropy of the teacher's prediction (Eq. 7): :func:`entropy_map`;
- reliable target pixels, the lowest-entropy fraction eta (Sec. 3.2), and the Table 7
  alternatives (global confidence, class-wise entropy, class-wise confidence):
  :func:`reliable_pixels`;
- anchors A_c (Eq. 8), at most N_a per class: :func:`sample_per_class`;
- the pixel-level category order O_ij and the target negatives N_t^c (Eq. 11):
  :func:`class_rank_order`, :func:`negative_candidates`;
- source negatives N_s^c (Eq. 10), from the class banks: :func:`negative_candidates`,
  at most N per anchor: :func:`sample_negatives`;
- per-class memory banks and their prototypes z_c^+ (Eq. 9): :class:`ClassMemoryBanks`;
- InfoNCE with cosine similarity (Eq. 5): :func:`info_nce`, :func:`pgpc_contrastive_loss`;
- the paper's defaults and the Table 6/7 switches: :class:`PGPCConfig`.

Which network computes what: anchors are the student's projections (gradient flows into the
projection head and through the decoder features into the model); every bank row is a
student projection, detached; the pseudo labels, entropies and rank orders come from the
EMA teacher (no gradient). The wiring is in :mod:`pixcli.methods.pgpc`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pixcli.errors import UserError
from pixcli.losses.memory_bank import Gather, MemoryBank, all_gather_rows

SELECTIONS = ("global_entropy", "global_confidence", "classwise_entropy", "classwise_confidence")
POSITIVES = ("source", "target")


@dataclass
class PGPCConfig:
    """PGPC hyper-parameters with the paper's defaults, and the Table 6/7 ablation switches.

    Sources: "Sec. 4.1" = Implementation details; Tables 9-12 are the sensitivity studies.
    lambda_t of Eq. 6 is the loop's ``[self_training] unlabelled_weight`` (default 1, Table 8).
    The projection head trains with the decode head, at the loop's head learning rate
    (Sec. 4.1: 6e-4 for both heads, 6e-5 for the encoder).
    """

    lambda_c: float = 0.1  # weight of L_c in Eq. 6, Sec. 4.3 (Table 9)
    tau: float = 0.5  # temperature of Eq. 5, Sec. 4.1
    eta: float = 0.5  # reliable fraction of each image's pixels, Sec. 3.2 (Table 11)
    rank_r: int = 4  # r of Eq. 11 (Table 12)
    anchors_per_class: int = 256  # N_a, anchors per class and step (Table 10)
    negatives_per_anchor: int = 512  # N of Eq. 5 (Table 10)
    proj_dim: int = 256  # projection head output, L2-normalised, Sec. 4.1
    # The contrastive term starts after a warm-up (Algorithm 1 line 5; Sec. 4.1: 20k of 60k
    # iterations). warmup_iterations, when set, wins; otherwise warmup_fraction of the run.
    warmup_iterations: int | None = None
    warmup_fraction: float = 1 / 3  # 20k / 60k, Sec. 4.1
    anchor_selection: str = "global_entropy"  # Sec. 3.2; the others are Table 7's rows
    positives: str = "source"  # Eq. 9 source prototypes ("SP"); "target" = "TP" of Table 6
    source_negatives: bool = True  # Eq. 10 ("SN", Table 6)
    target_negatives: bool = True  # Eq. 11 ("TN", Table 6)
    # Memory banks: sizes are not given in the paper ("large and external memories", Sec. 3.3).
    bank_size: int = 1024  # rows per class of the prototype banks (pixcli's choice)
    bank_push: int = 64  # rows per class pushed per step and process (pixcli's choice)
    negative_bank_size: int = 8192  # rows of the target-negative queue (pixcli's choice)
    negative_bank_push: int = 512  # target rows pushed per step and process (pixcli's choice)

    def __post_init__(self) -> None:
        for name in ("tau", "anchors_per_class", "negatives_per_anchor", "proj_dim", "rank_r"):
            if getattr(self, name) <= 0:
                raise UserError(f"pgpc.{name} must be positive, got {getattr(self, name)}")
        for name in ("bank_size", "bank_push", "negative_bank_size", "negative_bank_push"):
            if getattr(self, name) <= 0:
                raise UserError(f"pgpc.{name} must be positive, got {getattr(self, name)}")
        if self.lambda_c < 0:
            raise UserError(f"pgpc.lambda_c must be >= 0, got {self.lambda_c}")
        if not 0.0 < self.eta <= 1.0:
            raise UserError(f"pgpc.eta must be in (0, 1], got {self.eta}")
        if not 0.0 <= self.warmup_fraction <= 1.0:
            raise UserError(f"pgpc.warmup_fraction must be in [0, 1], got {self.warmup_fraction}")
        if self.warmup_iterations is not None and self.warmup_iterations < 0:
            raise UserError(f"pgpc.warmup_iterations must be >= 0, got {self.warmup_iterations}")
        if self.anchor_selection not in SELECTIONS:
            raise UserError(
                f"pgpc.anchor_selection '{self.anchor_selection}': expected one of "
                f"{', '.join(SELECTIONS)}"
            )
        if self.positives not in POSITIVES:
            raise UserError(f"pgpc.positives '{self.positives}': expected source or target")
        if not (self.source_negatives or self.target_negatives):
            raise UserError("pgpc: source_negatives and target_negatives cannot both be false")

    def start_step(self, total_steps: int) -> int:
        """First (0-based) step with the contrastive term."""
        if self.warmup_iterations is not None:
            return self.warmup_iterations
        return round(self.warmup_fraction * total_steps)


# --------------------------------------------------------------------- reliable pixels


def entropy_map(probs: Tensor, dim: int = 1) -> Tensor:
    """Per-pixel prediction entropy ``-sum_c p_c log p_c`` (PGPC Eq. 7), natural log; 0 log 0
    counts as 0. ``probs`` has the classes along ``dim``, which is summed away."""
    return torch.special.entr(probs.float()).sum(dim=dim)


def _rank_in_group(sorted_groups: Tensor, counts: Tensor) -> Tensor:
    """Place of each element within its group, for group ids sorted ascending."""
    starts = counts.cumsum(0) - counts
    return torch.arange(sorted_groups.numel(), device=sorted_groups.device) - starts[sorted_groups]


def reliable_pixels(
    probs: Tensor, eta: float, selection: str = "global_entropy", valid: Tensor | None = None
) -> Tensor:
    """Reliable target pixels (PGPC Sec. 3.2, Eq. 8's ``E < gamma_t``; Table 7's variants).

    Per image, among its ``valid`` pixels, ``floor(eta * n)`` are kept:

    - ``global_entropy`` (the paper's): the lowest-entropy fraction eta of all pixels, one
      threshold over all classes;
    - ``global_confidence``: the highest max-probability fraction eta;
    - ``classwise_entropy`` / ``classwise_confidence``: the same within each pseudo-label
      class separately (``floor(eta * n_c)`` of the n_c pixels labelled c).

    Choices: the threshold is per image, as the paper's ``E_t^i`` (image i) reads; the
    fraction is counted in pixels, ``floor(eta * n)`` of them (Eq. 8's strict ``<`` when no
    two entropies tie; ties are broken by pixel order).

    Args:
        probs: ``B x C x H x W`` teacher probabilities.
        eta: the reliable fraction.
        selection: one of :data:`SELECTIONS`.
        valid: ``B x H x W`` bool, pixels that may be chosen and that count in n (default all).

    Returns:
        ``B x H x W`` bool.
    """
    if selection not in SELECTIONS:
        raise ValueError(f"unknown selection {selection!r}")
    scope, score_kind = selection.split("_")
    # lower = more reliable
    score = entropy_map(probs) if score_kind == "entropy" else -probs.float().amax(dim=1)
    groups = (
        probs.argmax(dim=1) if scope == "classwise" else torch.zeros_like(score, dtype=torch.long)
    )
    if valid is None:
        valid = torch.ones_like(score, dtype=torch.bool)
    out = torch.zeros_like(score, dtype=torch.bool)
    for b in range(score.shape[0]):
        index = torch.nonzero(valid[b].reshape(-1)).squeeze(1)
        s, g = score[b].reshape(-1)[index], groups[b].reshape(-1)[index]
        order = torch.argsort(s, stable=True)
        order = order[torch.argsort(g[order], stable=True)]  # by group, by score within
        g_sorted = g[order]
        counts = torch.bincount(g_sorted, minlength=probs.shape[1])
        quota = torch.floor(counts.double() * eta + 1e-9).long()
        rank = _rank_in_group(g_sorted, counts)
        out[b].view(-1)[index[order[rank < quota[g_sorted]]]] = True
    return out


def sample_per_class(
    labels: Tensor, candidates: Tensor, cap: int, generator: torch.Generator | None = None
) -> Tensor:
    """At most ``cap`` candidate pixels per class, uniformly at random (PGPC Eq. 8 with N_a).

    Args:
        labels: flat long labels (``n``); only candidates' labels are read.
        candidates: flat bool (``n``).
        cap: the most per class (N_a for anchors).
        generator: source of randomness.

    Returns:
        Flat indices (long), grouped by class in ascending order, random within a class.
    """
    index = torch.nonzero(candidates.reshape(-1)).squeeze(1)
    where = generator.device if generator is not None else torch.device("cpu")
    shuffle = torch.randperm(index.numel(), generator=generator, device=where).to(index.device)
    index = index[shuffle]
    label = labels.reshape(-1)[index].long()
    order = torch.argsort(label, stable=True)
    index, label = index[order], label[order]
    counts = torch.bincount(label) if label.numel() else label.new_zeros(0)
    return index[_rank_in_group(label, counts) < cap]


# ------------------------------------------------------------------------- negatives


def class_rank_order(probs: Tensor, dim: int = 1) -> Tensor:
    """The pixel-level category order O_ij of PGPC Sec. 3.3: for every class, its place when
    the classes are sorted by decreasing probability (argmax -> 0, argmin -> C - 1); ties go
    to the lower class index. Same shape as ``probs``, long."""
    order = torch.argsort(probs.float(), dim=dim, descending=True, stable=True)
    return torch.argsort(order, dim=dim)


def negative_candidates(
    num_classes: int,
    source_labels: Tensor | None,
    target_ranks: Tensor | None,
    rank_r: int,
) -> Tensor:
    """Which pool rows may be negatives of which class (PGPC Eq. 10-11): ``C x (Ns + Nt)``.

    The pool is the source rows (labels ``Ns``) followed by the target rows (rank orders
    ``Nt x C``, :func:`class_rank_order`). A source row is a negative of every class but its
    own (Eq. 10); a target row is a negative of class c when c is not among its top r
    classes, ``O(c) >= r`` (Eq. 11). ``None`` leaves that part out (Table 6's SN / TN).
    """
    parts = []
    if source_labels is not None:
        classes = torch.arange(num_classes, device=source_labels.device)
        parts.append(source_labels.reshape(1, -1) != classes[:, None])
    if target_ranks is not None:
        if target_ranks.ndim != 2 or target_ranks.shape[1] != num_classes:
            raise ValueError(
                f"target ranks {tuple(target_ranks.shape)}: expected N x {num_classes}"
            )
        per_class = target_ranks.transpose(0, 1)
        parts.append(per_class >= rank_r)
    if not parts:
        raise ValueError("negative_candidates needs source labels or target ranks")
    return torch.cat(parts, dim=1)


def sample_negatives(
    candidates: Tensor, count: int, generator: torch.Generator | None = None
) -> tuple[Tensor, Tensor]:
    """At most ``count`` negatives per class, uniformly without replacement (N of Eq. 5).

    Choice: the anchors of one class share one draw of negatives per step (Eq. 5 allows a
    set per anchor; one per class keeps memory at ``C x N x D`` instead of ``M x N x D``).

    Args:
        candidates: ``C x P`` bool (:func:`negative_candidates`).
        count: N (PGPC: 512).

    Returns:
        Pool indices ``C x min(N, P)`` and a bool mask of the same shape, False where a
        class has fewer candidates than N (those indices are arbitrary).
    """
    where = generator.device if generator is not None else torch.device("cpu")
    keys = torch.rand(candidates.shape, generator=generator, device=where).to(candidates.device)
    keys = keys.masked_fill(~candidates, -1.0)
    values, index = keys.topk(min(count, candidates.shape[1]), dim=1)
    return index, values >= 0


# ----------------------------------------------------------------------- memory banks


class ClassMemoryBanks(nn.Module):
    """One FIFO queue of L2-normalised pixel representations per class (PGPC Eq. 9's M_c).

    The prototype of class c is the mean of its queue (Eq. 9); the queues of the other
    classes are class c's source negatives (Eq. 10). Under DDP the rows of all ranks are
    gathered once per push (``gather``), so the queues stay identical on every rank.

    Args:
        num_classes: C.
        length: rows per class.
        dim: representation size D.
        gather: applied to rows and labels before they are written (default: DDP gather).
    """

    def __init__(
        self, num_classes: int, length: int, dim: int, gather: Gather | None = all_gather_rows
    ) -> None:
        super().__init__()
        self.gather = gather
        self.banks = nn.ModuleList(MemoryBank(length, dim, gather=None) for _ in range(num_classes))

    @torch.no_grad()
    def push(self, features: Tensor, labels: Tensor) -> None:
        """Append ``n x D`` rows to the queues of their ``n`` labels (all in ``[0, C)``)."""
        if self.gather is not None:
            features, labels = self.gather(features.detach()), self.gather(labels)
        for c in labels.unique().tolist():
            rows = labels == c
            self.banks[c].push(features[rows], labels[rows])

    def get(self) -> tuple[Tensor, Tensor]:
        """All filled rows (``N x D``) and their class labels (``N``), class by class."""
        feats, labels = zip(*(bank.get() for bank in self.banks), strict=True)
        return torch.cat(feats), torch.cat(labels)

    def prototypes(self) -> tuple[Tensor, Tensor]:
        """Class prototypes z_c^+ (PGPC Eq. 9): the mean of each class's queue, ``C x D``
        (not renormalised; Eq. 5 compares by cosine), and which classes have any row."""
        means, present = [], []
        for bank in self.banks:
            feats, _ = bank.get()
            present.append(feats.shape[0] > 0)
            means.append(feats.mean(dim=0) if feats.shape[0] else feats.new_zeros(feats.shape[1]))
        device = self.banks[0].features.device
        return torch.stack(means), torch.tensor(present, dtype=torch.bool, device=device)


# --------------------------------------------------------------------------- InfoNCE


def info_nce(
    anchors: Tensor,
    positive: Tensor,
    negatives: Tensor,
    tau: float,
    negative_mask: Tensor | None = None,
) -> Tensor:
    """Per-anchor InfoNCE of PGPC Eq. 5 with cosine similarity:

    ``-log( e^{<z,z+>/tau} / (e^{<z,z+>/tau} + sum_n e^{<z,z_n^->/tau}) )``.

    Args:
        anchors: ``M x D``.
        positive: ``D`` (one positive for all anchors, the class prototype) or ``M x D``.
        negatives: ``N x D``, shared by the anchors.
        tau: temperature (PGPC: 0.5).
        negative_mask: optional bool, broadcastable to ``M x N``; False rows are left out.

    Returns:
        ``M`` float32 losses.
    """
    z = F.normalize(anchors.float(), dim=-1)
    pos = (z * F.normalize(positive.float(), dim=-1)).sum(dim=-1) / tau
    neg = z @ F.normalize(negatives.float(), dim=-1).T / tau
    if negative_mask is not None:
        neg = neg.masked_fill(~negative_mask.to(torch.bool), float("-inf"))
    logits = torch.cat([pos[:, None], neg], dim=1)
    return torch.logsumexp(logits, dim=1) - pos


def pgpc_contrastive_loss(
    anchors: Tensor,
    anchor_labels: Tensor,
    prototypes: Tensor,
    present: Tensor,
    negatives: Tensor,
    negative_valid: Tensor,
    tau: float = 0.5,
) -> tuple[Tensor, int]:
    """L_c of PGPC Eq. 5 over the anchors of all classes.

    Class c's anchors are pulled to its prototype ``prototypes[c]`` and pushed from its
    negatives ``negatives[c]`` (``C x N x D``, valid where ``negative_valid``). Classes
    without a prototype (empty bank) or without any negative are left out.

    Choice: Eq. 5 normalises by ``C x M`` (M anchors in every class); with fewer anchors in
    some classes this is the mean over all anchors used, so each anchor weighs the same.
    Computed in float32 (autocast off). Gradient: only through ``anchors``; the prototypes
    and negatives are detached.

    Returns:
        The loss (0, still attached to ``anchors``, when no anchor counts) and the number of
        anchors used.
    """
    with torch.autocast(anchors.device.type, enabled=False):
        losses = []
        for c in anchor_labels.unique().tolist():
            if not bool(present[c]) or not bool(negative_valid[c].any()):
                continue
            mine = anchor_labels == c
            losses.append(
                info_nce(
                    anchors[mine],
                    prototypes[c].detach(),
                    negatives[c].detach(),
                    tau,
                    negative_valid[c][None, :],
                )
            )
        if not losses:
            return anchors.float().sum() * 0.0, 0
        per_anchor = torch.cat(losses)
        return per_anchor.mean(), per_anchor.numel()
