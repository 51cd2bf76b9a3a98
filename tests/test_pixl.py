"""PiXL: the pure functions of ``pixcli.losses.pixl`` by hand, the plug-in's multi-resolution
crops and losses on a real tiny student, the combined inference, and tiny ``adapt`` runs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from test_adapt import _cfg
from test_inference import PointwiseModel
from tiny import tiny_warmup
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint
from pixcli.cli import app
from pixcli.data.mixing import mix
from pixcli.engine.inference import InferenceConfig, predict_logits, upsampled_logits
from pixcli.errors import UserError
from pixcli.losses.pixl import (
    PiXLConfig,
    adaptive_prototypes,
    drift_pixel_contrast,
    entropy_window,
    eta_at,
    feature_distance,
    local_prototypes,
    low_resolution_size,
    partition_pixels,
    pixel_entropy,
    quantile,
    thing_mask,
)
from pixcli.methods import METHODS, Method, MethodSetup, StepContext
from pixcli.methods.pixl import FeatureMap, PiXL, crop_windows, pixel_set
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.models.segmentor import SegOutput
from stages import adapt, warmup

# ------------------------------------------------------------------ entropy and partition


def test_pixel_entropy_eq17_by_hand():
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, -1e4, -1e4]])
    h = pixel_entropy(logits, dim=1)
    # uniform over 4 classes: log 4; (3/4, 1/4, 0, 0): -(3/4 log 3/4 + 1/4 log 1/4)
    expected = [math.log(4), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))]
    assert torch.allclose(h, torch.tensor(expected), atol=1e-6)
    assert not h.requires_grad


def test_partition_splits_each_image_at_its_own_quantile():
    # image 0: entropies 0.1..1.0; the 0.8 quantile (linear) is 0.82 -> 0.9, 1.0 drift.
    # image 1: 5..9 (its low- and high-resolution pixels share index 1); 0.8 quantile 8.2.
    e0 = torch.arange(1, 11, dtype=torch.float32) / 10
    e1 = torch.tensor([9.0, 5.0, 7.0, 6.0, 8.0])
    entropy = torch.cat([e0, e1])
    image = torch.tensor([0] * 10 + [1] * 5)
    assert quantile(e0, 0.8).item() == pytest.approx(0.82)
    assert quantile(e1, 0.8).item() == pytest.approx(8.2)
    joint = partition_pixels(entropy, image, eta=0.2)
    drift = entropy[~joint]
    assert sorted(drift.tolist()) == pytest.approx([0.9, 1.0, 9.0])
    # pooled over both images the threshold would make every pixel of image 0 joint
    pooled = partition_pixels(entropy, torch.zeros_like(image), eta=0.2)
    assert bool(pooled[:10].all())
    # a larger eta moves more pixels to the drift side
    assert int((~partition_pixels(entropy, image, eta=0.5)).sum()) == 5 + 3


def test_quantile_matches_torch_quantile():
    values = torch.randn(101)
    for q in (0.0, 0.3, 0.5, 0.999, 1.0):
        assert torch.isclose(quantile(values, q), torch.quantile(values, q), atol=1e-6)


def test_eta_goes_linearly_from_02_to_0001():
    assert eta_at(0, 11) == pytest.approx(0.2)
    assert eta_at(5, 11) == pytest.approx(0.1005)
    assert eta_at(10, 11) == pytest.approx(0.001)
    assert eta_at(50, 11) == pytest.approx(0.001)  # past the end
    assert eta_at(7, 11, 0.4, 0.4) == pytest.approx(0.4)  # Table 5: a fixed eta


# ------------------------------------------------------------------------- prototypes


def test_local_prototypes_are_joint_pixel_means_with_counts():
    features = torch.tensor(
        [[1.0, 0.0], [3.0, 2.0], [5.0, 5.0], [0.0, 4.0], [9.0, 9.0]], requires_grad=True
    )
    labels = torch.tensor([0, 0, 0, 2, 2])
    joint = torch.tensor([True, True, False, True, False])
    protos, counts = local_prototypes(features, labels, joint, num_classes=3)
    assert counts.tolist() == [2, 0, 1]
    assert torch.allclose(protos, torch.tensor([[2.0, 1.0], [0.0, 0.0], [0.0, 4.0]]))
    assert not protos.requires_grad  # stop-gradient (Sec. 3.5)


def test_apg_median_rule_eq8_by_hand():
    c = 7
    low = torch.arange(1, c + 1, dtype=torch.float32)[:, None].repeat(1, 2)  # row k: k + 1
    high = -low  # row k: -(k + 1), so the sign tells which resolution was picked
    n_low = torch.tensor([10, 4, 6, 0, 2, 3, 0])
    n_high = torch.tensor([1, 9, 1, 3, 2, 1, 0])
    # median of the positive N_L (2, 3, 4, 6, 10) is 4:
    # 0: 10 >= 4 -> L; 1: 4 >= 4 -> L; 2: L; 3: 0 < 4, N_H 3 >= 0 -> H;
    # 4: 2 < 4, N_H 2 not < 2 -> H; 5: 3 < 4, N_H 1 < 3 -> L; 6: nothing -> no prototype
    protos, present = adaptive_prototypes(low, n_low, high, n_high)
    assert (protos[:, 0] < 0).tolist() == [False, False, False, True, True, False, True]
    assert present.tolist() == [True] * 6 + [False]
    assert torch.equal(protos[4], high[4]) and torch.equal(protos[5], low[5])


def test_apg_median_of_an_even_count_and_without_low_prototypes():
    low, high = torch.ones(4, 1), -torch.ones(4, 1)
    # positive N_L (1, 2, 3, 10): median 2.5, so N_L = 2 (N_H 5) goes high, N_L = 3 stays low
    protos, _ = adaptive_prototypes(
        low, torch.tensor([1, 2, 3, 10]), high, torch.tensor([0, 5, 5, 0])
    )
    assert protos[:, 0].tolist() == [1.0, -1.0, 1.0, 1.0]
    protos, present = adaptive_prototypes(
        low, torch.zeros(4, dtype=torch.long), high, torch.ones(4, dtype=torch.long)
    )
    assert protos[:, 0].tolist() == [-1.0] * 4 and bool(present.all())


def test_apg_off_keeps_low_resolution_prototypes_only():
    low, high = torch.ones(3, 1), -torch.ones(3, 1)
    protos, present = adaptive_prototypes(
        low, torch.tensor([5, 1, 0]), high, torch.tensor([0, 9, 9]), apg=False
    )
    assert protos[:, 0].tolist() == [1.0, 1.0, 1.0]
    assert present.tolist() == [True, True, False]  # class 2 has only high-res joint pixels


# ------------------------------------------------------------------------------- DPA


def test_drift_pixel_contrast_infonce_by_hand():
    tau = 0.5
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    labels = torch.tensor([0, 1, 2])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])  # class 2: no prototype
    loss = drift_pixel_contrast(features, labels, prototypes, present, tau)
    # cosines: pixel 0 -> (1, 0), pixel 1 -> (0, 1); pixel 2 has no positive: left out;
    # class 2 is no negative. Each kept pixel: -log(e^(1/tau) / (e^(1/tau) + e^0))
    one = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    assert loss.item() == pytest.approx(one, rel=1e-6)
    # with class 2 present, pixel 2 (cosine 1/sqrt2 to p0, p1; 1 to p2) joins; p2 is a negative
    all_present = torch.ones(3, dtype=torch.bool)
    s = 1 / math.sqrt(2)
    e = math.exp
    per_pixel = [
        -math.log(e(1 / tau) / (e(1 / tau) + e(0) + e(s / tau))),
        -math.log(e(1 / tau) / (e(0) + e(1 / tau) + e(s / tau))),
        -math.log(e(1 / tau) / (e(s / tau) + e(s / tau) + e(1 / tau))),
    ]
    loss = drift_pixel_contrast(features, labels, prototypes, all_present, tau)
    assert loss.item() == pytest.approx(sum(per_pixel) / 3, rel=1e-6)


def test_drift_pixel_contrast_weights_scale_each_pixel_term():
    tau = 0.5
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]])
    present = torch.tensor([True, True, False])
    labels = torch.tensor([0, 1, 2])
    one = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1.0))
    # pixel 2 (no prototype) is left out with its weight; mean of w * loss over pixels 0, 1
    weights = torch.tensor([1.0, 0.25, 9.0])
    loss = drift_pixel_contrast(features, labels, prototypes, present, tau, weights)
    assert loss.item() == pytest.approx((1.0 + 0.25) * one / 2, rel=1e-6)
    ones = drift_pixel_contrast(features, labels, prototypes, present, tau, torch.ones(3))
    assert ones.item() == pytest.approx(drift_pixel_contrast(
        features, labels, prototypes, present, tau).item(), rel=1e-6)  # fmt: skip


def test_pixel_set_carries_each_pixels_weight_and_drops_ignored_pixels():
    # a 2x2 output grid from 4x4 labels: nearest-neighbour picks the top-left of each block
    label = torch.tensor([[[0, 0, 1, 1], [0, 0, 1, 1], [255, 255, 2, 2], [255, 255, 2, 2]]])
    weight = torch.full((1, 4, 4), 0.3)
    out = SegOutput(logits=torch.zeros(1, 3, 2, 2), features=torch.randn(1, 5, 2, 2))
    pixels = pixel_set([FeatureMap(out, label, weight, torch.tensor([0]), high=False)], False)
    assert pixels.labels.tolist() == [0, 1, 2]
    assert pixels.weights.tolist() == pytest.approx([0.3, 0.3, 0.3])
    assert pixels.features.shape == (3, 5)


def test_prototypes_get_no_gradient_and_drift_pixels_do():
    features = torch.randn(6, 4, requires_grad=True)
    prototypes = torch.randn(3, 4, requires_grad=True)
    loss = drift_pixel_contrast(
        features, torch.tensor([0, 1, 2, 0, 1, 2]), prototypes, torch.ones(3, dtype=torch.bool)
    )
    loss.backward()
    assert prototypes.grad is None
    assert features.grad is not None and features.grad.abs().sum() > 0


def test_drift_pixel_contrast_without_anchor_is_zero_and_attached():
    features = torch.randn(2, 3, requires_grad=True)
    loss = drift_pixel_contrast(
        features, torch.tensor([1, 1]), torch.randn(2, 3), torch.tensor([True, False])
    )
    assert loss.item() == 0.0 and loss.requires_grad


# -------------------------------------------------------------------------------- FD


def test_thing_mask_and_feature_distance_by_hand():
    labels = torch.tensor([[[13, 13, 0, 0], [13, 255, 0, 11], [1, 1, 11, 11], [1, 1, 11, 11]]])
    mask = thing_mask(labels, (2, 2), thing_classes=(11, 13), min_ratio=0.75)
    # top-left: 3/4 car; top-right: 1/4 person; bottom-left: road; bottom-right: 4/4 person
    assert mask.tolist() == [[[True, False], [False, True]]]
    f = torch.zeros(1, 2, 2, 2, requires_grad=True)
    ref = torch.zeros(1, 2, 2, 2)
    ref[0, :, 0, 0] = torch.tensor([3.0, 4.0])  # distance 5
    ref[0, :, 1, 1] = torch.tensor([0.0, 1.0])  # distance 1
    ref[0, :, 0, 1] = torch.tensor([100.0, 0.0])  # not a thing cell
    loss = feature_distance(f, ref, mask)
    assert loss.item() == pytest.approx(3.0)
    loss.backward()
    assert f.grad is not None and f.grad[0, :, 0, 1].abs().sum() == 0


def test_config_rejects_bad_values():
    with pytest.raises(UserError, match="pixl.eta_start"):
        PiXLConfig(eta_start=0.0)
    with pytest.raises(UserError, match="pixl.lr_scale"):
        PiXLConfig(lr_scale=1.5)
    with pytest.raises(UserError, match="pixl.tau"):
        PiXLConfig(tau=0.0)


# ------------------------------------------------------------- multi-resolution crops


def _method(num_classes: int = 4, total: int = 100, **cfg: object) -> PiXL:
    setup = MethodSetup(num_classes=num_classes, feature_dim=8, device=torch.device("cpu"),
                        total_steps=total)  # fmt: skip
    return PiXL(setup, PiXLConfig(**cfg))  # type: ignore[arg-type]


def test_crop_windows_cut_one_window_per_image():
    x = torch.arange(2 * 5 * 6, dtype=torch.float32).reshape(2, 5, 6)
    out = crop_windows(x, [(1, 2), (0, 3)], (3, 3))
    assert out.shape == (2, 3, 3)
    assert torch.equal(out[0], x[0, 1:4, 2:5]) and torch.equal(out[1], x[1, 0:3, 3:6])


def test_entropy_window_by_hand():
    entropy = torch.zeros(8, 8)
    entropy[5:8, 2:5] = 1.0  # a hot 3x3 patch
    # crop 32x32 on an 8x8 grid, window 16 -> 4x4 cells; best windows cover the patch
    top, left = entropy_window(entropy, (32, 32), (16, 16))
    assert (top, left) == (4 * 4, 1 * 4)  # first of the best positions: rows 4-7, cols 1-4
    cells = entropy[top // 4 : top // 4 + 4, left // 4 : left // 4 + 4]
    assert cells.sum() == entropy.sum()
    # windows stay inside the crop even when the grid rounds
    assert entropy_window(torch.rand(5, 7), (37, 53), (18, 26))[0] <= 37 - 18


def test_student_sees_the_low_resolution_crop():
    method = _method(lr_scale=0.5)
    x = torch.randn(2, 3, 32, 48)
    low = method.student_input(x)
    assert low.shape == (2, 3, 16, 24)
    assert low_resolution_size((1024, 1024), 0.5) == (512, 512)
    flat = torch.full((1, 3, 8, 8), 0.3)
    assert torch.allclose(method.student_input(flat), torch.full((1, 3, 4, 4), 0.3))


def test_high_resolution_window_is_random_then_the_highest_entropy_one():
    method = _method(entropy_crop_start=10)
    logits = torch.zeros(2, 4, 8, 8)
    logits[:, 0] = 20.0  # confident everywhere...
    logits[0, 0, 4:, 4:] = 0.0  # ...except a uniform (highest entropy) bottom-right quarter
    logits[1, 0, :4, :4] = 0.0  # ...and top-left in image 1
    label = torch.zeros(2, 32, 32, dtype=torch.long)
    randoms = {tuple(method.windows(3, logits, label, (32, 32), (16, 16))[0]) for _ in range(20)}
    assert len(randoms) > 5 and all(0 <= t <= 16 and 0 <= s <= 16 for t, s in randoms)
    assert method.windows(10, logits, label, (32, 32), (16, 16)) == [(16, 16), (0, 0)]
    # ignored pixels count as zero entropy: hiding the hot quarter of image 0 moves its window
    label[0, 16:, 16:] = 255
    assert method.windows(10, logits, label, (32, 32), (16, 16))[0] != (16, 16)


def _tiny_student(**changes: object):
    torch.manual_seed(0)
    cfg = SegmentorConfig(backbone="test_resnet", num_classes=4, feature_dim=8,
                          output_stride=8, **changes)  # fmt: skip
    return build_segmentor(cfg).train()


def _context(student, method: PiXL, step: int, unlabelled: bool) -> StepContext:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    y = torch.randint(0, 4, (2, 64, 64), generator=gen)
    y[:, :8] = 3  # a thing-class stripe
    y[:, -4:] = 255
    ctx = StepContext(step=step, labelled_image=x, labelled_label=y, student=student)
    ctx.student_labelled = student(method.student_input(x))
    if unlabelled:
        ctx.mixed_image = torch.randn(2, 3, 64, 64, generator=gen)
        ctx.mixed_label = torch.randint(0, 4, (2, 64, 64), generator=gen)
        ctx.mixed_weight = torch.full((2, 64, 64), 0.5)
        ctx.student_unlabelled = student(method.student_input(ctx.mixed_image))
    return ctx


def test_losses_on_a_tiny_student_without_pretrained_backbone_have_no_fd():
    student = _tiny_student()
    method = _method(entropy_crop_start=0)
    ctx = _context(student, method, step=0, unlabelled=True)
    inputs: list[tuple[int, ...]] = []
    student.register_forward_pre_hook(lambda _m, args: inputs.append(tuple(args[0].shape)))
    out = method.losses(ctx)
    assert inputs == [(2, 3, 32, 32), (2, 3, 32, 32)]  # X^H of the labelled and mixed crops
    assert set(out) == {"ce_high", "dpa"}
    assert ctx.extras["eta"] == pytest.approx(0.2) and ctx.extras["entropy_crop"] == 1.0
    # per image about eta of its valid pixels drift (ties aside)
    assert 0.1 < ctx.extras["drift_fraction"] <= 0.25
    sum(out.values()).backward()
    grads = [p.grad for p in student.parameters() if p.grad is not None]
    assert grads and sum(float(g.abs().sum()) for g in grads) > 0


def test_dpa_off_and_apg_off_switches():
    student = _tiny_student()
    assert set(_method(dpa=False).losses(_context(student, _method(), 0, True))) == {"ce_high"}
    method = _method(apg=False)
    ctx = _context(student, method, 0, True)
    assert "dpa" in method.losses(ctx)


def test_fd_runs_with_an_imagenet_backbone_file_on_labelled_images(tmp_path: Path):
    torch.manual_seed(5)
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    student = _tiny_student(weights_file=str(weights))
    setup = MethodSetup(num_classes=4, feature_dim=8, device=torch.device("cpu"),
                        unlabelled=object(), total_steps=10)  # type: ignore[arg-type]  # fmt: skip
    method = PiXL(setup, PiXLConfig(fd_thing_classes=(3,), fd_min_ratio=0.5))
    out = method.losses(_context(student, method, 0, unlabelled=True))
    assert set(out) == {"ce_high", "dpa", "fd"} and out["fd"] > 0
    assert not method.state_dict() and not list(method.parameters())  # the copy is not saved
    out["fd"].backward()  # L_FD reaches the student's backbone only
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.backbone.parameters())
    assert all(p.grad is None for p in student.decoder.parameters())
    # the supervised setting (no unlabelled stream) never applies L_FD (A.3)
    setup.unlabelled = None
    supervised = PiXL(setup, PiXLConfig(fd_thing_classes=(3,)))
    assert "fd" not in supervised.losses(_context(student, supervised, 0, unlabelled=False))


def test_fd_thing_classes_outside_the_model_are_a_user_error(tmp_path: Path):
    weights = tmp_path / "imagenet.pth"
    torch.save(timm.create_model("test_resnet").state_dict(), weights)
    student = _tiny_student(weights_file=str(weights))
    setup = MethodSetup(num_classes=4, feature_dim=8, device=torch.device("cpu"),
                        unlabelled=object(), total_steps=10)  # type: ignore[arg-type]  # fmt: skip
    method = PiXL(setup, PiXLConfig())  # Cityscapes thing ids 6..18 on a 4-class model
    with pytest.raises(UserError, match="fd_thing_classes"):
        method.losses(_context(student, method, 0, unlabelled=True))


# ------------------------------------------------------------------------- inference


def test_multi_resolution_inference_with_scale_one_is_plain_sliding_window():
    torch.manual_seed(0)
    model = build_segmentor(SegmentorConfig(backbone="test_resnet", num_classes=5, feature_dim=8))
    model.eval()
    x = torch.randn(1, 3, 48, 80)
    plain = InferenceConfig(window=(32, 32), stride=(16, 24))
    combined = InferenceConfig(
        window=(32, 32), stride=(16, 24), multi_resolution=True, multi_resolution_scale=1.0
    )
    assert torch.allclose(
        predict_logits(model, x, plain), predict_logits(model, x, combined), atol=1e-5
    )


def test_multi_resolution_inference_for_a_pointwise_model():
    torch.manual_seed(0)
    model = PointwiseModel().eval()
    cfg = InferenceConfig(window=(16, 16), stride=(8, 8), multi_resolution=True)
    # a constant image looks the same at every resolution: exactly the plain prediction
    flat = torch.full((1, 3, 24, 40), 0.7)
    assert torch.allclose(
        predict_logits(model, flat, cfg), predict_logits(model, flat, InferenceConfig()), atol=1e-6
    )
    # otherwise each window is the mean of its high-resolution logits (= plain for a pointwise
    # model) and its low-resolution logits (window halved, logits resized back)
    x = torch.randn(1, 3, 16, 16)
    whole = InferenceConfig(window=(16, 16), multi_resolution=True)
    low = F.interpolate(
        upsampled_logits(model, F.interpolate(x, size=(8, 8), mode="bilinear", antialias=True)),
        size=(16, 16),
        mode="bilinear",
    )
    expected = (predict_logits(model, x, InferenceConfig()) + low) / 2
    assert torch.allclose(predict_logits(model, x, whole), expected, atol=1e-5)
    with pytest.raises(UserError, match="multi_resolution_scale"):
        InferenceConfig(multi_resolution_scale=0.0)


# ------------------------------------------------------------------------ adapt runs


@pytest.fixture(scope="module")
def warm(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("warm")
    model = SegmentorConfig(backbone="test_resnet", feature_dim=16, output_stride=8)
    cfg = tiny_warmup(tiny_bench, model=model)
    cfg.loop.iterations = 2
    warmup.run(cfg, out)
    return out / "model.pt"


def _adapt_cfg(bench: Path, **kw: object) -> adapt.AdaptConfig:
    """test_adapt's tiny configuration with --method pixl, without --val; X^H windows switch
    to the highest-entropy ones at step 2."""
    cfg = _cfg(bench, **{"method": "pixl", "val": None, **kw})
    cfg.pixl.entropy_crop_start = 2
    return cfg


def _log(out: Path) -> list[dict]:
    lines = (out / "train_log.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines) if "ce_labelled" in e]


def test_adapt_pixl_uda_runs_every_term(tiny_bench: Path, warm: Path, tmp_path: Path):
    manifest = adapt.run(_adapt_cfg(tiny_bench), warm, tmp_path / "u")
    assert manifest["complete"] and manifest["results"]["iterations"] == 4
    steps = _log(tmp_path / "u")
    assert len(steps) == 4
    assert all({"ce_unlabelled", "ce_high", "dpa"} <= set(e) for e in steps)
    assert all("fd" not in e for e in steps)  # the tiny backbone is not ImageNet-pretrained
    etas = [e["eta"] for e in steps]
    assert etas[0] == pytest.approx(0.2) and etas[-1] == pytest.approx(0.001)
    assert [e["entropy_crop"] for e in steps] == [0.0, 0.0, 1.0, 1.0]


def test_adapt_pixl_with_projection_gives_the_student_a_projection_head(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    assert load_checkpoint(warm)["model_config"]["proj_dim"] in (0, None)
    cfg = _adapt_cfg(tiny_bench)
    cfg.pixl.use_projection, cfg.pixl.proj_dim = True, 8
    cfg.loop.iterations = 2
    adapt.run(cfg, warm, tmp_path / "p")
    assert load_checkpoint(tmp_path / "p" / "model.pt")["model_config"]["proj_dim"] == 8
    assert all(e["dpa"] > 0 for e in _log(tmp_path / "p"))


def test_cli_adapt_pixl_supervised_then_eval_with_multi_resolution(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    def run(*args: str) -> None:
        result = CliRunner().invoke(app, [*args, "--device", "cpu"])
        assert result.exit_code == 0, result.output

    out = tmp_path / "s"
    run(
        "adapt", "--method", "pixl", "--setting", "supervised", "--checkpoint", str(warm),
        "--source", f"gta5:{tiny_bench / 'source'}", "--out", str(out), "--iterations", "3",
        "--batch-size", "2", "--set", "augment.crop_size=[32, 32]", "--set", "loop.log_every=1",
        "--set", "pixl.apg=false", "--set", "pixl.eta_start=0.4", "--set", "num_workers=0",
    )  # fmt: skip
    steps = _log(out)
    assert len(steps) == 3 and steps[0]["eta"] == pytest.approx(0.4)
    assert all("ce_unlabelled" not in e and {"ce_high", "dpa"} <= set(e) for e in steps)
    config = json.loads((out / "manifest.json").read_text())["config"]
    assert config["pixl"]["apg"] is False
    run(
        "eval", "--checkpoint", str(out / "model.pt"), "--data",
        f"cityscapes:{tiny_bench / 'target'}", "--out", str(tmp_path / "e"),
        "--window", "32x32", "--set", "eval.multi_resolution=true",
    )  # fmt: skip
    manifest = json.loads((tmp_path / "e" / "manifest.json").read_text())
    assert manifest["config"]["eval"]["multi_resolution"] is True
    assert (tmp_path / "e" / "metrics.json").is_file()


def test_pixl_examples_carry_the_paper_settings():
    from pixcli.config import load_config

    examples = Path(__file__).parent.parent / "examples"
    uda = load_config(adapt.AdaptConfig, examples / "pixl_gta5_to_cityscapes.toml")
    assert uda.method == "pixl" and uda.augment.crop_size == (1024, 1024)
    assert uda.pixl.lambda_fd == 0.005 and uda.eval.multi_resolution
    semi = load_config(adapt.AdaptConfig, examples / "pixl_cityscapes_semi.toml")
    assert semi.setting == "semi" and round(semi.labeled_fraction * 2975) == 372
    full = load_config(adapt.AdaptConfig, examples / "pixl_cityscapes_supervised.toml")
    assert full.setting == "supervised" and full.pixl.lambda_fd == 0.0


class Spy(Method):
    """Records what the loop hands a method: the student input hook, the mixed labels."""

    seen: list[dict] = []

    def student_input(self, image: torch.Tensor) -> torch.Tensor:
        Spy.seen.append({"input": tuple(image.shape[-2:])})
        return image[..., ::2, ::2]

    def losses(self, ctx: StepContext) -> dict[str, torch.Tensor]:
        assert ctx.student is not None and ctx.mix_mask is not None
        assert ctx.mixed_label is not None and ctx.pseudo_label is not None
        n = ctx.mixed_label.shape[0]
        expected = mix(ctx.mix_mask, ctx.labelled_label[:n], ctx.pseudo_label[:n])
        Spy.seen.append(
            {
                "mixed_label_ok": bool(torch.equal(ctx.mixed_label, expected)),
                "weight_shape": tuple(ctx.mixed_weight.shape),  # type: ignore[union-attr]
                "low_grid": tuple(ctx.student_labelled.logits.shape[-2:]),  # type: ignore[union-attr]
                "full_grid": tuple(ctx.student(ctx.labelled_image).logits.shape[-2:]),
            }
        )
        return {}


def test_loop_feeds_the_student_input_hook_and_exposes_mixed_labels(
    tiny_bench: Path, warm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setitem(METHODS, "spy", Spy)
    Spy.seen.clear()
    cfg = _adapt_cfg(tiny_bench, method="spy")
    cfg.loop.iterations = 1
    adapt.run(cfg, warm, tmp_path / "spy")
    inputs = [s["input"] for s in Spy.seen if "input" in s]
    assert inputs == [(32, 32), (32, 32)]  # the labelled and the mixed crop
    step = next(s for s in Spy.seen if "mixed_label_ok" in s)
    assert step["mixed_label_ok"] and step["weight_shape"] == (2, 32, 32)
    assert step["low_grid"] == (2, 2) and step["full_grid"] == (4, 4)  # stride 8


@pytest.mark.slow
def test_adapt_pixl_under_torchrun_with_two_cpu_processes(
    tiny_bench: Path, warm: Path, tmp_path: Path
):
    """DDP (gloo): the student runs four times per step (X^L twice in the loop, X^H twice
    here) before one backward pass; every rank builds its prototypes from its own images."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixcli", "adapt", "--method", "pixl", "--checkpoint", str(warm),
           "--source", f"gta5:{tiny_bench / 'source'}", "--target",
           f"cityscapes:{tiny_bench / 'target'}", "--out", str(tmp_path), "--device", "cpu",
           "--iterations", "3", "--batch-size", "2", "--set", "num_workers=0",
           "--set", "augment.crop_size=[32, 32]", "--set", "loop.log_every=1",
           "--set", "pixl.entropy_crop_start=1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1])}
    done = subprocess.run(cmd, env=env, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    steps = _log(tmp_path)
    assert len(steps) == 3 and all({"ce_high", "dpa"} <= set(e) for e in steps)
