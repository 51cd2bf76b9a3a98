"""CPSL maths (pixcli.losses.{sinkhorn,memory_bank,cpsl}) on tiny tensors, by hand."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pixcli.config import load_config
from pixcli.errors import UserError
from pixcli.losses.cpsl import (
    CPSLConfig,
    SelfLabelingHead,
    class_balanced_sample,
    class_distribution,
    pooled_class_distribution,
    prototype_scores,
    random_sample,
    rectify_pseudo_labels,
    self_labeling_cross_entropy,
    self_labeling_loss,
    soft_cluster_assignment,
    symmetric_kl_consistency,
    update_class_distribution,
)
from pixcli.losses.memory_bank import MemoryBank, all_gather_rows
from pixcli.losses.sinkhorn import sinkhorn

IGNORE = 255
UNEQUAL = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03], dtype=torch.float64)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny tensors: thread hand-offs cost more than they save on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def cosine_scores(samples: int, classes: int, seed: int = 0) -> torch.Tensor:
    """Cosine similarities of random unit features to random unit prototypes (float64)."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(samples, 8, generator=g, dtype=torch.float64), dim=1)
    w = F.normalize(torch.randn(classes, 8, generator=g, dtype=torch.float64), dim=1)
    return z @ w.T


# ------------------------------------------------------------------------------ Sinkhorn


@pytest.mark.parametrize("marginal", [None, UNEQUAL], ids=["uniform", "unequal"])
def test_sinkhorn_meets_both_marginals(marginal: torch.Tensor | None) -> None:
    scores = cosine_scores(300, 5)
    result = sinkhorn(scores, epsilon=0.05, class_marginal=marginal, max_iterations=1000)
    r = torch.full((5,), 0.2, dtype=torch.float64) if marginal is None else marginal
    assert result.iterations < 1000
    assert (result.plan.sum(0) - r).abs().sum() <= 1e-4
    assert result.marginal_error <= 1e-4
    torch.testing.assert_close(result.plan.sum(1), torch.full((300,), 1 / 300).double())
    torch.testing.assert_close(result.assignments, 300 * result.plan)
    torch.testing.assert_close(result.assignments.sum(1), torch.ones(300).double())


def test_sinkhorn_fixed_iterations_reproduce_published_exp_domain() -> None:
    """tolerance=None, 3 iterations = the published code's exp-domain loop (rows = classes)."""
    scores = cosine_scores(40, 5, seed=1)
    ours = sinkhorn(scores, 0.1, UNEQUAL, max_iterations=3, tolerance=None)
    q = torch.exp(scores / 0.1).T
    q /= q.sum()
    for _ in range(3):
        q /= q.sum(1, keepdim=True)
        q *= UNEQUAL[:, None]
        q /= q.sum(0, keepdim=True)
        q /= q.shape[1]
    torch.testing.assert_close(ours.assignments, (q * q.shape[1]).T)
    assert ours.iterations == 3
    assert ours.marginal_error > 1e-3  # 3 iterations leave the class marginal unmet


@pytest.mark.parametrize("shift", ["per_sample", "per_class", "global"])
def test_sinkhorn_invariant_to_adding_constants(shift: str) -> None:
    scores = cosine_scores(50, 5, seed=2)
    constant = {
        "per_sample": torch.linspace(-3, 7, 50).double()[:, None],
        "per_class": torch.tensor([5.0, -2.0, 0.0, 1.0, 9.0]).double()[None, :],
        "global": torch.tensor(42.0).double(),
    }[shift]
    base = sinkhorn(scores, 0.05, UNEQUAL, max_iterations=1000, tolerance=1e-10)
    moved = sinkhorn(scores + constant, 0.05, UNEQUAL, max_iterations=1000, tolerance=1e-10)
    torch.testing.assert_close(moved.plan, base.plan, atol=1e-9, rtol=1e-6)


def test_sinkhorn_finite_at_small_epsilon_and_large_scores() -> None:
    scores = (cosine_scores(64, 5, seed=3) * 1e3).float()
    result = sinkhorn(scores, epsilon=0.01, class_marginal=UNEQUAL.float(), max_iterations=200)
    assert torch.isfinite(result.plan).all() and torch.isfinite(result.assignments).all()
    torch.testing.assert_close(result.plan.sum(1), torch.full((64,), 1 / 64))
    assert abs(float(result.plan.sum()) - 1.0) < 1e-5


