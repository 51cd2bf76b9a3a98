"""``pixcli demo``: every stage on the built-in benchmark, one table at the end.

The chain: make-benchmark -> warmup (source-only) -> warmup on target labels (the oracle)
-> pseudolabel (from the source-only model) -> adapt with each method -> distill of the cpsl
model (``distill_rounds``, when cpsl is among the methods) -> eval of every model on target
val. Each step is an ordinary stage writing into its own directory under ``OUT``,
so an interrupted demo resumes where it stopped and a finished one only prints its table.
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
from pixcli.engine.self_training import SelfTrainingConfig
from pixcli.engine.trainer import LoopConfig
from pixcli.errors import UserError
from pixcli.losses.cpsl import CPSLConfig
from pixcli.methods import METHODS
from pixcli.models import SegmentorConfig
from pixcli.reporting import comparison_table, print_table
from stages import adapt, distill, make_benchmark, pseudolabel, report, warmup
from stages import eval as eval_stage


def demo_warmup() -> warmup.WarmupConfig:
    """The CPU demo's training recipe (examples/demo.toml holds the same settings)."""
    return warmup.WarmupConfig(
        batch_size=8,
        num_workers=1,
        model=SegmentorConfig(
            backbone="resnet18",
            head="hypercolumn",
            output_stride=16,
            head_kwargs={"stage_dim": 64},
        ),
        optim=OptimConfig(name="adamw", lr=1e-3, head_lr_mult=1.0, weight_decay=0.01),
        loop=LoopConfig(iterations=250, log_every=20, eval_every=0, checkpoint_every=100),
        augment=AugmentConfig(
            crop_size=(128, 128), scale_range=(0.75, 1.5), flip=True, color_jitter=0.4
        ),
    )


# The crops of the adaptation streams: the warm-up's, without its colour jitter (the teacher's
# weak view stays clean; the student's strong view has the loop's own jitter and blur).
DEMO_ADAPT_AUGMENT = AugmentConfig(crop_size=(128, 128), scale_range=(0.75, 1.5), flip=True)


def demo_adapt() -> adapt.AdaptConfig:
    """The CPU demo's adaptation recipe, shared by every method (examples/demo_adapt.toml
    says why each value; the measurements are in the README)."""
    return adapt.AdaptConfig(
        batch_size=4,
        num_workers=1,
        optim=OptimConfig(name="adamw", lr=1e-3, head_lr_mult=1.0, weight_decay=0.01),
        loop=LoopConfig(iterations=120, log_every=20, eval_every=0, checkpoint_every=100),
        augment=DEMO_ADAPT_AUGMENT,
        self_training=SelfTrainingConfig(
            ema_momentum=0.99,
            ema_ramp=False,
            rare_class_sampling=True,
            teacher_norm="batch",
            student_norm_from="unlabelled",
            target_colour_stats=1.0,
        ),
        # CPSL at the demo's lr (50x the paper's): lambda_2 = 0.1 keeps lr * lambda_2 at the
        # paper's 5e-4 (see CPSLConfig.lambda_reg); a 16,384-row bank (the last 8 steps' samples,
        # the paper's 65,536 is 128 images) keeps Sinkhorn cheap on the CPU; P_ST from the
        # online teacher, not the source-only model's pseudo.h5 (examples/demo_adapt.toml).
        cpsl=CPSLConfig(lambda_reg=0.1, memory_length=16_384, pseudo_labels="teacher"),
    )


def demo_distill() -> distill.DistillConfig:
    """The CPU demo's distillation recipe: the adaptation recipe, one round."""
    base = demo_adapt()
    return distill.DistillConfig(
        rounds=1,
        batch_size=base.batch_size,
        num_workers=base.num_workers,
        optim=base.optim,
        loop=base.loop,
        augment=base.augment,
        self_training=SelfTrainingConfig(classmix=False, student_norm_from="unlabelled"),
    )


@dataclass
class DemoConfig:
    seed: int = 0
    device: str = "auto"
    oracle: bool = True  # also train on target labels: the upper bound
    methods: list[str] = field(default_factory=lambda: ["none", "cpsl"])
    benchmark: BenchmarkConfig = field(default_factory=BenchmarkConfig)
    warmup: warmup.WarmupConfig = field(default_factory=demo_warmup)
    adapt: adapt.AdaptConfig = field(default_factory=demo_adapt)
    distill_rounds: int = 1  # rounds of `pixcli distill` from the cpsl model; 0 = none
    # The student: a --student-init value, or "warmup" (the source-only model). The CPU demo
    # has no pretrained backbone for a fresh student; "teacher" continues from the cpsl model
    # (a student started from the source-only model lost 1 point per round in 300 iterations).
    distill_student: str = "teacher"
    distill: distill.DistillConfig = field(default_factory=demo_distill)


