"""The semi-supervised step (UniMatch): strong views, CutMix, masks; adapt --setting semi."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tiny import random_checkpoint, tiny_warmup
from torch import Tensor, nn

from pixcli.artifacts import load_checkpoint
from pixcli.data.mixing import (
    PhotometricConfig,
    _luma,
    cutmix_boxes,
    grayscale,
    hue_shift,
    photometric_view,
)
from pixcli.data.training_set import geometry_to_tensor, inside_image
from pixcli.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    AugmentConfig,
    CropGeometry,
    augment_with_geometry,
)
from pixcli.engine.runtime import Runtime
from pixcli.engine.self_training import SelfTrainingConfig
from pixcli.engine.semi_step import UniMatchConfig, UniMatchStep
from pixcli.errors import UserError
from pixcli.losses.self_training import confident_pseudo_labels, weighted_cross_entropy
from pixcli.methods import Method, MethodSetup, StepContext
from pixcli.methods.pixl import PiXL
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.models.segmentor import SegOutput
from stages import adapt

MEAN = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
STD = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def _normalised(b: int = 2, h: int = 6, w: int = 9, low: float = 0.0, high: float = 1.0) -> Tensor:
    img = low + (high - low) * torch.rand(b, 3, h, w, generator=torch.Generator().manual_seed(0))
    return (img - MEAN) / STD


# -- augmentation ---------------------------------------------------------------------------
def test_grayscale_puts_the_luma_in_every_channel():
    x = _normalised()
    img = x * STD + MEAN
    grey = grayscale(x) * STD + MEAN
    luma = 0.299 * img[:, 0] + 0.587 * img[:, 1] + 0.114 * img[:, 2]
    for c in range(3):
        assert torch.allclose(grey[:, c], luma, atol=1e-5)


def test_hue_shift_keeps_the_luma_and_changes_the_colour():
    x = _normalised(low=0.4, high=0.6)  # no clamping at 0 or 1
    shifted = hue_shift(x, 0.25, torch.Generator().manual_seed(1))
    before, after = x * STD + MEAN, shifted * STD + MEAN
    assert torch.allclose(_luma(before), _luma(after), atol=1e-5)
    assert (before - after).abs().max() > 1e-3
    assert torch.equal(hue_shift(x, 0.0), x)


def test_photometric_view_obeys_its_probabilities():
    x = _normalised(b=8)
    off = PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0)
    assert torch.equal(photometric_view(x, off), x)
    grey_only = PhotometricConfig(jitter_prob=0.0, grayscale_prob=1.0, blur_prob=0.0)
    g = photometric_view(x, grey_only) * STD + MEAN
    assert torch.allclose(g[:, 0], g[:, 1], atol=1e-5) and torch.allclose(
        g[:, 1], g[:, 2], atol=1e-5
    )
    some = PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.5, blur_prob=0.0)
    s = photometric_view(x, some, torch.Generator().manual_seed(0)) * STD + MEAN
    greyed = [bool(torch.allclose(img[0], img[1], atol=1e-5)) for img in s]
    assert 0 < sum(greyed) < 8  # some, not all, of the 8 images


def test_cutmix_boxes_are_single_rectangles_of_the_stated_size():
    gen = torch.Generator().manual_seed(0)
    h, w = 40, 60
    masks = cutmix_boxes(64, (h, w), gen, prob=1.0)
    assert masks.shape == (64, 1, h, w)
    for m in masks[:, 0]:
        ys, xs = torch.nonzero(m, as_tuple=True)
        height, width = int(ys.max() - ys.min() + 1), int(xs.max() - xs.min() + 1)
        assert m.sum() == height * width  # the bounding box is full: one rectangle
        assert 0.01 * h * w <= height * width <= 0.4 * h * w
    assert not cutmix_boxes(4, (h, w), gen, prob=0.0).any()
    half = cutmix_boxes(64, (h, w), gen, prob=0.5)
    assert 16 <= int(half.flatten(1).any(1).sum()) <= 48


def test_inside_image_matches_the_label_padding_of_a_crop():
    image = np.zeros((20, 30, 3), dtype=np.uint8)
    label = np.zeros((20, 30), dtype=np.uint8)
    cfg = AugmentConfig(crop_size=(24, 24), scale_range=(0.5, 1.5), flip=True)
    flipped = padded = 0
    for seed in range(12):
        _, lab, g = augment_with_geometry(image, label, cfg, np.random.default_rng(seed))
        got = inside_image(geometry_to_tensor(g)[None])[0]
        assert torch.equal(got, torch.from_numpy(lab != 255))
        flipped += g.flip
        padded += not got.all()
    assert flipped and padded  # the seeds cover flipped and padded crops


def test_confident_pseudo_labels_threshold_per_pixel():
    probs = torch.tensor([[0.95, 0.5, 0.2], [0.05, 0.5, 0.8]]).view(1, 2, 1, 3)
    valid = torch.tensor([[[True, True, False]]])
    labels, weights = confident_pseudo_labels(probs, 0.8, valid)
    assert labels.tolist() == [[[0, 0, 255]]]
    assert weights.tolist() == [[[1.0, 0.0, 1.0]]]  # >= threshold, as UniMatch
    # UniMatch's loss: CE of the confident pixels over the count of valid pixels
    logits = torch.zeros(1, 2, 1, 3)
    assert weighted_cross_entropy(logits, labels, weights).item() == pytest.approx(
        float(torch.log(torch.tensor(2.0))) / 2
    )


def test_feature_dropout_perturbs_the_segmentor_only_when_asked():
    torch.manual_seed(0)
    model = build_segmentor(
        SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=8)
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        clean = model(x).logits
        assert torch.equal(model(x, feature_dropout=0.0).logits, clean)
        assert not torch.allclose(model(x, feature_dropout=0.5).logits, clean)


# -- the step -------------------------------------------------------------------------------
class Pointwise(nn.Module):
    """A per-pixel model (1x1 conv), so that its output on a mixed image is the mix of its
    outputs; records the ``feature_dropout`` it is called with."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        with torch.no_grad():
            self.conv.weight.copy_(
                3 * torch.randn(3, 3, 1, 1, generator=torch.Generator().manual_seed(0))
            )
        self.calls: list[float] = []

    def forward(self, x: Tensor, feature_dropout: float = 0.0) -> SegOutput:
        self.calls.append(feature_dropout)
        if feature_dropout > 0:
            x = F.dropout2d(x, feature_dropout)
        logits = self.conv(x)
        return SegOutput(logits=logits, features=logits)