def test_sinkhorn_two_by_two_matches_closed_form() -> None:
    """Q = diag(a) K diag(b) with fixed marginals is fixed by its cross ratio:
    Q00 Q11 / (Q01 Q10) = K00 K11 / (K01 K10) = k, here exp(2 a / eps) = 4."""
    eps = 0.5
    a = eps * math.log(2.0)
    scores = torch.tensor([[a, 0.0], [0.0, a]], dtype=torch.float64)
    uniform = sinkhorn(scores, eps, max_iterations=500, tolerance=1e-12)
    # x^2 / (1/2 - x)^2 = 4  ->  x = 1/3
    expected = torch.tensor([[1 / 3, 1 / 6], [1 / 6, 1 / 3]], dtype=torch.float64)
    torch.testing.assert_close(uniform.plan, expected)
    # classes r = (0.7, 0.3), samples h = (0.5, 0.5): Q = [[x, .5-x], [.7-x, x-.2]],
    # x (x - .2) = 4 (.5 - x)(.7 - x)  ->  3x^2 - 4.6x + 1.4 = 0
    x = (4.6 - math.sqrt(4.6**2 - 4 * 3 * 1.4)) / 6
    unequal = sinkhorn(scores, eps, torch.tensor([0.7, 0.3]), max_iterations=500, tolerance=1e-12)
    expected = torch.tensor([[x, 0.5 - x], [0.7 - x, x - 0.2]], dtype=torch.float64)
    torch.testing.assert_close(unequal.plan, expected)


def test_sinkhorn_zero_class_gets_no_mass_and_bad_input_is_refused() -> None:
    result = sinkhorn(cosine_scores(20, 3), 0.05, torch.tensor([0.6, 0.0, 0.4]))
    assert float(result.plan[:, 1].abs().max()) == 0.0
    with pytest.raises(ValueError):
        sinkhorn(cosine_scores(20, 3), 0.05, torch.tensor([0.5, 0.5]))
    with pytest.raises(ValueError):
        sinkhorn(torch.tensor([[0.0, float("nan")]]), 0.05)


# ------------------------------------------------------------------------------ sampling


def hand_labels() -> torch.Tensor:
    """10 x 10: class 0 x50, class 1 x30, class 2 x13, class 3 x2, ignore x5 (95 valid)."""
    flat = torch.tensor([0] * 50 + [1] * 30 + [2] * 13 + [3] * 2 + [IGNORE] * 5)
    return flat[torch.randperm(100, generator=torch.Generator().manual_seed(0))].reshape(10, 10)


def test_class_balanced_sample_counts_follow_eq9_plus_fill() -> None:
    labels = hand_labels()
    index, label = class_balanced_sample(labels, 20, torch.Generator().manual_seed(1))
    # Eq. 9: floor(20 * 50/95) = 10, floor(20 * 30/95) = 6, floor(20 * 13/95) = 2,
    # floor(20 * 2/95) = 0; 18 in all, the 2 left are filled from the other valid pixels.
    quotas = torch.tensor([10, 6, 2, 0])
    assert index.numel() == 20 and index.unique().numel() == 20
    torch.testing.assert_close(label, labels.reshape(-1)[index].long())
    assert not (label == IGNORE).any()
    torch.testing.assert_close(torch.bincount(label[:18], minlength=4), quotas)
    total = torch.bincount(label, minlength=4)
    assert bool((total >= quotas).all()) and int((total - quotas).sum()) == 2


def test_class_balanced_sample_is_deterministic_and_handles_few_pixels() -> None:
    labels = hand_labels()
    first = class_balanced_sample(labels, 20, torch.Generator().manual_seed(5))
    again = class_balanced_sample(labels, 20, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again)
    index, label = class_balanced_sample(labels, 500, torch.Generator().manual_seed(5))
    assert sorted(index.tolist()) == torch.nonzero(labels.reshape(-1) != IGNORE).flatten().tolist()
    index, label = class_balanced_sample(torch.full((4, 4), IGNORE), 8)
    assert index.numel() == 0 and label.numel() == 0


def test_random_sample_never_draws_ignored_pixels() -> None:
    labels = hand_labels()
    index, label = random_sample(labels, 30, torch.Generator().manual_seed(2))
    assert index.numel() == 30 and index.unique().numel() == 30
    assert not (labels.reshape(-1)[index] == IGNORE).any()
    torch.testing.assert_close(label, labels.reshape(-1)[index].long())


