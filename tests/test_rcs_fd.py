"""Rare-class sampling and the ImageNet feature distance of the shared loop (DAFormer Eq. 6-8)."""

from __future__ import annotations

import json
import math
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from tiny import random_checkpoint, tiny_warmup

from pixcli.data.rare_class import RareClassSampler, class_pixel_counts, rcs_probabilities
from pixcli.data.readers import open_dataset
from pixcli.engine.imagenet_fd import ImageNetFeatureDistance
from pixcli.errors import UserError
from pixcli.losses.feature_distance import feature_distance, thing_mask
from pixcli.models import SegmentorConfig, build_segmentor
from stages import adapt

# three images, three classes: class 2 is rare (1 + 2 of 152 pixels)
COUNTS = np.array([[60, 0, 0], [40, 30, 2], [0, 19, 1]])


def test_rcs_probabilities_by_hand():
    sampler = RareClassSampler(COUNTS, batch_size=2, temperature=0.01, min_pixels=1)
    f = np.array([100, 49, 3]) / 152
    assert np.allclose(sampler.frequencies, f)
    e = [math.exp((1 - fc) / 0.01) for fc in f]
    assert np.allclose(sampler.probabilities, [x / sum(e) for x in e])
    assert sampler.probabilities[2] > 0.99  # the rare class gets most of the mass
    flat = rcs_probabilities(np.array([0.5, 0.5]), 0.01)
    assert np.allclose(flat, [0.5, 0.5])
    assert rcs_probabilities(np.array([0.9, 0.1]), 1e6)[0] == pytest.approx(0.5)  # T -> inf


def test_min_pixels_drops_images_and_classes():
    sampler = RareClassSampler(COUNTS, batch_size=1, min_pixels=3)
    assert sampler.classes.tolist() == [0, 1]  # no image has 3 pixels of class 2
    assert sampler.images[1].tolist() == [1, 2]
    with pytest.raises(UserError, match="rcs_min_pixels"):
        RareClassSampler(COUNTS, batch_size=1, min_pixels=100)


def test_sampled_images_contain_the_drawn_class_and_seed_repeats():
    sampler = RareClassSampler(COUNTS, batch_size=4, temperature=0.1, min_pixels=2, seed=5)
    drawn = []
    for k in range(50):
        classes, images = sampler.global_draw(k)
        assert all(COUNTS[i, c] >= 2 for c, i in zip(classes, images, strict=True))
        drawn.extend(classes.tolist())
    assert set(drawn) == {0, 1, 2}
    again = RareClassSampler(COUNTS, batch_size=4, temperature=0.1, min_pixels=2, seed=5)
    assert list(islice(sampler, 40)) == list(islice(again, 40))
    other = RareClassSampler(COUNTS, batch_size=4, temperature=0.1, min_pixels=2, seed=6)
    assert list(islice(sampler, 40)) != list(islice(other, 40))
    resumed = RareClassSampler(COUNTS, 4, 0.1, 2, seed=5, start=3)
    assert list(islice(resumed, 8)) == list(islice(sampler, 12, 20))


def test_rank_slices_of_two_ranks_equal_the_one_rank_draw():
    one = list(islice(RareClassSampler(COUNTS, 4, 0.1, 1, seed=1), 12))
    ranks = [list(islice(RareClassSampler(COUNTS, 2, 0.1, 1, seed=1, rank=r, world_size=2), 6))
             for r in (0, 1)]  # fmt: skip
    interleaved = [i for k in range(3) for r in (0, 1) for i in ranks[r][2 * k : 2 * k + 2]]
    assert interleaved == one


def test_class_pixel_counts_of_the_tiny_source(tiny_bench: Path):
    ds = open_dataset(f"gta5:{tiny_bench / 'source'}", "train")
    counts = class_pixel_counts(ds, 19)
    label = ds.read_label(0)
    assert counts.shape == (len(ds), 19)
    assert counts[0].sum() == int((label < 19).sum())
    assert counts[0, int(label[0, 0])] == int((label == label[0, 0]).sum()) or label[0, 0] >= 19


