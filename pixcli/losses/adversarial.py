"""Least-squares GAN losses for output-space adversarial warm-up.

AdaptSegNet (Tsai et al., CVPR 2018, Eq. 3-4) aligns the softmax outputs of source and
target images through a discriminator D. ProDA and CPSL (Sec. 4.1, "warmed up by applying
adversarial training like [39]") start from such a model; the ProDA authors use the
least-squares form (Mao et al., LSGAN) with adversarial weight 0.01. Convention here:
source = 1, target = 0.
"""

from __future__ import annotations

import torch
from torch import Tensor

SOURCE_LABEL = 1.0
TARGET_LABEL = 0.0


def lsgan_loss(scores: Tensor, label: float) -> Tensor:
    """Mean squared distance of D's patch scores to ``label``."""
    return ((scores.float() - label) ** 2).mean()


def generator_adversarial_loss(target_scores: Tensor) -> Tensor:
    """Segmentor's term (AdaptSegNet Eq. 4): target outputs should look like source ones."""
    return lsgan_loss(target_scores, SOURCE_LABEL)


def discriminator_loss(source_scores: Tensor, target_scores: Tensor) -> Tensor:
    """Discriminator's term (AdaptSegNet Eq. 3, least-squares): tell the domains apart.

    Both halves are averaged, so each domain weighs 1/2.
    """
    return 0.5 * (lsgan_loss(source_scores, SOURCE_LABEL) + lsgan_loss(target_scores, TARGET_LABEL))


def softmax_map(logits: Tensor) -> Tensor:
    return torch.softmax(logits.float(), dim=1)
