"""Hard pseudo labels, class prototypes and the pseudo-label class distribution.

CPSL (Li et al., CVPR 2022) starts adaptation from three things a warmed-up model computes
on the target images:

- the hard pseudo label ``Y_ST``: the argmax of the soft pseudo label ``P_ST`` (Sec. 3.1);
- the class prototypes (Eq. 7), ``z_c = 1/|Gamma_c| sum_n sum_i Y_ST[n,i,c] z[n,i]``, the
  mean feature of the pixels whose hard pseudo label is ``c``, with ``z`` the L2-normalised
  pixel features (Sec. 3.2: "normalize it with z_i = z_i / ||z_i||_2");
- the initial class distribution (Eq. 10), ``delta_c = 1/(N H W) sum_n sum_i Y_ST[n,i,c]``.

Both sums run over every pixel of every image, so they are computed in a streaming way:
:func:`class_feature_sums` gives one image's numerator of Eq. 7 and its pixel counts, and a
:class:`PrototypeAccumulator` adds them up. Pixels whose hard label is ``ignore_index``
(low confidence, padding) count nowhere; Eq. 10 is then normalised by the pixels that do
count, so that the distribution sums to 1 (it is the Sinkhorn marginal ``r`` of Eq. 12).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pixcli.data.taxonomy import IGNORE_INDEX


def hard_labels(
    probs: torch.Tensor, ignore_below: float = 0.0, ignore_index: int = IGNORE_INDEX
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Y_ST`` and the confidence of soft labels ``probs`` (``C x h x w``).

    Returns the argmax as ``h x w`` uint8 (``ignore_index`` where the largest probability is
    below ``ignore_below``) and that largest probability (``h x w`` float).
    """
    confidence, labels = probs.max(dim=0)
    labels = labels.to(torch.uint8)
    if ignore_below > 0:
        labels[confidence < ignore_below] = ignore_index
    return labels, confidence


def class_feature_sums(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    ignore_index: int = IGNORE_INDEX,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One image's share of CPSL Eq. 7: per-class sums of pixel features, and pixel counts.

    Args:
        features: ``D x h x w`` pixel features.
        labels: ``h x w`` hard labels on the same grid (``ignore_index`` = not counted).
        num_classes: C.
        normalize: L2-normalise each pixel's feature first (CPSL Sec. 3.2).

    Returns:
        ``C x D`` float64 sums ``sum_i Y[i,c] z_i`` and ``C`` int64 counts ``|Gamma_c|``.
        Computed as a one-hot matrix product, which is deterministic on CPU and GPU.
    """
    if features.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"features {tuple(features.shape)} and labels {tuple(labels.shape)}")
    z = features.reshape(features.shape[0], -1).double().T  # (P, D)
    if normalize:
        z = F.normalize(z, dim=1)
    flat = labels.reshape(-1).long()
    keep = flat != ignore_index
    if keep.any() and int(flat[keep].max()) >= num_classes:
        raise ValueError(f"label {int(flat[keep].max())} outside {num_classes} classes")
    onehot = torch.zeros(num_classes, flat.numel(), dtype=torch.float64, device=z.device)
    onehot[flat[keep], torch.nonzero(keep).squeeze(1)] = 1.0
    counts = torch.bincount(flat[keep], minlength=num_classes)
    return onehot @ z, counts


class PrototypeAccumulator:
    """Adds up :func:`class_feature_sums` over images: prototypes (CPSL Eq. 7) and the class
    distribution of the hard pseudo labels (CPSL Eq. 10).

    Summation is in float64 in the order of :meth:`add` calls, so the same images added in
    the same order give bit-identical results.
    """

    def __init__(self, num_classes: int, dim: int) -> None:
        self.sums = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.counts = torch.zeros(num_classes, dtype=torch.int64)

    def add(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.sums += sums.to(self.sums)
        self.counts += counts.to(self.counts)

    def prototypes(self) -> torch.Tensor:
        """``C x D`` float32 class means; a zero row for a class no pixel was given (Eq. 7)."""
        denom = self.counts.clamp(min=1).to(torch.float64).unsqueeze(1)
        return (self.sums / denom).float()

    def class_distribution(self) -> torch.Tensor:
        """``C`` float64 share of counted pixels per class, summing to 1 (Eq. 10); all zeros
        when no pixel was counted."""
        total = int(self.counts.sum())
        return self.counts.double() / max(total, 1)