# --------------------------------------------------------------------------- memory bank


def one_hot_rows(ids: torch.Tensor, dim: int) -> torch.Tensor:
    return F.one_hot(ids, dim).float() * 3.0  # not unit: push must normalise


def test_memory_bank_keeps_labels_aligned_after_wraparound() -> None:
    bank = MemoryBank(length=10, dim=64, gather=None)
    next_id = 0
    for size in (3, 4, 7, 5, 2, 9, 6, 1):
        ids = torch.arange(next_id, next_id + size)
        bank.push(one_hot_rows(ids, 64), ids)
        next_id += size
        features, labels = bank.get()
        assert len(bank) == min(next_id, 10)
        torch.testing.assert_close(features.argmax(1), labels)  # row by row
        torch.testing.assert_close(features.norm(dim=1), torch.ones(len(bank)))
        expected = set(range(max(0, next_id - 10), next_id))
        assert set(labels.tolist()) == expected


def test_memory_bank_round_trips_through_state_dict() -> None:
    bank = MemoryBank(length=6, dim=16, gather=None)
    bank.push(one_hot_rows(torch.arange(9), 16), torch.arange(9))
    restored = MemoryBank(length=6, dim=16, gather=None)
    restored.load_state_dict(bank.state_dict())
    for copy in (bank, restored):
        copy.push(one_hot_rows(torch.tensor([9, 10]), 16), torch.tensor([9, 10]))
    torch.testing.assert_close(restored.get(), bank.get())
    assert set(restored.get()[1].tolist()) == set(range(5, 11))


def test_memory_bank_gather_hook_and_oversized_push() -> None:
    def two_ranks(t: torch.Tensor) -> torch.Tensor:  # a fake rank 1 sends ids + 1
        return torch.cat([t, t.roll(1, dims=1) if t.ndim == 2 else t + 1])

    bank = MemoryBank(length=8, dim=8, gather=two_ranks)
    ids = torch.tensor([0, 2, 4])
    bank.push(one_hot_rows(ids, 8), ids)
    features, labels = bank.get()
    assert labels.tolist() == [0, 2, 4, 1, 3, 5]
    torch.testing.assert_close(features.argmax(1), labels)
    big = MemoryBank(length=4, dim=8, gather=None)
    big.push(one_hot_rows(torch.arange(7), 8), torch.arange(7))
    assert sorted(big.get()[1].tolist()) == [3, 4, 5, 6]
    torch.testing.assert_close(all_gather_rows(ids), ids)  # no process group: identity


