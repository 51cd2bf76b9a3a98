"""Rare-class sampling of the labelled stream (DAFormer, Hoyer et al., CVPR 2022, Sec. 3.3,
Eq. 6-7).

Class frequencies ``f_c`` are the pixel shares of each class over all label files (ignored
pixels left out), scanned once; ``P(c) = exp((1 - f_c) / T) / sum_c' exp((1 - f_c') / T)``.
Each sample draws a class ``c ~ P`` and then, uniformly, an image with at least
``min_pixels`` pixels of ``c`` (DAFormer's ``rcs_min_pixels`` filter); classes no image
qualifies for are left out of P. DAFormer also retries the random crop until it shows
enough pixels of ``c``; pixcli does not (the crop stays the augmentation's).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from pixcli.data.readers import SegDataset
from pixcli.errors import UserError


def class_pixel_counts(ds: SegDataset, num_classes: int) -> np.ndarray:
    """``(N, C)`` int64: pixels of each class in each label file (ids >= C ignored)."""
    counts = np.zeros((len(ds), num_classes), dtype=np.int64)
    for i in range(len(ds)):
        label = ds.read_label(i)
        if label is None:
            raise UserError(f"rare-class sampling: {ds.items[i][0]} has no label file")
        ids = label[label < num_classes].astype(np.int64)
        counts[i] = np.bincount(ids, minlength=num_classes)
    return counts


def rcs_probabilities(frequencies: np.ndarray, temperature: float) -> np.ndarray:
    """DAFormer Eq. 7: ``softmax((1 - f) / T)`` over the classes (float64, stable)."""
    logits = (1.0 - np.asarray(frequencies, dtype=np.float64)) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


class RareClassSampler(Sampler[int]):
    """Indices forever, by rare-class sampling (DAFormer Eq. 6-7), partitioned like
    :class:`~pixcli.data.training_set.GlobalOrderSampler`.

    Global batch ``k`` (``batch_size * world_size`` indices) is drawn from
    ``np.random.default_rng([seed, k])``, the same on every rank; rank ``r`` takes its
    ``r``-th ``batch_size`` slice, so N ranks see the one-process batch, and ``start`` (a
    resumed step) continues the sequence exactly.

    Args:
        counts: ``(N, C)`` class pixel counts per image (:func:`class_pixel_counts`).
        temperature: T of Eq. 7.
        min_pixels: an image "contains" class c with at least this many pixels of c.
    """

    def __init__(
        self,
        counts: np.ndarray,
        batch_size: int,
        temperature: float = 0.01,
        min_pixels: int = 3,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if temperature <= 0:
            raise UserError(f"self_training.rcs_temperature must be positive, got {temperature}")
        if not 0 <= rank < world_size or batch_size < 1:
            raise ValueError(f"RareClassSampler: rank {rank}/{world_size}, batch {batch_size}")
        counts = np.asarray(counts, dtype=np.int64)
        total = counts.sum()
        if total == 0:
            raise UserError("rare-class sampling: the labelled data has no labelled pixel")
        self.frequencies = counts.sum(0) / total  # f_c (Eq. 6)
        self.images = [np.flatnonzero(counts[:, c] >= max(min_pixels, 1)) for c in
                       range(counts.shape[1])]  # fmt: skip
        self.classes = np.array([c for c, imgs in enumerate(self.images) if len(imgs)])
        if not len(self.classes):
            raise UserError(
                f"rare-class sampling: no image has {min_pixels} pixels of any class; "
                "lower self_training.rcs_min_pixels"
            )
        self.probabilities = rcs_probabilities(self.frequencies[self.classes], temperature)
        self.batch_size, self.seed, self.start = batch_size, seed, start
        self.rank, self.global_batch = rank, batch_size * world_size

    def global_draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Global batch ``k``: the drawn classes and, for each, an image containing it."""
        rng = np.random.default_rng([self.seed, k])
        classes = rng.choice(self.classes, size=self.global_batch, p=self.probabilities)
        images = np.array([rng.choice(self.images[c]) for c in classes])
        return classes, images

    def __iter__(self) -> Iterator[int]:
        k = self.start
        while True:
            _, images = self.global_draw(k)
            begin = self.rank * self.batch_size
            yield from (int(i) for i in images[begin : begin + self.batch_size])
            k += 1
