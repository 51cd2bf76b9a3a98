"""SegTrainSet items, per-epoch randomness and the infinite loader."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_folder, make_gta5

from pixcli.data.readers import open_dataset
from pixcli.data.training_set import SegTrainSet, infinite_loader
from pixcli.data.transforms import AugmentConfig, normalize

CFG = AugmentConfig(crop_size=(8, 8), scale_range=(0.75, 1.5), color_jitter=0.2)


@pytest.fixture
def gta(tmp_path: Path):
    return open_dataset(f"gta5:{make_gta5(tmp_path / 'gta', n=5, size=(12, 16))}")


def test_item_types_and_shapes(gta) -> None:
    item = SegTrainSet(gta, CFG)[2]
    assert item["index"] == 2
    assert item["image"].shape == (3, 8, 8) and item["image"].dtype == torch.float32
    assert item["label"].shape == (8, 8) and item["label"].dtype == torch.long
    assert set(item["label"].unique().tolist()) <= {0, 11, 13, 18, 255}


def test_eval_mode_is_only_normalised(gta) -> None:
    item = SegTrainSet(gta, None)[0]
    image, label, _ = gta[0]
    assert torch.equal(item["image"], normalize(image))
    assert torch.equal(item["label"], torch.from_numpy(label).long())


def test_unlabelled_gives_ignore_labels(tmp_path: Path) -> None:
    ds = open_dataset(f"folder:{make_folder(tmp_path, labels=False, size=(12, 16))}")
    item = SegTrainSet(ds, CFG)[0]
    assert item["label"].shape == (8, 8) and (item["label"] == 255).all()


def test_augmentations_differ_between_draws_but_repeat_per_seed(gta) -> None:
    def draws(seed: int) -> list[torch.Tensor]:
        ts = SegTrainSet(gta, CFG, seed=seed)
        return [ts[0]["image"] for _ in range(3)]

    first, again, other = draws(0), draws(0), draws(1)
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[1], first[2])
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not torch.equal(first[0], other[0])


def test_infinite_loader_cycles_epochs(gta) -> None:
    it = infinite_loader(SegTrainSet(gta, CFG), batch_size=2, seed=3)
    batches = [next(it) for _ in range(5)]  # 2 full batches per epoch (drop_last)
    assert all(b["image"].shape == (2, 3, 8, 8) for b in batches)
    assert all(b["label"].shape == (2, 8, 8) for b in batches)
    epoch0 = sorted(torch.cat([b["index"] for b in batches[:2]]).tolist())
    assert len(set(epoch0)) == 4


def test_infinite_loader_dataset_smaller_than_batch(gta) -> None:
    small = SegTrainSet(gta.subset([0, 1]), CFG)
    for shuffle in (True, False):
        batch = next(infinite_loader(small, batch_size=5, shuffle=shuffle))
        assert batch["image"].shape[0] == 5
        assert set(batch["index"].tolist()) == {0, 1}


def test_infinite_loader_calls_set_epoch(gta) -> None:
    class Sampler:
        def __init__(self) -> None:
            self.epochs: list[int] = []

        def set_epoch(self, epoch: int) -> None:
            self.epochs.append(epoch)

        def __iter__(self):
            return iter([4, 3])

        def __len__(self) -> int:
            return 2

    sampler = Sampler()
    it = infinite_loader(SegTrainSet(gta, None), batch_size=1, sampler=sampler)
    assert [int(next(it)["index"]) for _ in range(5)] == [4, 3, 4, 3, 4]
    assert sampler.epochs == [0, 1, 2]


def test_workers_give_new_augmentations_each_epoch(gta) -> None:
    ds = SegTrainSet(gta.subset([0]), CFG)
    it = infinite_loader(ds, batch_size=1, num_workers=1, seed=0)
    images = [next(it)["image"] for _ in range(3)]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    np.testing.assert_array_equal(images[0].shape, (1, 3, 8, 8))


def test_geometry_locates_the_crop_in_the_resized_image():
    """Cutting the recorded window out of the resized (and flipped) source image gives back
    exactly the augmented crop: the label map, an exact nearest-neighbour quantity."""
    from pixcli.data.training_set import geometry_from_tensor
    from pixcli.data.transforms import resize

    rng_img = np.random.default_rng(0)
    image = rng_img.integers(0, 255, (20, 30, 3), dtype=np.uint8)
    label = rng_img.integers(0, 5, (20, 30), dtype=np.uint8)

    class One:
        taxonomy = None

        def __len__(self) -> int:
            return 1

        def __getitem__(self, i: int):
            return image, label, "x"

    cfg = AugmentConfig(crop_size=(8, 12), scale_range=(0.8, 1.6), flip=True)
    ds = SegTrainSet(One(), cfg, seed=1)  # type: ignore[arg-type]
    flips = set()
    for _ in range(12):
        item = ds[0]
        g = geometry_from_tensor(item["geometry"])
        _, resized = resize(image, label, g.resized)
        window = resized[g.top : g.top + g.crop[0], g.left : g.left + g.crop[1]]
        if g.flip:
            window = window[:, ::-1]
        assert np.array_equal(item["label"].numpy(), window)
        flips.add(g.flip)
    assert flips == {True, False}