class Recorder(Method):
    def losses(self, ctx: StepContext) -> dict[str, Tensor]:
        self.ctx = ctx
        return {}


def _batches(images: list[Tensor], geometries: list[Tensor]) -> Iterator[dict]:
    while True:
        for i, (image, g) in enumerate(zip(images, geometries, strict=True)):
            yield {"image": image, "label": torch.zeros(image.shape[0], *image.shape[-2:]).long(),
                   "index": torch.arange(2) + 2 * i, "geometry": g}  # fmt: skip


def test_unimatch_step_cuts_images_labels_and_teacher_logits_consistently():
    h = w = 8
    own, partner = _normalised(2, h, w), _normalised(2, h, w).flip(0).roll(3, -1)
    full = geometry_to_tensor(CropGeometry((h, w), 0, 0, (h, w), False))
    short = geometry_to_tensor(CropGeometry((5, w), 0, 0, (h, w), False))  # 3 padded rows
    geometries = [full.repeat(2, 1), short.repeat(2, 1)]
    student = Pointwise()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    reference = copy.deepcopy(teacher)
    method = Recorder(MethodSetup(num_classes=3, feature_dim=3, device=torch.device("cpu")))
    with torch.no_grad():
        own_conf = reference(own).logits.softmax(1).amax(1)
    threshold = float(own_conf.median())
    semi = UniMatchConfig(
        confidence_threshold=threshold, cutmix_prob=1.0,
        strong=PhotometricConfig(jitter_prob=0.0, grayscale_prob=0.0, blur_prob=0.0),
    )  # fmt: skip
    step = UniMatchStep(
        semi, SelfTrainingConfig(), Runtime(device=torch.device("cpu")), student, teacher,
        method, torch.optim.SGD(student.parameters(), lr=0.1),
        torch.amp.GradScaler("cuda", enabled=False),
        _batches([own], [full.repeat(2, 1)]), _batches([own, partner], geometries),
    )  # fmt: skip
    logs = step(0)
    ctx = method.ctx
    assert len(ctx.strong_views) == 2 and ctx.mix_mask is not None and ctx.mix_mask.any()
    assert not torch.equal(ctx.strong_views[0].image, ctx.strong_views[1].image)
    # image and labels: inside the box the partner's, elsewhere the image's own
    box = ctx.mix_mask.bool()
    assert torch.equal(ctx.mixed_image, torch.where(box, partner, own))
    partner_valid = torch.arange(h).view(1, h, 1).expand(2, h, w) < 5
    assert torch.equal(ctx.strong_views[0].valid, torch.where(box[:, 0], partner_valid, True))
    strong_ce = []
    with torch.no_grad():
        for view in ctx.strong_views:
            expected_logits = reference(view.image).logits  # a pointwise teacher on the mix
            assert torch.allclose(view.teacher_logits, expected_logits, atol=1e-6)
            labels, weights = confident_pseudo_labels(
                expected_logits.softmax(1), threshold, view.valid
            )
            strong_ce.append(weighted_cross_entropy(view.student.logits, labels, weights))
            unmasked = weighted_cross_entropy(view.student.logits, labels, torch.ones_like(weights))
            assert not torch.isclose(strong_ce[-1], unmasked)
    assert logs["ce_strong"] == pytest.approx(float(sum(strong_ce) / 2), rel=1e-5)
    # the threshold keeps about half of the image's own pixels
    assert logs["confident"] == pytest.approx(float((own_conf >= threshold).float().mean()))
    # the FP stream: the student once on the weak images with Dropout2d(0.5)
    assert student.calls.count(0.5) == 1 and "ce_fp" in logs
    assert logs["ce_labelled"] == pytest.approx(
        0.5 * float(F.cross_entropy(ctx.student_labelled.logits.detach(), ctx.labelled_label)),
        rel=1e-5,
    )


