"""PGPC (pseudo-label guided pixel contrast): the maths on hand-made tensors, the plug-in's
gradient stops and warm-up, and a tiny `pixcli adapt --method pgpc` run."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import tiny_warmup
from typer.testing import CliRunner

from pixcli.artifacts import load_checkpoint
from pixcli.cli import app
from pixcli.data.readers import open_dataset
from pixcli.errors import UserError
from pixcli.losses.pgpc import (
    ClassMemoryBanks,
    PGPCConfig,
    class_rank_order,
    entropy_map,
    info_nce,
    negative_candidates,
    pgpc_contrastive_loss,
    reliable_pixels,
    sample_negatives,
    sample_per_class,
)
from pixcli.methods import METHODS, MethodSetup, StepContext
from pixcli.methods.pgpc import PGPC, inside_image, whole_cells
from pixcli.models import SegmentorConfig, build_segmentor
from pixcli.models.segmentor import add_projection_head
from stages import adapt, warmup

# ------------------------------------------------------------------------------ InfoNCE


def test_info_nce_equals_a_hand_computation():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # unit (1,0) and (0,1)
    positive = torch.tensor([3.0, 4.0])  # cosines 0.6 and 0.8
    negatives = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])  # cosines (0, -1) and (1, 0)
    tau = 0.5
    first = -math.log(math.exp(1.2) / (math.exp(1.2) + math.exp(0.0) + math.exp(-2.0)))
    second = -math.log(math.exp(1.6) / (math.exp(1.6) + math.exp(2.0) + math.exp(0.0)))
    got = info_nce(anchors, positive, negatives, tau)
    assert torch.allclose(got, torch.tensor([first, second]), atol=1e-6)
    masked = info_nce(anchors, positive, negatives, tau, torch.tensor([[True, False]]))
    assert masked[0].item() == pytest.approx(-math.log(math.exp(1.2) / (math.exp(1.2) + 1.0)))


def test_contrastive_loss_averages_anchors_of_classes_with_prototype_and_negatives():
    anchors = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], requires_grad=True)
    labels = torch.tensor([0, 0, 1])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    negatives = torch.tensor([[[0.0, 1.0]], [[1.0, 0.0]]])  # C x N x D
    valid = torch.tensor([[True], [True]])
    expected = info_nce(anchors[:2], prototypes[0], negatives[0], 0.5)
    # class 1 has no prototype: left out, the mean runs over class 0's two anchors
    loss, used = pgpc_contrastive_loss(
        anchors, labels, prototypes, torch.tensor([True, False]), negatives, valid
    )
    assert used == 2 and loss.item() == pytest.approx(expected.mean().item())
    # both classes: the mean over all three anchors (each anchor weighs the same)
    loss, used = pgpc_contrastive_loss(
        anchors, labels, prototypes, torch.tensor([True, True]), negatives, valid
    )
    third = info_nce(anchors[2:], prototypes[1], negatives[1], 0.5)
    assert used == 3 and loss.item() == pytest.approx(torch.cat([expected, third]).mean().item())
    # no negative for class 0 either: nothing counts, the loss is 0 but still attached
    loss, used = pgpc_contrastive_loss(
        anchors, labels, prototypes, torch.tensor([True, False]), negatives,
        torch.tensor([[False], [True]]),
    )  # fmt: skip
    assert used == 0 and loss.item() == 0.0 and loss.requires_grad


# ------------------------------------------------------------------------------ anchors

# Six pixels, three classes. Entropy and confidence disagree on pixels 0 and 1: pixel 0 has
# the lower entropy (0.673 < 0.819), pixel 1 the higher confidence (0.7 > 0.6).
PIXELS = [
    [0.6, 0.4, 0.0],  # label 0, H 0.673, conf 0.60
    [0.7, 0.15, 0.15],  # label 0, H 0.819, conf 0.70
    [0.05, 0.9, 0.05],  # label 1, H 0.394, conf 0.90
    [0.1, 0.5, 0.4],  # label 1, H 0.943, conf 0.50
    [0.02, 0.96, 0.02],  # label 1, H 0.196, conf 0.96
    [0.03, 0.94, 0.03],  # label 1, H 0.271, conf 0.94
]


def _map(pixels: list[list[float]]) -> torch.Tensor:
    """1 x C x 2 x 3 probabilities from six pixels in row-major order."""
    return torch.tensor(pixels).T.reshape(1, 3, 2, 3)


def _chosen(mask: torch.Tensor) -> set[int]:
    return set(torch.nonzero(mask.reshape(-1)).squeeze(1).tolist())


def test_entropy_map_by_hand():
    probs = torch.tensor([[0.25] * 4, [1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]]).T
    assert torch.allclose(
        entropy_map(probs.reshape(1, 4, 1, 3))[0, 0],
        torch.tensor([math.log(4), 0.0, math.log(2)]),
    )


def test_global_entropy_keeps_the_lowest_eta_fraction_of_each_image():
    probs = _map(PIXELS)
    assert _chosen(reliable_pixels(probs, 0.5)) == {2, 4, 5}  # the 3 lowest entropies
    # only valid pixels count and may be chosen: 5 valid -> floor(2.5) = 2
    valid = torch.ones(1, 2, 3, dtype=torch.bool)
    valid[0, 1, 1] = False  # pixel 4
    assert _chosen(reliable_pixels(probs, 0.5, valid=valid)) == {2, 5}
    # the threshold is per image: a far more uncertain second image still gives its 3
    blurred = 0.2 * probs + 0.8 / 3
    both = reliable_pixels(torch.cat([probs, blurred]), 0.5)
    assert _chosen(both[0]) == {2, 4, 5} and _chosen(both[1]) == {2, 4, 5}
    assert entropy_map(blurred).min() > entropy_map(probs).max()


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        ("global_entropy", {0, 2, 4, 5}),  # 4 of 6 lowest entropies: pixel 0 beats pixel 1
        ("global_confidence", {1, 2, 4, 5}),  # 4 of 6 highest confidences: pixel 1 wins
        ("classwise_entropy", {0, 4, 5}),  # class 0: 1 of 2, class 1: 2 of 4
        ("classwise_confidence", {1, 4, 5}),
    ],
)
def test_each_selection_mode_on_a_hand_made_map(selection: str, expected: set[int]):
    assert _chosen(reliable_pixels(_map(PIXELS), 2 / 3, selection)) == expected


def test_anchors_are_capped_per_class_and_drawn_from_the_candidates():
    labels = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    candidates = torch.tensor([True, True, True, True, True, False, False])
    seen = set()
    for seed in range(20):
        pick = sample_per_class(labels, candidates, 2, torch.Generator().manual_seed(seed))
        assert labels[pick].tolist() == [0, 0, 1, 1]  # grouped by class, 2 each, no class 2
        assert len(set(pick.tolist())) == 4 and all(candidates[pick])
        seen.update(pick.tolist())
    assert seen == {0, 1, 2, 3, 4}  # random within a class
    assert sorted(sample_per_class(labels, candidates, 5).tolist()) == [0, 1, 2, 3, 4]


# ---------------------------------------------------------------------------- negatives


def test_rank_order_and_target_negatives_exclude_the_top_r_classes():
    probs = torch.tensor([[0.5, 0.3, 0.1, 0.06, 0.04], [0.04, 0.06, 0.1, 0.3, 0.5]])
    ranks = class_rank_order(probs, dim=1)
    assert ranks.tolist() == [[0, 1, 2, 3, 4], [4, 3, 2, 1, 0]]
    candidates = negative_candidates(5, None, ranks, rank_r=4)  # C x pixels
    assert candidates.T.tolist() == [
        [False, False, False, False, True],  # pixel 0: only for class 4 (its rank 4 >= 4)
        [True, False, False, False, False],
    ]
    candidates = negative_candidates(5, None, ranks, rank_r=2)
    assert candidates.T.tolist()[0] == [False, False, True, True, True]
    # source rows are negatives of every class but their own; they come first in the pool
    both = negative_candidates(5, torch.tensor([0, 2]), ranks, rank_r=4)
    assert both.shape == (5, 4)
    assert both[:, 0].tolist() == [False, True, True, True, True]
    assert both[:, 1].tolist() == [True, True, False, True, True]


def test_sample_negatives_respects_candidates_and_the_cap():
    candidates = torch.tensor([[True, True, True, False], [False, True, False, False]])
    index, valid = sample_negatives(candidates, 2, torch.Generator().manual_seed(0))
    assert index.shape == (2, 2)
    assert valid[0].all() and all(candidates[0, index[0]])
    assert valid[1].tolist() == [True, False] and index[1, 0] == 1


# ----------------------------------------------------------------------- memory banks


def test_prototypes_are_the_class_means_of_the_bank():
    banks = ClassMemoryBanks(3, length=2, dim=2, gather=None)
    rows = torch.tensor([[1.0, 0.0], [0.0, 3.0], [3.0, 4.0], [0.0, -1.0]])
    banks.push(rows, torch.tensor([0, 0, 2, 0]))  # class 0 gets 3 rows, keeps the last 2
    prototypes, present = banks.prototypes()
    assert present.tolist() == [True, False, True]
    assert torch.allclose(prototypes[0], torch.tensor([0.0, 0.0]))  # mean of (0,1), (0,-1)
    assert torch.allclose(prototypes[2], torch.tensor([0.6, 0.8]))  # rows are L2-normalised
    feats, labels = banks.get()
    assert labels.tolist() == [0, 0, 2] and feats.shape == (3, 2)
    assert not prototypes.requires_grad


# --------------------------------------------------------------------------- geometry


def test_inside_image_and_whole_cells():
    # resized to 20x24, a 32x32 crop at (4, 10): rows < 16 and columns < 14 are image
    geometry = torch.tensor([[20, 24, 4, 10, 32, 32, 0], [20, 24, 4, 10, 32, 32, 1]])
    mask = inside_image(geometry, (32, 32), torch.device("cpu"))
    assert mask[0].sum() == 16 * 14 and mask[0, 15, 13] and not mask[0, 16, 0]
    assert torch.equal(mask[1], mask[0].flip(-1))
    cells = whole_cells(mask, (4, 4))  # 8x8 cells
    assert cells[0].tolist()[0] == [True, False, False, False]  # cell (0,1) covers columns 8-15
    assert cells[0, 1, 0] and not cells[0, 2, 0]  # rows 8-15 inside, rows 16-23 not


def test_add_projection_head_is_seeded_and_refuses_another_size():
    cfg = SegmentorConfig(backbone="test_resnet", head="daformer", feature_dim=8)
    a, b = build_segmentor(cfg), build_segmentor(cfg)
    add_projection_head(a, 4)
    torch.manual_seed(123)  # the head's initial weights do not depend on the global RNG
    add_projection_head(b, 4)
    assert a.config.proj_dim == 4 and a.eval()(torch.zeros(1, 3, 32, 32)).proj.shape == (1, 4, 8, 8)
    for p, q in zip(a.projector.parameters(), b.projector.parameters(), strict=True):
        assert torch.equal(p, q)
    head = a.projector
    add_projection_head(a, 4)  # already there: kept
    assert a.projector is head
    with pytest.raises(UserError, match="projection head of 4"):
        add_projection_head(a, 8)


# --------------------------------------------------------------------------- the plug-in


def _plugin(bench: Path, **changes: object) -> tuple[PGPC, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    model_cfg = SegmentorConfig(backbone="test_resnet", head="daformer", feature_dim=8)
    student = build_segmentor(model_cfg)
    cfg = PGPCConfig(proj_dim=4, anchors_per_class=8, negatives_per_anchor=16, **changes)  # type: ignore[arg-type]
    setup = MethodSetup(
        num_classes=19, feature_dim=8, device=torch.device("cpu"),
        unlabelled=open_dataset(f"cityscapes:{bench / 'target'}"), total_steps=30,
    )  # fmt: skip
    method = PGPC(setup, cfg)
    method.prepare_student(student)
    student.train()
    teacher = copy.deepcopy(student).eval().requires_grad_(False)
    return method, student, teacher


def _step(method: PGPC, student, teacher, step: int, seed: int = 0) -> tuple[StepContext, dict]:
    gen = torch.Generator().manual_seed(seed)
    source = torch.randn(2, 3, 32, 32, generator=gen)
    label = (torch.arange(32 * 32).reshape(32, 32) // 16 % 19).expand(2, 32, 32).clone()
    target = torch.randn(2, 3, 32, 32, generator=gen)
    ctx = StepContext(step=step, labelled_image=source, labelled_label=label)
    ctx.unlabelled_image = target
    ctx.unlabelled_geometry = torch.tensor([[32, 32, 0, 0, 32, 32, 0]] * 2)
    with torch.no_grad():
        ctx.teacher_output = teacher(target)
    ctx.student_labelled = student(source)
    ctx.student_unlabelled = student(target)
    ctx.student_labelled.proj.retain_grad()
    ctx.student_unlabelled.proj.retain_grad()
    return ctx, method.losses(ctx)


def test_gradient_reaches_the_student_but_not_banks_prototypes_or_teacher(tiny_bench: Path):
    method, student, teacher = _plugin(tiny_bench, warmup_iterations=0)
    ctx, losses = _step(method, student, teacher, step=0)
    loss = losses["contrast"]
    assert loss.item() > 0 and ctx.extras["anchors"] > 0
    loss.backward()
    for part in (student.projector, student.decoder, student.backbone):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    # only the anchors carry gradient: not the source pixels behind the prototypes and the
    # source negatives, nor the target cells pushed into the negative bank this step
    source_grad = ctx.student_labelled.proj.grad
    assert source_grad is None or not source_grad.any()
    target_grad = ctx.student_unlabelled.proj.grad
    assert int(target_grad.abs().sum(dim=1).gt(0).sum()) == ctx.extras["anchors"]
    assert not any(b.requires_grad for b in method.buffers())  # the banks
    prototypes, present = method.source_bank.prototypes()
    assert present.any() and not prototypes.requires_grad
    # this step's rows went into the banks before the loss (Eq. 9 counts the mini-batch)
    assert len(method.source_bank.banks[0]) > 0 and len(method.negative_bank) > 0


def test_warm_up_switch(tiny_bench: Path):
    assert PGPCConfig().start_step(60_000) == 20_000  # Sec. 4.1
    assert PGPCConfig(warmup_iterations=7).start_step(60_000) == 7
    assert PGPCConfig(warmup_fraction=0.5).start_step(10) == 5
    method, student, teacher = _plugin(tiny_bench, warmup_iterations=3)
    ctx, before = _step(method, student, teacher, step=2)
    assert before["contrast"].item() == 0.0 and "anchors" not in ctx.extras
    assert before["contrast"].requires_grad  # the projection head still joins the backward
    filled = len(method.source_bank.banks[0])
    assert filled > 0  # the banks fill during the warm-up
    ctx, after = _step(method, student, teacher, step=3)
    assert after["contrast"].item() > 0 and ctx.extras["anchors"] > 0
    with pytest.raises(UserError, match="would start at step 30"):
        _plugin(tiny_bench, warmup_iterations=30)


@pytest.mark.parametrize(
    "changes",
    [
        {"positives": "target"},
        {"source_negatives": False},
        {"target_negatives": False},
        {"anchor_selection": "classwise_confidence"},
    ],
)
def test_table_6_and_7_variants_run(tiny_bench: Path, changes: dict):
    method, student, teacher = _plugin(tiny_bench, warmup_iterations=0, **changes)
    _step(method, student, teacher, step=0, seed=1)  # fills the banks (target ones too)
    ctx, losses = _step(method, student, teacher, step=1, seed=2)
    assert losses["contrast"].item() > 0
    assert (method.negative_bank is None) == (changes.get("target_negatives") is False)
    assert (method.target_bank is not None) == (changes.get("positives") == "target")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"positives": "both"}, "pgpc.positives"),
        ({"source_negatives": False, "target_negatives": False}, "cannot both be false"),
        ({"anchor_selection": "random"}, "pgpc.anchor_selection"),
        ({"eta": 0.0}, "pgpc.eta"),
        ({"tau": 0.0}, "pgpc.tau"),
    ],
)
def test_config_errors_name_the_setting(changes: dict, message: str):
    with pytest.raises(UserError, match=message):
        PGPCConfig(**changes)


def test_registered_and_refuses_too_large_r(tiny_bench: Path):
    assert METHODS["pgpc"] is PGPC
    with pytest.raises(UserError, match="rank_r = 19"):
        _plugin(tiny_bench, rank_r=19)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def warm_daformer(tiny_bench: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny warmed-up model with a stride-4 head (8x8 cells on 32x32 crops), no projector."""
    out = tmp_path_factory.mktemp("warm_pgpc")
    model = SegmentorConfig(backbone="test_resnet", head="daformer", feature_dim=16)
    cfg = tiny_warmup(tiny_bench, model=model, val=None)
    cfg.loop.iterations = 1
    warmup.run(cfg, out)
    return out / "model.pt"