def _two_rank_worker(rank: int, init_file: str, out_dir: str, compute: Callable) -> None:
    torch.distributed.init_process_group("gloo", f"file://{init_file}", rank=rank, world_size=2)
    torch.save(compute(rank), f"{out_dir}/rank{rank}.pt")
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def on_two_gloo_ranks(compute: Callable, tmp_path: Path) -> list:
    """``compute(rank)`` in each of 2 gloo processes; the results of ranks 0 and 1."""
    args = (str(tmp_path / "init"), str(tmp_path), compute)
    torch.multiprocessing.spawn(_two_rank_worker, args=args, nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{rank}.pt") for rank in (0, 1)]


def _gather_uneven_rows(rank: int) -> tuple:
    ids = torch.arange(2 + rank) + 10 * rank  # uneven: rank 0 sends 2 rows, rank 1 sends 3
    bank = MemoryBank(length=8, dim=16)  # default gather: all_gather_rows
    bank.push(one_hot_rows(ids, 16), ids)
    return bank.get()


@pytest.mark.slow
def test_memory_bank_all_gathers_uneven_rows_under_gloo(tmp_path: Path) -> None:
    for features, labels in on_two_gloo_ranks(_gather_uneven_rows, tmp_path):
        assert labels.tolist() == [0, 1, 10, 11, 12]
        torch.testing.assert_close(features.argmax(1), labels)


# ------------------------------------------------------------------ distribution alignment


def test_class_distribution_and_moving_average() -> None:
    labels = torch.tensor([[0, 0, 1], [IGNORE, 2, 0]])
    delta = class_distribution(labels, 3)
    torch.testing.assert_close(delta, torch.tensor([3 / 5, 1 / 5, 1 / 5]))
    previous = torch.tensor([0.5, 0.25, 0.25])
    updated = update_class_distribution(previous, delta, alpha=0.9)
    torch.testing.assert_close(updated, torch.tensor([0.51, 0.245, 0.245]))
    empty = class_distribution(torch.full((2, 2), IGNORE), 3)
    torch.testing.assert_close(update_class_distribution(previous, empty, 0.9), previous)
    with pytest.raises(ValueError):
        class_distribution(torch.tensor([3]), 3)


def test_pooled_class_distribution_is_the_local_one_in_one_process() -> None:
    labels = torch.tensor([[0, 0, 1], [IGNORE, 2, 0]])
    torch.testing.assert_close(pooled_class_distribution(labels, 3), class_distribution(labels, 3))


def _pooled_uneven(rank: int) -> torch.Tensor:
    labels = [torch.tensor([0, 0, 0, 1]), torch.tensor([2, IGNORE])][rank]  # uneven, one ignored
    return pooled_class_distribution(labels, 3)


@pytest.mark.slow
def test_pooled_class_distribution_counts_every_rank_under_gloo(tmp_path: Path) -> None:
    expected = torch.tensor([3 / 5, 1 / 5, 1 / 5])  # the 5 valid pixels of both ranks together
    for result in on_two_gloo_ranks(_pooled_uneven, tmp_path):
        torch.testing.assert_close(result, expected)


# ------------------------------------------------------------------------ rectification


def test_rectification_on_two_pixels() -> None:
    p_sl = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])
    p_st = torch.tensor([[0.2, 0.5, 0.3], [0.5, 0.4, 0.1]])
    # products: [0.14, 0.10, 0.03] -> 0 (P_ST alone: 1); [0.05, 0.12, 0.06] -> 1 (neither alone)
    assert rectify_pseudo_labels(p_sl, p_st, dim=-1).tolist() == [0, 1]
    maps = rectify_pseudo_labels(p_sl.T.reshape(1, 3, 1, 2), p_st.T.reshape(1, 3, 1, 2))
    assert maps.tolist() == [[[0, 1]]]
    nan_st = p_st.clone()
    nan_st[1] = float("nan")
    assert rectify_pseudo_labels(p_sl, nan_st, dim=-1).tolist() == [0, IGNORE]
    mask = torch.tensor([True, False])
    assert rectify_pseudo_labels(p_sl, p_st, mask, dim=-1).tolist() == [IGNORE, 1]


# ------------------------------------------------------------------- self-labeling head


def test_head_from_prototypes_scores_cosine_similarities() -> None:
    g = torch.Generator().manual_seed(0)
    prototypes = torch.randn(3, 4, generator=g) * 5
    head = SelfLabelingHead(3, 4)
    head.init_from_prototypes(prototypes)
    features = torch.randn(6, 4, generator=g)
    expected = F.cosine_similarity(features[:, None, :], prototypes[None, :, :], dim=2)
    torch.testing.assert_close(head(features), expected)
    maps = features.T.reshape(1, 4, 2, 3)
    torch.testing.assert_close(head(maps, dim=1), expected.T.reshape(1, 3, 2, 3))
    p_sl = soft_cluster_assignment(head, maps, tau=0.08)
    torch.testing.assert_close(p_sl, torch.softmax(expected.T.reshape(1, 3, 2, 3) / 0.08, 1))
    assert not p_sl.requires_grad


