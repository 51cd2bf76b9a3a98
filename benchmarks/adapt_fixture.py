"""What the adaptation benchmarks share: a small built-in benchmark, an untrained "warm-up"
checkpoint of the demo's model, its ``pseudo.h5``, and the demo's adapt config pointed at them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from pixcli.artifacts import save_checkpoint
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.models import SegmentorConfig, build_segmentor
from stages import adapt, pseudolabel
from stages.demo import demo_adapt, demo_warmup


def adapt_fixture(
    root: Path, iterations: int, quick: bool = False
) -> tuple[adapt.AdaptConfig, Path]:
    """The demo's adapt config (``iterations``, no logging or checkpoints in between) on 40 + 40
    benchmark images in ``root``, and the checkpoint to start from; ``quick``: tiny sizes."""
    bench = root / "bench"
    size = {"width": 64, "height": 32, "n_source": 4, "n_target_train": 4} if quick else {}
    make_benchmark(bench, dataclasses.replace(BenchmarkConfig(), **{"n_source": 40,
                   "n_target_train": 40, "n_target_val": 4, **size}))  # fmt: skip
    model_cfg = demo_warmup().model
    if quick:
        model_cfg = SegmentorConfig(backbone="test_resnet", head="deeplabv2", feature_dim=16)
    torch.manual_seed(0)
    ckpt = root / "warm.pt"
    save_checkpoint(ckpt, {"model_config": model_cfg.to_dict(), "step": 0,
                           "classes": list(CITYSCAPES.classes),
                           "state_dict": build_segmentor(model_cfg).state_dict()})  # fmt: skip
    target = f"cityscapes:{bench / 'target'}"
    pl_cfg = pseudolabel.PseudolabelConfig(target=target, device="cpu", num_workers=0)
    pseudolabel.run(pl_cfg, ckpt, root / "pseudo")
    cfg = demo_adapt()
    cfg.device = "cpu"
    cfg.source, cfg.target = f"gta5:{bench / 'source'}", target
    cfg.pseudo = str(root / "pseudo" / "pseudo.h5")
    if quick:
        cfg.batch_size, cfg.num_workers = 2, 0
        cfg.augment = dataclasses.replace(cfg.augment, crop_size=(32, 32))
    cfg.loop = dataclasses.replace(
        cfg.loop, iterations=iterations, log_every=10**9, checkpoint_every=10**9
    )
    return cfg, ckpt
