"""IPixMatch: the inter-pixel relation loss (Eq. 2-6) and ``adapt --method ipixmatch``."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tiny import random_checkpoint, tiny_warmup
from typer.testing import CliRunner

from pixcli.cli import app
from pixcli.errors import UserError
from pixcli.losses.ipixmatch import (
    IPixMatchConfig,
    confident_region,
    inter_pixel_loss,
    ramp_up,
)
from pixcli.methods import METHODS, MethodSetup, StepContext
from pixcli.methods.base import StrongView
from pixcli.methods.ipixmatch import IPixMatch
from pixcli.models import SegmentorConfig
from pixcli.models.segmentor import SegOutput
from stages import adapt


def _direct(p: list[list[float]], q: list[list[float]], t: float, distance: str) -> float:
    """Eq. 2 by hand, with python floats: ``p``, ``q`` are C lists of the Omega pixels' logits."""

    def psi(z: list[float]) -> list[float]:
        e = [math.exp(v / t) for v in z]
        return [v / sum(e) for v in e]

    total = 0.0
    for pk, qk in zip(p, q, strict=True):
        u, v = psi(pk), psi(qk)
        if distance == "kl":
            total += sum(a * math.log(a / b) for a, b in zip(u, v, strict=True))
        else:
            mu, mv = sum(u) / len(u), sum(v) / len(v)
            cov = sum((a - mu) * (b - mv) for a, b in zip(u, v, strict=True))
            su = math.sqrt(sum((a - mu) ** 2 for a in u))
            sv = math.sqrt(sum((b - mv) ** 2 for b in v))
            total += 1 - cov / (su * sv)
    return total / (len(p) * math.log(len(p[0])))


# one image, C = 2 classes, 1 x 4 pixels; the teacher is confident (> 0.8) at pixels 0, 1, 3
TEACHER = torch.tensor([[[[4.0, 0.5, 1.0, -3.0]], [[0.0, 3.0, 0.8, 1.0]]]])
STUDENT = torch.tensor([[[[1.0, -0.5, 2.0, 0.0]], [[0.5, 2.0, -1.0, 1.5]]]])


@pytest.mark.parametrize("distance", ["kl", "correlation"])
def test_loss_equals_a_direct_computation_over_omega(distance: str):
    omega = confident_region(TEACHER, 0.8)
    assert omega.tolist() == [[[True, True, False, True]]]
    loss = inter_pixel_loss(TEACHER, STUDENT, omega, 4.0, distance)
    keep = [0, 1, 3]
    p = [[TEACHER[0, k, 0, j].item() for j in keep] for k in range(2)]
    q = [[STUDENT[0, k, 0, j].item() for j in keep] for k in range(2)]
    assert loss.item() == pytest.approx(_direct(p, q, 4.0, distance), rel=1e-5)
    assert loss.item() > 0


@pytest.mark.parametrize("distance", ["kl", "correlation"])
def test_loss_is_zero_when_teacher_and_student_agree(distance: str):
    logits = torch.randn(2, 5, 6, 7, generator=torch.Generator().manual_seed(0))
    omega = confident_region(logits, 0.0)
    loss = inter_pixel_loss(logits, logits.clone(), omega, 4.0, distance)
    assert loss.abs().item() < 1e-6
    other = inter_pixel_loss(logits, logits.roll(1, dims=-1), omega, 4.0, distance)
    assert other.item() > 1e-3


def test_normalised_by_c_log_omega():
    """Tiling the pixels k times leaves each KL term unchanged but makes |Omega| k times as
    large: the loss scales by log n / log(k n)."""
    omega = torch.ones(1, 1, 3, dtype=torch.bool)
    t, s = TEACHER[..., :3], STUDENT[..., :3]
    base = inter_pixel_loss(t, s, omega, 4.0, "kl")
    tiled = inter_pixel_loss(t.repeat(1, 1, 1, 4), s.repeat(1, 1, 1, 4), omega.repeat(1, 1, 4))
    # psi over 4 copies: every probability / 4, so every log-ratio and the KL sum is the same
    assert tiled.item() == pytest.approx(base.item() * math.log(3) / math.log(12), rel=1e-5)


