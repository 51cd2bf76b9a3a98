"""Training-step time of decode-head variants on the CPU recipe's backbone, as ratios.

    python benchmarks/model_speed.py              # demo backbone, batch 4 of 128x128 crops
    python benchmarks/model_speed.py --quick --json   # tiny model: checks it runs

One step = forward, a cross-entropy on random labels, backward and an AdamW step on a batch
already in memory (the student's share of an adaptation step; the loop adds a second batch
and the teacher's forward). Every variant is timed in this one process, interleaved over
``--rounds`` rounds, and reported as the median ms and its ratio to the demo recipe's model
(``stages.demo.demo_warmup``), so a noisy shared machine moves all rows alike.

Measured (2 cores, seed 0, on a machine shared with other runs): the hypercolumn fusion of
all 960 ResNet-18 channels at stride 4 (``stage_dim = 0``) was 1.8x the time of the recipe's
``stage_dim = 64`` (258 against 144 ms per step); the fusion was two thirds of the forward.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_common_options, report, table, timed  # noqa: E402
from pixcli.models import SegmentorConfig, build_segmentor  # noqa: E402
from stages.demo import demo_warmup  # noqa: E402


def variants(base: SegmentorConfig) -> dict[str, SegmentorConfig]:
    """The recipe's model and the head variants around it."""

    def head(name: str, **kwargs: object) -> SegmentorConfig:
        return dataclasses.replace(base, head=name, head_kwargs=dict(kwargs))

    return {
        "recipe (hypercolumn, stage_dim 64)": base,
        "hypercolumn, no projection": head("hypercolumn"),
        "hypercolumn, stage_dim 128": head("hypercolumn", stage_dim=128),
        "deeplabv3plus": head("deeplabv3plus"),
        "deeplabv2": head("deeplabv2"),
    }


def step_function(cfg: SegmentorConfig, batch: int, crop: int) -> Callable[[], None]:
    torch.manual_seed(0)
    model = build_segmentor(cfg, load_weights=False).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.randn(batch, 3, crop, crop)
    y = torch.randint(0, cfg.num_classes, (batch, crop, crop))

    def step() -> None:
        logits = F.interpolate(model(x).logits, size=(crop, crop), mode="bilinear")
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per round")
    parser.add_argument("--threads", type=int, default=2)
    add_common_options(parser)
    a = parser.parse_args()
    torch.set_num_threads(1 if a.quick else a.threads)
    recipe = demo_warmup()
    base = dataclasses.replace(recipe.model, num_classes=19, pretrained=False)
    batch, crop = (1, 32) if a.quick else (4, recipe.augment.crop_size[0])
    if a.quick:
        base = dataclasses.replace(base, backbone="test_resnet", feature_dim=16)
    steps = {name: step_function(cfg, batch, crop) for name, cfg in variants(base).items()}
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(1 if a.quick else a.rounds):
        for name, step in steps.items():
            times[name].append(timed(step, repeat=1 if a.quick else a.steps))
    recipe_ms = statistics.median(times[next(iter(times))]) * 1000
    rows: list[list[object]] = []
    for name, values in times.items():
        ms = statistics.median(values) * 1000
        rows.append([name, round(ms, 1), round(ms / recipe_ms, 2)])
    title = (
        f"training step (forward, CE, backward, AdamW), batch {batch} of {crop}x{crop}, "
        f"{base.backbone}, {torch.get_num_threads()} threads; ratio to the recipe's model"
    )
    report([table(title, ["model", "ms/step", "x recipe"], rows)], a.json)


if __name__ == "__main__":
    main()
