"""OHEM cross-entropy (UniMatch's labelled loss on Cityscapes), hand-computed on tiny tensors."""

import math

import pytest
import torch
import torch.nn.functional as F

from pixcli.losses.ohem import ohem_cross_entropy


def two_class_logits(label_probs: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(1, 2, 1, n) logits whose softmax gives class 0 the probabilities ``label_probs``;
    labels all 0."""
    p = torch.tensor(label_probs)
    logits = torch.stack([p.log(), (1 - p).log()])[None, :, None, :]
    return logits, torch.zeros(1, 1, len(label_probs), dtype=torch.long)


def test_keeps_only_the_pixels_below_the_threshold() -> None:
    logits, labels = two_class_logits([0.2, 0.5, 0.9, 0.99])
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept_share=0.0)
    assert loss.item() == pytest.approx(-(math.log(0.2) + math.log(0.5)) / 2, rel=1e-5)


def test_keeps_at_least_the_min_kept_hardest_pixels() -> None:
    logits, labels = two_class_logits([0.95, 0.8, 0.9, 0.99])  # all easy
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept_share=0.5)
    assert loss.item() == pytest.approx(-(math.log(0.8) + math.log(0.9)) / 2, rel=1e-5)


def test_no_more_valid_pixels_than_min_kept_is_plain_cross_entropy() -> None:
    logits, labels = two_class_logits([0.95, 0.8, 0.9, 0.99])
    plain = F.cross_entropy(logits, labels)
    assert ohem_cross_entropy(logits, labels, 0.7, 1.0).item() == pytest.approx(plain.item())


def test_ignored_pixels_are_neither_kept_nor_counted() -> None:
    logits, labels = two_class_logits([0.2, 0.5, 0.9, 0.99])
    labels[0, 0, 1] = 255
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept_share=0.0)
    assert loss.item() == pytest.approx(-math.log(0.2), rel=1e-5)


def test_all_easy_and_no_min_kept_is_zero_not_nan() -> None:
    logits, labels = two_class_logits([0.95, 0.99])
    loss = ohem_cross_entropy(logits, labels, threshold=0.7, min_kept_share=0.0)
    assert loss.item() == 0.0
    all_ignored = torch.full_like(labels, 255)
    assert ohem_cross_entropy(logits, all_ignored).item() == 0.0


def test_gradient_reaches_only_the_kept_pixels() -> None:
    logits, labels = two_class_logits([0.2, 0.9])
    logits.requires_grad_(True)
    ohem_cross_entropy(logits, labels, threshold=0.7, min_kept_share=0.0).backward()
    assert logits.grad is not None
    assert logits.grad[..., 0].abs().sum() > 0
    assert logits.grad[..., 1].abs().sum() == 0