def test_temperature_smooths_the_spatial_distribution():
    omega = confident_region(TEACHER, 0.8)
    hot = inter_pixel_loss(TEACHER, STUDENT, omega, 1.0)
    cold = inter_pixel_loss(TEACHER, STUDENT, omega, 4.0)
    assert hot.item() > cold.item() > 0


def test_images_with_fewer_than_two_omega_pixels_are_skipped():
    teacher = torch.cat([TEACHER, TEACHER])
    student = torch.cat([STUDENT, STUDENT.flip(-1)])
    omega = confident_region(teacher, 0.8)
    omega[1] = False
    omega[1, 0, 2] = True  # |Omega| = 1: log 1 = 0, skipped
    both = inter_pixel_loss(teacher, student, omega)
    first = inter_pixel_loss(teacher[:1], student[:1], omega[:1])
    assert torch.isfinite(both) and both.item() == pytest.approx(first.item())
    student_leaf = student.clone().requires_grad_(True)
    none = inter_pixel_loss(teacher, student_leaf, torch.zeros_like(omega))
    none.backward()
    assert none.item() == 0.0 and student_leaf.grad is not None
    assert not student_leaf.grad.any()


def test_no_gradient_into_the_teacher():
    teacher = TEACHER.clone().requires_grad_(True)
    student = STUDENT.clone().requires_grad_(True)
    inter_pixel_loss(teacher, student, confident_region(teacher, 0.8)).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    # pixels outside Omega get no gradient either
    assert not student.grad[0, :, 0, 2].any()


def test_omega_is_strictly_above_tau_and_inside_valid():
    logits = torch.log(torch.tensor([0.8, 0.2])).view(1, 2, 1, 1).expand(1, 2, 1, 3).clone()
    logits[0, 0, 0, 1] = 5.0
    assert confident_region(logits, 0.8).tolist() == [[[False, True, False]]]
    valid = torch.tensor([[[True, False, True]]])
    assert not confident_region(logits, 0.5, valid)[0, 0, 1]


def test_ramp_up_is_gaussian_over_the_warmup():
    assert ramp_up(0, 100) == pytest.approx(math.exp(-5))
    assert ramp_up(50, 100) == pytest.approx(math.exp(-1.25))
    assert ramp_up(100, 100) == 1.0 and ramp_up(400, 100) == 1.0
    assert ramp_up(0, 0) == 1.0


def _setup(total_steps: int = 100) -> MethodSetup:
    return MethodSetup(
        num_classes=2,
        feature_dim=4,
        device=torch.device("cpu"),
        unlabelled=object(),  # type: ignore[arg-type]
        total_steps=total_steps,
    )


def test_method_averages_views_and_applies_the_ramped_alpha():
    cfg = IPixMatchConfig(alpha=2.0, warmup_fraction=0.5)
    method = IPixMatch(_setup(100), cfg)
    image = torch.zeros(1, 3, 1, 4)
    valid = torch.ones(1, 1, 4, dtype=torch.bool)
    views = [
        StrongView(image, TEACHER, valid, SegOutput(STUDENT, STUDENT)),
        StrongView(image, TEACHER, valid, SegOutput(STUDENT.flip(-1), STUDENT)),
    ]
    ctx = StepContext(step=25, labelled_image=image, labelled_label=image[:, 0].long())
    ctx.strong_views = views
    out = method.losses(ctx)
    omega = confident_region(TEACHER, 0.8)
    mean = (
        inter_pixel_loss(TEACHER, STUDENT, omega)
        + inter_pixel_loss(TEACHER, STUDENT.flip(-1), omega)
    ) / 2
    assert set(out) == {"ipix"}
    assert out["ipix"].item() == pytest.approx(2.0 * math.exp(-1.25) * mean.item(), rel=1e-5)
    assert method.losses(StepContext(step=0, labelled_image=image, labelled_label=image)) == {}


@pytest.mark.parametrize(
    ("cfg", "unlabelled", "message"),
    [
        (IPixMatchConfig(distance="l2"), True, "ipixmatch.distance"),
        (IPixMatchConfig(warmup_fraction=2.0), True, "warmup_fraction"),
        (IPixMatchConfig(), False, "needs unlabelled data"),
    ],
)
def test_method_user_errors(cfg: IPixMatchConfig, unlabelled: bool, message: str):
    setup = _setup()
    if not unlabelled:
        setup.unlabelled = None
    with pytest.raises(UserError, match=message):
        IPixMatch(setup, cfg)


