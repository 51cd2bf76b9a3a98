"""Torch datasets and loaders over :class:`~pixcli.data.readers.SegDataset`.

Data order: :class:`GlobalOrderSampler`, one seeded order per epoch shared by every rank
and cut into per-rank slices of each global batch, so that N processes with batch b see
the same images per step as one process with batch N * b, and a resumed run continues
the order where it stopped.

Augmentation randomness: the ``n``-th item a loader of :func:`infinite_loader` draws,
dataset item ``i``, is augmented with a fresh ``np.random.Generator`` seeded with
``(seed, i, n)`` (the loader hands ``(i, n)`` to the dataset). ``n`` counts from
``start * batch_size``, so it depends only on the position in the stream: epochs differ,
the number of workers does not matter, and a run resumed at step ``start`` augments every
later item exactly as an uninterrupted run does. Stages give each rank its own
``SegTrainSet`` seed, so ranks augment differently. Indexing ``SegTrainSet`` with a plain
``i`` draws ``(seed, i, worker seed, call counter)`` instead.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from pixcli.data.readers import SegDataset
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.data.transforms import (
    AugmentConfig,
    CropGeometry,
    augment_with_geometry,
    normalize,
)


class SegTrainSet(Dataset):
    """A :class:`SegDataset` as a torch ``Dataset`` of normalised, augmented tensors.

    Items are dicts ``{"image": (3, h, w) float32, "label": (h, w) int64 (all 255 when the
    dataset has no labels), "index": i, "geometry": the crop's CropGeometry as 7 ints}``.
    ``augment_cfg=None`` is eval mode: the whole image, only normalised.
    """

    def __init__(self, ds: SegDataset, augment_cfg: AugmentConfig | None, seed: int = 0) -> None:
        self.ds = ds
        self.augment_cfg = augment_cfg
        self.seed = seed
        self._calls = 0

    def __len__(self) -> int:
        return len(self.ds)

    def rng(self, i: int, draw: int | None = None) -> np.random.Generator:
        """A new generator for item ``i`` as the stream's ``draw``-th item, or (``None``)
        for the next call (see the module docstring)."""
        if draw is None:
            self._calls += 1
            worker = get_worker_info()
            entropy = [self.seed, i, worker.seed if worker is not None else 0, self._calls]
        else:
            entropy = [self.seed, i, 1 << 32, draw]  # 1 << 32: never a worker seed's draw
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        i, draw = key if isinstance(key, tuple) else (key, None)
        image, label, _ = self.ds[i]
        h, w = image.shape[:2]
        geometry = CropGeometry((h, w), 0, 0, (h, w), False)
        if self.augment_cfg is not None:
            image, label, geometry = augment_with_geometry(
                image, label, self.augment_cfg, self.rng(i, draw)
            )
        if label is None:
            target = torch.full(image.shape[:2], IGNORE_INDEX, dtype=torch.long)
        else:
            target = torch.from_numpy(np.require(label, requirements="CW")).long()
        return {
            "image": normalize(image),
            "label": target,
            "index": i,
            "geometry": geometry_to_tensor(geometry),
        }


def geometry_to_tensor(g: CropGeometry) -> torch.Tensor:
    """A :class:`CropGeometry` as 7 integers (collates into a batch)."""
    return torch.tensor([*g.resized, g.top, g.left, *g.crop, int(g.flip)], dtype=torch.long)


def geometry_from_tensor(t: torch.Tensor) -> CropGeometry:
    """Inverse of :func:`geometry_to_tensor` for one item."""
    v = [int(x) for x in t.tolist()]
    return CropGeometry((v[0], v[1]), v[2], v[3], (v[4], v[5]), bool(v[6]))


def inside_image(geometry: torch.Tensor) -> torch.Tensor:
    """(B, 7) :func:`geometry_to_tensor` rows -> (B, h, w) bool, True where the crop shows the
    image and False on the padding a crop larger than the rescaled image gets."""
    masks = []
    for row in geometry:
        g = geometry_from_tensor(row)
        rows = torch.arange(g.crop[0]) + g.top < g.resized[0]
        cols = torch.arange(g.crop[1]) + g.left < g.resized[1]
        if g.flip:
            cols = cols.flip(0)
        masks.append(rows[:, None] & cols[None, :])
    return torch.stack(masks)


class GlobalOrderSampler(Sampler[int]):
    """Indices forever: one seeded order of the dataset per epoch, cut into global batches of
    ``batch_size * world_size``; rank ``r`` takes the ``r``-th ``batch_size`` slice of each.

    The order depends only on ``seed`` and the epoch (not on the rank nor the world size),
    so ``world_size`` processes with ``batch_size`` each see, step for step, the same
    images as one process with ``batch_size * world_size``: rank ``r``'s batch is rows
    ``r * batch_size`` to ``(r + 1) * batch_size`` of the one-process batch. Epoch ``e``'s
    order is a permutation drawn from ``np.random.default_rng([seed, e])`` (``arange``
    without ``shuffle``), repeated when the dataset is smaller than a global batch; the
    tail that does not fill a global batch is left out, as ``drop_last`` would. ``start``
    skips that many global batches: a run resumed at step ``start`` continues the order.
    """

    def __init__(
        self,
        size: int,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start: int = 0,
    ) -> None:
        if size < 1 or batch_size < 1:
            raise ValueError(f"GlobalOrderSampler: size {size}, batch_size {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"GlobalOrderSampler: rank {rank} of world size {world_size}")
        self.size, self.batch_size, self.shuffle, self.seed = size, batch_size, shuffle, seed
        self.rank, self.world_size, self.start = rank, world_size, start
        self.global_batch = batch_size * world_size
        self.repeats = math.ceil(self.global_batch / size)  # copies of the data per epoch
        self.batches_per_epoch = self.repeats * size // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The epoch's order of dataset indices, global batches only (the same on all ranks)."""
        if self.shuffle:
            rng = np.random.default_rng([self.seed, epoch])
            order = np.concatenate([rng.permutation(self.size) for _ in range(self.repeats)])
        else:
            order = np.tile(np.arange(self.size), self.repeats)
        return order[: self.batches_per_epoch * self.global_batch]

    def __iter__(self) -> Iterator[int]:
        epoch, first = divmod(self.start, self.batches_per_epoch)
        while True:
            order = self.epoch_order(epoch)
            for k in range(first, self.batches_per_epoch):
                begin = k * self.global_batch + self.rank * self.batch_size
                yield from (int(i) for i in order[begin : begin + self.batch_size])
            epoch, first = epoch + 1, 0


class NumberedSampler(Sampler[tuple[int, int]]):
    """``(i, n)`` for the ``n``-th index ``i`` of ``sampler``, ``n`` counted from ``first``
    across every pass over it (so that :class:`SegTrainSet` seeds by stream position)."""

    def __init__(self, sampler: Any, first: int = 0) -> None:
        self.sampler = sampler
        self.next = first

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for i in self.sampler:
            n, self.next = self.next, self.next + 1
            yield int(i), n

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def infinite_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    sampler: Any = None,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
) -> Iterator[dict[str, Any]]:
    """Batches of ``batch_size`` from ``dataset`` forever.

    By default the order is :class:`GlobalOrderSampler`'s: seeded with ``seed``, the same
    on every rank, partitioned across ``world_size`` ranks, resumed ``start`` batches in
    (pass ``seed`` equal on every rank, ``rank``/``world_size`` from the runtime). The
    DataLoader's generator (seeded with ``seed``) gives the worker seeds. A ``sampler``
    given instead is run epoch after epoch, with ``set_epoch`` before each when it has one
    (e.g. a ``DistributedSampler``); ``drop_last`` applies to it only.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("infinite_loader: the dataset is empty")
    generator = torch.Generator()
    generator.manual_seed(seed)
    endless = sampler is None
    if endless:
        sampler = GlobalOrderSampler(
            len(dataset),
            batch_size,
            shuffle,
            seed,
            rank,
            world_size,
            start,  # type: ignore[arg-type]
        )
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=NumberedSampler(sampler, start * batch_size),
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
    if endless:
        yield from loader
        return
    epoch = 0
    while True:
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yielded = False
        for batch in loader:
            yielded = True
            yield batch
        if not yielded:
            raise ValueError(f"infinite_loader: no full batch of {batch_size} per epoch")
        epoch += 1
