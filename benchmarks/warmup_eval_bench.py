"""Warmup iterations/s, eval images/s and peak memory; the loop's overhead over a bare step.

    python benchmarks/warmup_eval_bench.py            # demo setting
    python benchmarks/warmup_eval_bench.py --paper    # + 1024x512 ResNet-101 DeepLabV2 (slow)
    python benchmarks/warmup_eval_bench.py --quick --json   # tiny model: checks it runs

Each measurement runs in its own process so that peak memory is its own.
- ``loop``: `stages.warmup.run` for real (data from disk, augmentation, schedule, logging,
  checkpoints) on the built-in benchmark; it/s over the steps after the first log window.
- ``bare``: the same model, batch, crop and optimiser (the recipe's, e.g. the demo's AdamW):
  forward, cross-entropy, backward, optimiser step on a batch already in memory.
  Overhead = bare it/s / loop it/s - 1 (goal: under 10%).
- ``eval``: `pixcli eval`'s inference over target val (whole image), images/s.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_common_options,
    last_json_line,
    peak_rss_mb,
    report,
    table,
    timed,
)
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark  # noqa: E402
from pixcli.engine.optim import OptimConfig, build_optimizer  # noqa: E402
from pixcli.models import SegmentorConfig, build_segmentor  # noqa: E402
from stages.demo import demo_warmup  # noqa: E402
from stages.warmup import WarmupConfig  # noqa: E402

PAPER_MODEL = SegmentorConfig(backbone="resnet101", head="deeplabv2", output_stride=8)
PAPER_OPTIM = OptimConfig(name="sgd", lr=2.5e-4, momentum=0.9)  # CPSL/ProDA warm-up
QUICK_BENCHMARK = BenchmarkConfig(width=64, height=32, n_source=8, n_target_train=2, n_target_val=2)


def setting(quick: bool) -> WarmupConfig:
    """The demo's warmup recipe; ``quick``: a tiny model on 32x32 crops, batch 2."""
    cfg = demo_warmup()
    if not quick:
        return cfg
    return dataclasses.replace(
        cfg, batch_size=2, num_workers=0,
        model=SegmentorConfig(backbone="test_resnet", head="deeplabv2", feature_dim=16),
        augment=dataclasses.replace(cfg.augment, crop_size=(32, 32)),
    )  # fmt: skip


def measure_bare(
    model_cfg: SegmentorConfig, optim: OptimConfig, batch: int, crop: tuple[int, int], reps: int
) -> dict:
    model = build_segmentor(model_cfg).train()
    opt = build_optimizer(model.param_groups(optim.lr, optim.head_lr_mult), optim)
    x = torch.randn(batch, 3, *crop)
    y = torch.randint(0, model_cfg.num_classes, (batch, *crop))

    def step() -> None:
        logits = F.interpolate(model(x).logits, size=crop, mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    sec = timed(step, reps)
    return {"it_s": 1 / sec, "peak_mb": peak_rss_mb()}


def measure_loop(bench: Path, base: WarmupConfig, iterations: int, log_every: int) -> dict:
    from stages import warmup

    cfg = dataclasses.replace(base, source=f"gta5:{bench / 'source'}", device="cpu")
    cfg.loop = dataclasses.replace(
        cfg.loop, iterations=iterations, log_every=log_every, checkpoint_every=10**9
    )
    with tempfile.TemporaryDirectory() as tmp:
        warmup.run(cfg, Path(tmp))
        log = [
            json.loads(line) for line in (Path(tmp) / "train_log.jsonl").read_text().splitlines()
        ]
    rates = [e["it_s"] for e in log if "it_s" in e][1:]  # skip the first window (start-up)
    return {"it_s": sum(rates) / len(rates), "peak_mb": peak_rss_mb()}


def measure_eval(model_cfg: SegmentorConfig, size: tuple[int, int], n: int) -> dict:
    from pixcli.engine.inference import InferenceConfig, predict_logits

    model = build_segmentor(model_cfg).eval()
    x = torch.randn(1, 3, *size)
    sec = timed(lambda: predict_logits(model, x, InferenceConfig()).argmax(1), n)
    return {"img_s": 1 / sec, "peak_mb": peak_rss_mb()}


def one(name: str, bench: Path, quick: bool) -> dict:
    demo = setting(quick)
    bcfg = QUICK_BENCHMARK if quick else BenchmarkConfig()
    crop = demo.augment.crop_size
    assert crop is not None
    if name == "demo-loop":
        return measure_loop(bench, demo, 4, 1) if quick else measure_loop(bench, demo, 60, 10)
    if name == "demo-bare":
        return measure_bare(demo.model, demo.optim, demo.batch_size, crop, 2 if quick else 20)
    if name == "demo-eval":
        return measure_eval(demo.model, (bcfg.height, bcfg.width), 2 if quick else 20)
    if name == "paper-bare":
        return measure_bare(PAPER_MODEL, PAPER_OPTIM, 1, (512, 1024), 2)
    if name == "paper-eval":
        return measure_eval(PAPER_MODEL, (512, 1024), 2)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paper", action="store_true", help="also the paper-sized model")
    add_common_options(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--bench", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(1 if args.quick else 2)
        print(json.dumps(one(args.one, args.bench, args.quick)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "bench"
        make_benchmark(bench, QUICK_BENCHMARK if args.quick else BenchmarkConfig())
        names = ["demo-loop", "demo-bare", "demo-eval"]
        if args.paper and not args.quick:
            names += ["paper-bare", "paper-eval"]
        res = {}
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--bench", str(bench)]
            cmd += ["--quick"] if args.quick else []
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[name] = last_json_line(out)
    demo = setting(args.quick)
    rows: list[list[object]] = [
        ["demo warmup (pixcli loop)", f"{res['demo-loop']['it_s']:.2f} it/s",
         res["demo-loop"]["peak_mb"]],
        ["demo warmup (bare step)", f"{res['demo-bare']['it_s']:.2f} it/s",
         res["demo-bare"]["peak_mb"]],
        ["demo eval (whole image)", f"{res['demo-eval']['img_s']:.1f} img/s",
         res["demo-eval"]["peak_mb"]],
    ]  # fmt: skip
    if "paper-bare" in res:
        rows += [
            ["paper warmup step (bare, batch 1)", f"{res['paper-bare']['it_s']:.3f} it/s",
             res["paper-bare"]["peak_mb"]],
            ["paper eval 1024x512", f"{res['paper-eval']['img_s']:.3f} img/s",
             res["paper-eval"]["peak_mb"]],
        ]  # fmt: skip
    overhead = res["demo-bare"]["it_s"] / res["demo-loop"]["it_s"] - 1
    rows.append(["loop overhead over the bare step (goal < 10%)", f"{100 * overhead:.1f}%", ""])
    title = (
        f"warmup/eval on {1 if args.quick else 2} CPU threads; demo model "
        f"{demo.model.backbone}+{demo.model.head}, batch {demo.batch_size}, crop "
        f"{demo.augment.crop_size}" + (" (--quick)" if args.quick else "")
    )
    report([table(title, ["what", "speed", "peak RSS (MiB)"], rows)], args.json)


if __name__ == "__main__":
    main()