def test_registered():
    assert METHODS["ipixmatch"] is IPixMatch


def test_adapt_semi_ipixmatch_from_the_command_line(tiny_bench: Path, tmp_path: Path):
    """``pixcli adapt --method ipixmatch --setting semi`` on the tiny benchmark, with the
    thresholds at 0 so that an untrained model's pixels all count."""
    model = SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=16)
    checkpoint = random_checkpoint(tmp_path / "init.pt", model)
    sets = {
        "num_workers": 0, "optim.lr": 0.01, "optim.head_lr_mult": 1.0, "loop.log_every": 1,
        "augment.crop_size": [32, 32], "augment.scale_range": [0.75, 1.25],
        "unimatch.confidence_threshold": 0.0, "ipixmatch.tau": 0.0,
        "ipixmatch.warmup_fraction": 0.67,
    }  # fmt: skip
    args = [
        "adapt", "--method", "ipixmatch", "--setting", "semi", "--labeled-fraction", "0.5",
        "--checkpoint", str(checkpoint), "--target", f"cityscapes:{tiny_bench / 'target'}",
        "--iterations", "3", "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "o"),
    ]  # fmt: skip
    for key, value in sets.items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    manifest = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert manifest["results"]["consistency"] == "unimatch"
    log = [json.loads(x) for x in (tmp_path / "o" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "ce_labelled" in e]
    assert len(steps) == 3
    assert all(e["ipix_raw"] > 0 and e["ipix_omega"] > 0.5 for e in steps)
    # alpha ramps up over round(0.67 * 3) = 2 steps: exp(-5) at step 0, exp(-1.25) at step 1
    assert steps[0]["ipix"] == pytest.approx(math.exp(-5) * steps[0]["ipix_raw"], rel=1e-4)
    assert steps[1]["ipix"] == pytest.approx(math.exp(-1.25) * steps[1]["ipix_raw"], rel=1e-4)
    assert steps[2]["ipix"] == pytest.approx(steps[2]["ipix_raw"], rel=1e-4)
    # the labelled split: half of the 4 target images
    assert len((tmp_path / "o" / "labelled.txt").read_text().split()) == 2


def test_student_logits_are_compared_at_the_input_resolution():
    """Student logits at stride 2 are upsampled to the teacher's input-size logits."""
    method = IPixMatch(_setup(), IPixMatchConfig(warmup_fraction=0.0))
    teacher = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(1)) * 3
    small = F.avg_pool2d(teacher, 2)
    image = torch.zeros(1, 3, 4, 4)
    view = StrongView(
        image, teacher, torch.ones(1, 4, 4, dtype=torch.bool), SegOutput(small, small)
    )
    ctx = StepContext(step=0, labelled_image=image, labelled_label=image[:, 0].long())
    ctx.strong_views = [view]
    up = F.interpolate(small, size=(4, 4), mode="bilinear", align_corners=False)
    expected = inter_pixel_loss(teacher, up, confident_region(teacher, 0.8))
    assert method.losses(ctx)["ipix"].item() == pytest.approx(expected.item())


def test_adapt_uda_ipixmatch_uses_the_dacs_view(tiny_bench: Path, tmp_path: Path):
    model = SegmentorConfig(backbone="test_resnet", head="deeplabv3plus", feature_dim=16)
    checkpoint = random_checkpoint(tmp_path / "init.pt", model)
    base = tiny_warmup(tiny_bench)
    cfg = adapt.AdaptConfig(
        method="ipixmatch", source=f"gta5:{tiny_bench / 'source'}",
        target=f"cityscapes:{tiny_bench / 'target'}", device="cpu", batch_size=2,
        num_workers=0, optim=base.optim, loop=base.loop, augment=base.augment,
    )  # fmt: skip
    cfg.loop.iterations = 2
    cfg.ipixmatch.tau = 0.0
    manifest = adapt.run(cfg, checkpoint, tmp_path / "u")
    assert manifest["results"]["consistency"] == "dacs"
    log = [json.loads(x) for x in (tmp_path / "u" / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "ce_labelled" in e]
    # Omega excludes the pixels ClassMix pasted from the source image
    assert all(e["ipix_raw"] > 0 and 0 < e["ipix_omega"] < 1 for e in steps)