# -- adapt --setting semi -------------------------------------------------------------------
@pytest.fixture(scope="module")
def init(tmp_path_factory: pytest.TempPathFactory) -> Path:
    model = SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=16)
    return random_checkpoint(tmp_path_factory.mktemp("init") / "init.pt", model)


def _semi(bench: Path, **unimatch: object) -> adapt.AdaptConfig:
    base = tiny_warmup(bench)
    cfg = adapt.AdaptConfig(
        setting="semi", labeled_fraction=0.5, target=f"cityscapes:{bench / 'target'}",
        device="cpu", batch_size=2, num_workers=0, optim=base.optim, loop=base.loop,
        augment=base.augment,
    )  # fmt: skip
    cfg.loop.iterations = 2
    cfg.unimatch.confidence_threshold = 0.0  # an untrained model is never 95% sure
    for k, v in unimatch.items():
        setattr(cfg.unimatch, k, v)
    return cfg


def _log(out: Path) -> list[dict]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "ce_labelled" in e]


def test_adapt_semi_none_runs_unimatch_with_an_ema_teacher(
    tiny_bench: Path, init: Path, tmp_path: Path
):
    manifest = adapt.run(_semi(tiny_bench), init, tmp_path / "u")
    assert manifest["results"]["consistency"] == "unimatch"
    assert all(
        e["ce_strong"] > 0 and e["ce_fp"] > 0 and e["confident"] == 1.0
        for e in _log(tmp_path / "u")
    )
    state = load_checkpoint(tmp_path / "u" / "last.pt")["train_state"]["modules"]
    key = "classifier.1.weight"
    assert not torch.equal(state["teacher"][key], state["model"][key])


def test_adapt_semi_with_the_student_as_teacher(tiny_bench: Path, init: Path, tmp_path: Path):
    cfg = _semi(tiny_bench, ema_teacher=False, dual_strong=False, feature_perturbation=False)
    adapt.run(cfg, init, tmp_path / "s")
    assert all("ce_fp" not in e and e["ce_strong"] > 0 for e in _log(tmp_path / "s"))
    state = load_checkpoint(tmp_path / "s" / "last.pt")["train_state"]["modules"]
    for key, value in state["model"].items():
        assert torch.equal(state["teacher"][key], value), key


def test_consistency_follows_the_setting_unless_chosen(tiny_bench: Path, init: Path):
    cfg = _semi(tiny_bench)
    assert adapt.consistency(cfg) == "unimatch"
    cfg.setting = "uda"
    assert adapt.consistency(cfg) == "dacs"
    cfg.self_training.consistency = "unimatch"
    assert adapt.consistency(cfg) == "unimatch"
    cfg.self_training.consistency = "fixmatch"
    with pytest.raises(UserError, match="self_training.consistency 'fixmatch'"):
        adapt.run(cfg, init, Path("/nonexistent/never-written"))


def test_pixl_keeps_the_dacs_step_in_semi_unless_unimatch_is_chosen(tiny_bench: Path):
    cfg = _semi(tiny_bench)
    cfg.method = "pixl"
    assert adapt.consistency(cfg, PiXL) == "dacs"
    cfg.self_training.consistency = "unimatch"
    assert adapt.consistency(cfg, PiXL) == "unimatch"

    class DacsOnly(PiXL):
        steps = ("dacs",)

    with pytest.raises(UserError, match="--method pixl works with self_training.consistency dacs"):
        adapt.consistency(cfg, DacsOnly)


