"""Torch datasets and loaders over :class:`~pixcli.data.readers.SegDataset`.

Augmentation randomness: item ``i`` draws from a fresh ``np.random.Generator`` seeded with
``(seed, i, worker seed, call counter)``. The worker seed (0 in the main process) is the
one the DataLoader draws for each worker from its ``generator`` (seeded in
:func:`infinite_loader`) every time workers start, i.e. every epoch unless workers persist;
the per-copy call counter advances with every item drawn. So epochs differ, and a run with
the same seeds and worker count repeats exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, get_worker_info

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

    def rng(self, i: int) -> np.random.Generator:
        """A new generator for one draw of item ``i`` (see the module docstring)."""
        self._calls += 1
        worker = get_worker_info()
        entropy = [self.seed, i, worker.seed if worker is not None else 0, self._calls]
        return np.random.default_rng(np.random.SeedSequence(entropy))

    def __getitem__(self, i: int) -> dict[str, Any]:
        image, label, _ = self.ds[i]
        h, w = image.shape[:2]
        geometry = CropGeometry((h, w), 0, 0, (h, w), False)
        if self.augment_cfg is not None:
            image, label, geometry = augment_with_geometry(
                image, label, self.augment_cfg, self.rng(i)
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


def _sampler(
    dataset: Dataset, batch_size: int, shuffle: bool, generator: torch.Generator
) -> Iterable[int] | None:
    """For datasets smaller than one batch: repeat items so every batch is full."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0 or n >= batch_size:
        return None
    if shuffle:
        return RandomSampler(dataset, num_samples=batch_size, generator=generator)
    return list(range(n)) * math.ceil(batch_size / n)


def infinite_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    seed: int = 0,
    num_workers: int = 0,
    drop_last: bool = True,
    sampler: Any = None,
) -> Iterator[dict[str, Any]]:
    """Batches from ``dataset`` forever, epoch after epoch.

    Shuffling and worker seeds come from a generator seeded with ``seed``. A
    ``DistributedSampler`` given as ``sampler`` gets ``set_epoch`` before every epoch.
    A dataset smaller than one batch is repeated so batches stay full.
    """
    if len(dataset) == 0:  # type: ignore[arg-type]
        raise ValueError("infinite_loader: the dataset is empty")
    generator = torch.Generator()
    generator.manual_seed(seed)
    if sampler is None:
        sampler = _sampler(dataset, batch_size, shuffle, generator)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        drop_last=drop_last,
        generator=generator,
        persistent_workers=num_workers > 0,
    )
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
