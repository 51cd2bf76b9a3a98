"""A tiny benchmark and a tiny, fast warmup configuration for stage tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pixcli.artifacts import save_checkpoint
from pixcli.data.benchmark import BenchmarkConfig
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.optim import OptimConfig
from pixcli.engine.trainer import LoopConfig
from pixcli.models import SegmentorConfig, build_segmentor
from stages.warmup import WarmupConfig

TINY_BENCHMARK = BenchmarkConfig(
    seed=3, width=64, height=32, n_source=6, n_target_train=4, n_target_val=3
)


def tiny_warmup(bench: Path, **changes: object) -> WarmupConfig:
    """A warmup config that trains a tiny model for a few steps on ``bench``."""
    cfg = WarmupConfig(
        source=f"gta5:{bench / 'source'}",
        val=f"cityscapes:{bench / 'target'}",
        device="cpu",
        batch_size=2,
        num_workers=0,
        model=SegmentorConfig(backbone="test_resnet", feature_dim=16),
        optim=OptimConfig(lr=0.01, head_lr_mult=1.0),
        loop=LoopConfig(iterations=4, log_every=1, checkpoint_every=2),
        augment=AugmentConfig(crop_size=(32, 32), scale_range=(0.75, 1.25)),
    )
    return dataclasses.replace(cfg, **changes)  # type: ignore[arg-type]


def random_checkpoint(path: Path, model: SegmentorConfig, seed: int = 0) -> Path:
    """An untrained model for the 19 Cityscapes classes saved as a pixcli checkpoint."""
    torch.manual_seed(seed)
    weights = build_segmentor(model).state_dict()
    save_checkpoint(
        path,
        {"model_config": model.to_dict(), "classes": list(CITYSCAPES.classes),
         "state_dict": weights, "step": 0},
    )  # fmt: skip
    return path