def test_head_init_keeps_a_random_unit_row_for_a_missing_class() -> None:
    head = SelfLabelingHead(3, 4)
    head.init_from_prototypes(torch.tensor([[2.0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 3.0, 0]]))
    torch.testing.assert_close(head.weight.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(head.weight[[0, 2]], torch.tensor([[1.0, 0, 0, 0], [0, 0, 1, 0]]))


def test_self_labeling_loss_by_hand_and_gradient_reaches_only_the_head() -> None:
    head = SelfLabelingHead(2, 2)
    head.init_from_prototypes(torch.eye(2))
    features = torch.eye(2).requires_grad_(True)  # scores [[1, 0], [0, 1]]
    eps = 2 / math.log(4)  # cross ratio exp(2 / eps) = 4 -> q = [[2/3, 1/3], [1/3, 2/3]]
    loss, result = self_labeling_loss(head, features, torch.zeros(0, 2), None, 0.5, eps, 500, 0)
    # p_1 = softmax([2, 0]): log p = [-log(1 + e^-2), -log(1 + e^2)], same for p_2 mirrored
    expected = (2 / 3) * math.log1p(math.exp(-2)) + (1 / 3) * math.log1p(math.exp(2))
    assert result is not None
    torch.testing.assert_close(result.assignments, torch.tensor([[2, 1], [1, 2]]) / 3.0)
    assert abs(float(loss.detach()) - expected) < 1e-6
    loss.backward()
    assert head.weight.grad is not None and float(head.weight.grad.abs().sum()) > 0
    assert features.grad is None


def test_self_labeling_loss_uses_the_bank_but_trains_on_current_rows() -> None:
    head = SelfLabelingHead(5, 8, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    current, bank = torch.randn(4, 8, generator=g), torch.randn(30, 8, generator=g)
    loss, result = self_labeling_loss(head, current, bank, UNEQUAL.float())
    assert result is not None and result.plan.shape == (34, 5)
    with torch.no_grad():
        reference = sinkhorn(head(torch.cat([current, bank])), 0.05, UNEQUAL.float())
    torch.testing.assert_close(result.assignments[:4], reference.assignments[:4])
    manual = self_labeling_cross_entropy(head(current), reference.assignments[:4], 0.08)
    torch.testing.assert_close(loss, manual)
    empty_loss, none = self_labeling_loss(head, torch.zeros(0, 8), bank, None)
    assert none is None and float(empty_loss.detach()) == 0.0 and empty_loss.requires_grad


# ----------------------------------------------------------------------------- L_REG


def kl_div_reference(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    log_ps, log_pw = F.log_softmax(student, 1), F.log_softmax(teacher, 1)
    kl_w_s = F.kl_div(log_ps, log_pw, reduction="none", log_target=True).sum(1)  # KL(P_w||P_s)
    kl_s_w = F.kl_div(log_pw, log_ps, reduction="none", log_target=True).sum(1)  # KL(P_s||P_w)
    return kl_w_s + kl_s_w


def test_symmetric_kl_matches_kl_div_and_is_zero_for_identical_inputs() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    reference = kl_div_reference(student, teacher)
    torch.testing.assert_close(symmetric_kl_consistency(student, teacher), reference.mean())
    assert float(symmetric_kl_consistency(student, student.clone())) == pytest.approx(0, abs=1e-7)
    valid = torch.zeros(2, 3, 3, dtype=torch.bool)
    valid[0, :2] = True
    masked = symmetric_kl_consistency(student, teacher, valid)
    torch.testing.assert_close(masked, reference[valid].mean())
    nothing = symmetric_kl_consistency(student, teacher, torch.zeros_like(valid))
    assert float(nothing) == 0.0


def test_symmetric_kl_gradient_reaches_only_the_student() -> None:
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 3, 2, 2, generator=g).requires_grad_(True)
    teacher = torch.randn(1, 3, 2, 2, generator=g).requires_grad_(True)
    teacher_nan = teacher.detach().clone()
    teacher_nan[0, :, 0, 0] = float("nan")
    symmetric_kl_consistency(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and float(student.grad.abs().sum()) > 0
    student.grad = None
    valid = torch.ones(1, 2, 2, dtype=torch.bool)
    valid[0, 0, 0] = False
    symmetric_kl_consistency(student, teacher_nan, valid).backward()
    assert torch.isfinite(student.grad).all()


# ---------------------------------------------------------------------------- config


def test_config_defaults_and_validation() -> None:
    cfg = CPSLConfig()
    paper = (cfg.lambda_sl, cfg.lambda_reg, cfg.tau, cfg.epsilon, cfg.memory_length)
    assert paper == (0.1, 5.0, 0.08, 0.05, 65_536)
    assert (cfg.samples_per_image, cfg.momentum, cfg.lr, cfg.head_lr) == (512, 0.999, 1e-4, 5e-4)
    changed = load_config(CPSLConfig, overrides={"class_balance": False, "tau": 0.1})
    assert changed.tau == 0.1 and changed.class_balance is False
    with pytest.raises(UserError):
        CPSLConfig(tau=0.0)
    with pytest.raises(UserError):
        CPSLConfig(distribution_momentum=1.5)


def test_prototype_scores_match_a_one_by_one_convolution() -> None:
    g = torch.Generator().manual_seed(3)
    maps, weight = torch.randn(2, 4, 3, 3, generator=g), torch.randn(5, 4, generator=g)
    conv = F.conv2d(F.normalize(maps, dim=1), F.normalize(weight, dim=1)[:, :, None, None])
    torch.testing.assert_close(prototype_scores(maps, weight, dim=1), conv)