def _benchmark(out: Path, cfg: BenchmarkConfig) -> None:
    meta_path = out / "benchmark.json"
    if meta_path.is_file():
        meta = read_json(meta_path)
        if meta.get("complete") and meta.get("config") == dataclasses.asdict(cfg):
            console.print(f"{out}: benchmark already written")
            return
    make_benchmark.run(out, cfg.seed, base=cfg)


def run(cfg: DemoConfig, out: Path) -> dict:
    unknown = [m for m in cfg.methods if m not in METHODS]
    if unknown:
        raise UserError(f"demo methods: unknown '{unknown[0]}' (known: {', '.join(METHODS)})")
    bench = out / "benchmark"
    _benchmark(bench, dataclasses.replace(cfg.benchmark, seed=cfg.seed))
    source, target = f"gta5:{bench / 'source'}", f"cityscapes:{bench / 'target'}"
    # The training stages (distill included: its round keeps the last student) skip their own
    # validation: the evals at the end score every model on target val.
    common = {"device": cfg.device, "seed": cfg.seed, "val": None}
    models: dict[str, Path] = {}

    def stage(title: str) -> None:
        console.rule(f"[bold]{title}")

    stage("warmup (source only)")
    warmup.run(dataclasses.replace(cfg.warmup, source=source, **common), out / "warmup")
    models["warmup"] = out / "warmup" / "model.pt"
    if cfg.oracle:
        stage("oracle (target labels)")
        # an upper bound: no colour jitter (a domain-gap augmentation; it cost 11 points)
        plain = dataclasses.replace(cfg.warmup.augment, color_jitter=0.0)
        oracle = dataclasses.replace(cfg.warmup, source=target, augment=plain, **common)
        warmup.run(oracle, out / "oracle")
        models["oracle"] = out / "oracle" / "model.pt"
    pseudo = out / "pseudo" / "pseudo.h5"
    if any(METHODS[m].needs_pseudo_file for m in cfg.methods):
        stage("pseudolabel")
        pcfg = pseudolabel.PseudolabelConfig(target=target, device=cfg.device, seed=cfg.seed)
        pseudolabel.run(pcfg, models["warmup"], out / "pseudo")
    for method in cfg.methods:
        stage(f"adapt --method {method}")
        acfg = dataclasses.replace(
            cfg.adapt, method=method, source=source, target=target,
            pseudo=str(pseudo) if METHODS[method].needs_pseudo_file else None, **common,
        )  # fmt: skip
        adapt.run(acfg, models["warmup"], out / f"adapt-{method}")
        models[method] = out / f"adapt-{method}" / "model.pt"
    if "cpsl" in models and cfg.distill_rounds > 0:
        stage(f"distill cpsl ({cfg.distill_rounds} round(s))")
        student = cfg.distill_student
        dcfg = dataclasses.replace(
            cfg.distill, source=source, target=target, rounds=cfg.distill_rounds,
            student_init=f"checkpoint:{models['warmup']}" if student == "warmup" else student,
            **common,
        )  # fmt: skip
        distill.run(dcfg, models["cpsl"], out / "distill-cpsl")
        models["cpsl+distill"] = out / "distill-cpsl" / "model.pt"
    rows = []
    for name, path in models.items():
        ecfg = eval_stage.EvalConfig(data=target, device=cfg.device, seed=cfg.seed)
        rows.append((name, eval_stage.run(ecfg, path, out / f"eval-{name}")))
    classes = list(rows[0][1]["per_class"].keys())
    print_table(comparison_table(rows, classes, "demo: target-val IoU per model"))
    summary = {
        "config": to_dict(cfg),
        "mIoU": {name: m["mIoU"] for name, m in rows},
        "per_class_IoU": {
            name: {c: v["IoU"] for c, v in m["per_class"].items()} for name, m in rows
        },
    }
    write_json(out / "summary.json", summary)
    evals = [out / f"eval-{name}" for name in models]  # report.run prints the page's path
    report.run(evals, out / "report.html", data=target, device=cfg.device)
    return summary
