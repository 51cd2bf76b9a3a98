"""``pixcli demo``: every stage on the built-in benchmark, one table at the end.

The chain so far: make-benchmark -> warmup (source-only) -> warmup on target labels (the
oracle) -> eval of each on target val. Each step is an ordinary stage writing into its own
directory under ``OUT``, so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from pixcli.artifacts import read_json, write_json
from pixcli.config import to_dict
from pixcli.data.benchmark import BenchmarkConfig
from pixcli.data.transforms import AugmentConfig
from pixcli.engine.optim import OptimConfig
from pixcli.engine.progress import console
from pixcli.engine.trainer import LoopConfig
from pixcli.models import SegmentorConfig
from pixcli.reporting import comparison_table, print_table
from stages import eval as eval_stage
from stages import make_benchmark, warmup


def demo_warmup() -> warmup.WarmupConfig:
    """The CPU demo's training recipe (examples/demo.toml holds the same settings)."""
    return warmup.WarmupConfig(
        batch_size=8,
        num_workers=2,
        model=SegmentorConfig(backbone="resnet18", head="deeplabv2", output_stride=8),
        optim=OptimConfig(name="sgd", lr=0.01, head_lr_mult=1.0, weight_decay=1e-4),
        loop=LoopConfig(iterations=1000, log_every=20, eval_every=0, checkpoint_every=250),
        augment=AugmentConfig(crop_size=(128, 128), scale_range=(0.75, 1.5), flip=True),
    )


@dataclass
class DemoConfig:
    seed: int = 0
    device: str = "auto"
    oracle: bool = True  # also train on target labels: the upper bound
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    warmup: warmup.WarmupConfig = field(default_factory=demo_warmup)


def _benchmark(out: Path, cfg: BenchmarkConfig) -> None:
    meta_path = out / "benchmark.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        if meta.get("complete") and meta.get("config") == dataclasses.asdict(cfg):
            console.print(f"{out}: benchmark already written")
            return
    make_benchmark.run(out, cfg.seed, base=cfg)


def run(cfg: DemoConfig, out: Path) -> dict:
    bench = out / "benchmark"
    _benchmark(bench, dataclasses.replace(cfg.benchmark, seed=cfg.seed))
    source, target = f"gta5:{bench / 'source'}", f"cityscapes:{bench / 'target'}"
    common = {"device": cfg.device, "seed": cfg.seed, "val": target}
    runs = {"warmup": dataclasses.replace(cfg.warmup, source=source, **common)}
    if cfg.oracle:
        runs["oracle"] = dataclasses.replace(cfg.warmup, source=target, **common)
    rows = []
    for name, wcfg in runs.items():
        console.rule(f"[bold]{name}")
        warmup.run(wcfg, out / name)
        ecfg = eval_stage.EvalConfig(data=target, device=cfg.device, seed=cfg.seed)
        rows.append((name, eval_stage.run(ecfg, out / name / "model.pt", out / f"eval-{name}")))
    classes = rows[0][1]["per_class"].keys()
    print_table(comparison_table(rows, list(classes), "demo: target-val IoU per model"))
    summary = {
        "config": to_dict(cfg),
        "mIoU": {name: m["mIoU"] for name, m in rows},
        "per_class_IoU": {
            name: {c: v["IoU"] for c, v in m["per_class"].items()} for name, m in rows
        },
    }
    write_json(out / "summary.json", summary)
    return summary