def test_thing_mask_and_distance_by_hand():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2, :2] = 11  # top-left cell all thing
    labels[0, :2, 2:] = torch.tensor([[13, 13], [13, 0]])  # 3/4 thing: counts at 0.75
    labels[0, 2:, :2] = torch.tensor([[13, 11], [0, 0]])  # two thing classes, 1/4 each
    mask = thing_mask(labels, (2, 2), (11, 13), 0.75)
    assert mask.tolist() == [[[True, True], [False, False]]]
    f = torch.zeros(1, 2, 2, 2, requires_grad=True)
    ref = torch.zeros(1, 2, 2, 2)
    ref[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5 at the first thing cell
    ref[0, :, 1, 1] = 7.0  # not a thing cell: ignored
    loss = feature_distance(f, ref, mask)
    assert float(loss.detach()) == pytest.approx(5.0 / 2)  # mean over the two thing cells


def _student(tmp_path: Path, pretrained: bool) -> torch.nn.Module:
    changes = {}
    if pretrained:
        torch.manual_seed(5)  # "ImageNet" weights unlike the seeded initialisation
        weights = tmp_path / "imagenet.pth"
        torch.save(timm.create_model("test_resnet").state_dict(), weights)
        changes["weights_file"] = str(weights)
    torch.manual_seed(0)
    cfg = SegmentorConfig(backbone="test_resnet", num_classes=4, feature_dim=8, **changes)
    return build_segmentor(cfg)


def test_fd_is_zero_at_the_imagenet_weights_and_never_trains_the_copy(tmp_path: Path):
    student = _student(tmp_path, pretrained=True).eval()
    fd = ImageNetFeatureDistance(student, torch.device("cpu"), (3,), 0.5)
    x = torch.randn(2, 3, 32, 32)
    y = torch.full((2, 32, 32), 3)
    _, loss = fd(student, x, y)
    assert float(loss.detach()) == pytest.approx(0.0, abs=1e-5)  # the student starts at the copy
    with torch.no_grad():
        next(student.backbone.parameters()).add_(0.5)
    out, loss = fd(student, x, y)
    assert float(loss.detach()) > 0 and out.logits.shape[:2] == (2, 4)
    loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in fd.backbone.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert all(p.grad is None for p in student.decoder.parameters())


def test_fd_needs_imagenet_weights_and_known_thing_classes(tmp_path: Path):
    with pytest.raises(UserError, match="pretrained or model.weights_file"):
        ImageNetFeatureDistance(_student(tmp_path, False), torch.device("cpu"), (3,))
    with pytest.raises(UserError, match="outside the model's 4 classes"):
        ImageNetFeatureDistance(_student(tmp_path, True), torch.device("cpu"), (3, 11))


def _cfg(bench: Path) -> adapt.AdaptConfig:
    base = tiny_warmup(bench)
    base.loop.iterations = 2
    return adapt.AdaptConfig(
        source=f"gta5:{bench / 'source'}", target=f"cityscapes:{bench / 'target'}",
        device="cpu", batch_size=2, num_workers=0, optim=base.optim, loop=base.loop,
        augment=base.augment,
    )  # fmt: skip


def test_adapt_with_rare_class_sampling(
    tiny_bench: Path, warm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    draws: list[np.ndarray] = []

    class Spy(RareClassSampler):
        def global_draw(self, k: int) -> tuple[np.ndarray, np.ndarray]:
            classes, images = super().global_draw(k)
            draws.append(classes)
            return classes, images

    monkeypatch.setattr(adapt, "RareClassSampler", Spy)
    cfg = _cfg(tiny_bench)
    cfg.self_training.rare_class_sampling = True
    adapt.run(cfg, warm, tmp_path / "out")
    steps = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").open()]
    assert [s["step"] for s in steps if "ce_labelled" in s][-1] == 2
    assert len(draws) >= 2  # the labelled stream came from the sampler


def test_adapt_feature_distance_without_imagenet_weights_is_a_user_error(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    cfg = _cfg(tiny_bench)
    cfg.self_training.feature_distance = 0.005
    with pytest.raises(UserError, match="feature_distance"):
        adapt.run(cfg, warm, tmp_path / "out")


def test_adapt_with_feature_distance_on_an_imagenet_backbone(tiny_bench: Path, tmp_path: Path):
    weights = _student(tmp_path, pretrained=True).config.weights_file
    model = SegmentorConfig(backbone="test_resnet", feature_dim=16, weights_file=weights)
    checkpoint = random_checkpoint(tmp_path / "init.pt", model)
    cfg = _cfg(tiny_bench)
    cfg.self_training.feature_distance = 0.005
    cfg.self_training.fd_min_ratio = 0.01  # the tiny crops' thing cells are small
    adapt.run(cfg, checkpoint, tmp_path / "out")
    steps = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").open()]
    fd = [s["fd"] for s in steps if "fd" in s]
    assert len(fd) == 2 and all(v >= 0 for v in fd)