TINY_PGPC_TOML = (
    "batch_size = 2\nnum_workers = 0\n"
    "[optim]\nlr = 0.01\nhead_lr_mult = 1.0\n"
    "[loop]\niterations = 4\nlog_every = 1\ncheckpoint_every = 2\n"
    "[augment]\ncrop_size = [32, 32]\nscale_range = [0.75, 1.25]\n"
    "[pgpc]\nwarmup_iterations = 2\nproj_dim = 8\nbank_size = 16\nnegative_bank_size = 64\n"
)


def _contrast_log(out: Path) -> list[dict]:
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    steps = [e for e in log if "ce_labelled" in e]
    assert [e["step"] for e in steps] == [1, 2, 3, 4]
    assert [e["contrast"] == 0.0 for e in steps] == [True, True, False, False]
    assert all(e["contrast"] > 0 and e["anchors"] > 0 for e in steps[2:])
    return steps


def test_adapt_pgpc_through_the_cli(tiny_bench: Path, warm_daformer: Path, tmp_path: Path):
    config = tmp_path / "pgpc.toml"
    config.write_text(TINY_PGPC_TOML)
    out = tmp_path / "adapt"
    result = CliRunner().invoke(
        app,
        [
            "adapt", "--method", "pgpc", "--checkpoint", str(warm_daformer),
            "--source", f"gta5:{tiny_bench / 'source'}",
            "--target", f"cityscapes:{tiny_bench / 'target'}",
            "--config", str(config), "--device", "cpu", "--out", str(out),
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    model = load_checkpoint(out / "model.pt")
    assert model["model_config"]["proj_dim"] == 8
    assert any(k.startswith("projector.") for k in model["state_dict"])
    _contrast_log(out)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["pgpc"]["warmup_iterations"] == 2
    method = load_checkpoint(out / "last.pt")["train_state"]["modules"]["method"]
    assert int(method["negative_bank.size"]) > 0


def test_adapt_pgpc_resumes_with_its_projection_head_and_banks(
    tiny_bench: Path, warm_daformer: Path, tmp_path: Path
):
    base = tiny_warmup(tiny_bench)
    cfg = adapt.AdaptConfig(
        method="pgpc", source=f"gta5:{tiny_bench / 'source'}",
        target=f"cityscapes:{tiny_bench / 'target'}", device="cpu", batch_size=2,
        num_workers=0, optim=base.optim, loop=base.loop, augment=base.augment,
        pgpc=PGPCConfig(warmup_iterations=1, proj_dim=8, bank_size=16, negative_bank_size=512),
    )  # fmt: skip
    cfg.loop.iterations = 2
    adapt.run(cfg, warm_daformer, tmp_path / "r")
    first = load_checkpoint(tmp_path / "r" / "last.pt")["train_state"]["modules"]["method"]
    (tmp_path / "r" / "manifest.json").unlink()  # as if interrupted after last.pt
    cfg.loop.iterations = 3
    manifest = adapt.run(cfg, warm_daformer, tmp_path / "r")  # resumes from last.pt
    assert manifest["results"]["iterations"] == 3
    state = load_checkpoint(tmp_path / "r" / "last.pt")["train_state"]["modules"]
    assert int(state["method"]["negative_bank.size"]) > int(first["negative_bank.size"])
    assert state["teacher"]["projector.layers.1.weight"].shape == (8, 16, 1, 1)


@pytest.mark.slow
def test_adapt_pgpc_under_torchrun(tiny_bench: Path, warm_daformer: Path, tmp_path: Path):
    """2 CPU processes (gloo): the projection head is in every backward pass (DDP would
    stop at step 2 otherwise), the bank pushes gather across ranks."""
    config = tmp_path / "pgpc.toml"
    config.write_text(TINY_PGPC_TOML)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pixcli", "adapt", "--method", "pgpc", "--checkpoint", str(warm_daformer),
           "--source", f"gta5:{tiny_bench / 'source'}",
           "--target", f"cityscapes:{tiny_bench / 'target'}",
           "--config", str(config), "--device", "cpu", "--out", str(tmp_path / "ddp")]  # fmt: skip
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    _contrast_log(tmp_path / "ddp")
    assert load_checkpoint(tmp_path / "ddp" / "model.pt")["model_config"]["proj_dim"] == 8
