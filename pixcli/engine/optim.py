"""Optimisers and the learning-rate schedule (poly decay after a linear warm-up)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class OptimConfig:
    """Optimiser settings. Defaults: SGD as DeepLabV2/CPSL (momentum 0.9, poly power 0.9)."""

    name: str = "sgd"  # "sgd" | "adamw"
    lr: float = 2.5e-3
    head_lr_mult: float = 10.0  # decode/projection heads train at lr * this
    weight_decay: float = 5e-4
    momentum: float = 0.9  # SGD momentum (AdamW uses betas 0.9, 0.999)
    poly_power: float = 0.9
    warmup_iters: int = 0  # linear warm-up from warmup_ratio * lr
    warmup_ratio: float = 1e-6
    # Foundation-model fine-tuning (off by default; see Segmentor.param_groups):
    layer_decay: float = 1.0  # ViT layer i of n trains at lr * layer_decay ** (n - 1 - i)
    freeze_backbone: bool = False  # train only the heads (and a ViT's pyramid neck)


def model_param_groups(model: Any, cfg: OptimConfig) -> list[dict]:
    """``model.param_groups`` (a :class:`~pixcli.models.Segmentor`) with ``cfg``'s lr, head
    multiplier, layer-wise decay and frozen-backbone settings."""
    return model.param_groups(cfg.lr, cfg.head_lr_mult, cfg.layer_decay, cfg.freeze_backbone)


def build_optimizer(param_groups: list[dict], cfg: OptimConfig) -> torch.optim.Optimizer:
    """An optimiser over ``param_groups``; each group remembers its base lr as ``base_lr``."""
    for group in param_groups:
        group.setdefault("base_lr", group["lr"])
    if cfg.name == "sgd":
        return torch.optim.SGD(
            param_groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
        )
    if cfg.name == "adamw":
        return torch.optim.AdamW(param_groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimiser {cfg.name!r} (sgd or adamw)")


def lr_factor(step: int, total: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at ``step`` (0-based).

    Linear warm-up over ``warmup_iters``, then ``(1 - t/total) ** power``. Steps past
    ``total`` keep the last value instead of failing (the published CPSL/ProDA schedule
    crashes there).
    """
    if step < cfg.warmup_iters:
        k = step / max(1, cfg.warmup_iters)
        return cfg.warmup_ratio + (1 - cfg.warmup_ratio) * k
    progress = min(step, total - 1) / max(1, total)
    return (1 - progress) ** cfg.poly_power


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> None:
    """Scale every group's base lr (recorded at the first call when not set) by ``factor``."""
    for group in optimizer.param_groups:
        group["lr"] = group.setdefault("base_lr", group["lr"]) * factor