def test_adapt_semi_pixl_on_the_unimatch_step(tiny_bench: Path, init: Path, tmp_path: Path):
    cfg = _semi(tiny_bench)
    cfg.method = "pixl"
    cfg.self_training.consistency = "unimatch"
    cfg.pixl.lr_scale = 0.5  # the student sees X^L of the strong views: 16x16 of 32x32
    seen: list[tuple[int, ...]] = []
    original = PiXL.student_input

    def student_input(self: PiXL, image: Tensor) -> Tensor:
        out = original(self, image)
        seen.append(tuple(out.shape[-2:]))
        return out

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(PiXL, "student_input", student_input)
        manifest = adapt.run(cfg, init, tmp_path / "p")
    assert manifest["results"]["consistency"] == "unimatch"
    assert seen and set(seen) == {(16, 16)}  # labelled and both strong views, every step
    steps = _log(tmp_path / "p")
    assert len(steps) == 2
    assert all(e["ce_strong"] > 0 and e["ce_fp"] > 0 and e["ce_high"] > 0 for e in steps)
    assert all("dpa" in e for e in steps)


@pytest.mark.slow
def test_semi_ipixmatch_under_torchrun(tiny_bench: Path, init: Path, tmp_path: Path):
    """torchrun, 2 CPU processes (gloo, DDP): the FP forward's keyword reaches the model."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixcli", "adapt", "--method", "ipixmatch", "--setting", "semi",
           "--labeled-fraction", "0.5", "--checkpoint", str(init),
           "--target", f"cityscapes:{tiny_bench / 'target'}", "--iterations", "2",
           "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path),
           "--set", "num_workers=0", "--set", "augment.crop_size=[32, 32]",
           "--set", "unimatch.confidence_threshold=0.0", "--set", "ipixmatch.tau=0.0",
           "--set", "loop.log_every=1"]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert all(e["ipix_raw"] > 0 and e["ce_fp"] > 0 for e in _log(tmp_path))


class PointwiseNorm(Pointwise):
    """:class:`Pointwise` followed by a BatchNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(3)

    def forward(self, x: Tensor, feature_dropout: float = 0.0) -> SegOutput:
        logits = self.norm(super().forward(x, feature_dropout).logits)
        return SegOutput(logits=logits, features=logits)


@pytest.mark.parametrize("feature_perturbation", [True, False])
def test_unimatch_fp_stream_leaves_batchnorm_running_statistics_alone(
    feature_perturbation: bool,
) -> None:
    """With or without the FP forward, a step leaves the same running statistics."""
    h = w = 8
    images = [_normalised(2, h, w), _normalised(2, h, w).flip(0)]
    full = geometry_to_tensor(CropGeometry((h, w), 0, 0, (h, w), False)).repeat(2, 1)
    stats = []
    for fp in (feature_perturbation, False):
        torch.manual_seed(0)
        student = PointwiseNorm()
        teacher = copy.deepcopy(student).eval().requires_grad_(False)
        method = Recorder(MethodSetup(num_classes=3, feature_dim=3, device=torch.device("cpu")))
        semi = UniMatchConfig(confidence_threshold=0.0, feature_perturbation=fp)
        step = UniMatchStep(
            semi, SelfTrainingConfig(), Runtime(device=torch.device("cpu")), student, teacher,
            method, torch.optim.SGD(student.parameters(), lr=0.0),
            torch.amp.GradScaler("cuda", enabled=False),
            _batches(images[:1], [full]), _batches(images, [full, full]),
        )  # fmt: skip
        logs = step(0)
        assert ("ce_fp" in logs) == fp
        stats.append((student.norm.running_mean.clone(), student.norm.running_var.clone()))
    assert torch.equal(stats[0][0], stats[1][0]) and torch.equal(stats[0][1], stats[1][1])
    assert not torch.equal(stats[0][0], torch.zeros(3))  # the other forwards did update them


def test_semi_teacher_norm_batch_reaches_the_unimatch_teacher(
    tiny_bench: Path, init: Path, tmp_path: Path
):
    """The same first UniMatch step with the teacher normalising its batch by its own
    BatchNorm statistics trains on other pseudo labels: other strong-view losses."""
    first = {}
    for norm in ("running", "batch"):
        cfg = _semi(tiny_bench)
        cfg.loop.iterations, cfg.loop.log_every = 1, 1
        cfg.self_training.teacher_norm = norm
        adapt.run(cfg, init, tmp_path / norm)
        first[norm] = _log(tmp_path / norm)[0]
    assert first["batch"]["ce_labelled"] == first["running"]["ce_labelled"]
    assert first["batch"]["ce_strong"] != first["running"]["ce_strong"]
