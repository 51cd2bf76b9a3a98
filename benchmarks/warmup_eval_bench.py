"""Warmup iterations/s, eval images/s and peak memory; the loop's overhead over a bare step.

    python benchmarks/warmup_eval_bench.py            # demo setting
    python benchmarks/warmup_eval_bench.py --paper    # + 1024x512 ResNet-101 DeepLabV2 (slow)

Each measurement runs in its own process so that peak memory is its own.
- ``loop``: `stages.warmup.run` for real (data from disk, augmentation, schedule, logging,
  checkpoints) on the built-in benchmark; it/s over the steps after the first log window.
- ``bare``: the same model, batch and crop: forward, cross-entropy, backward, SGD step on a
  batch already in memory. Overhead = bare it/s / loop it/s - 1 (goal: under 10%).
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

from benchmarks.common import peak_rss_mb, print_rows, timed  # noqa: E402
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark  # noqa: E402
from pixcli.models import SegmentorConfig, build_segmentor  # noqa: E402
from stages.demo import demo_warmup  # noqa: E402

PAPER_MODEL = SegmentorConfig(backbone="resnet101", head="deeplabv2", output_stride=8)


def measure_bare(model_cfg: SegmentorConfig, batch: int, crop: tuple[int, int], reps: int) -> dict:
    model = build_segmentor(model_cfg).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
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


def measure_loop(bench: Path, iterations: int) -> dict:
    from stages import warmup

    cfg = dataclasses.replace(demo_warmup(), source=f"gta5:{bench / 'source'}", device="cpu")
    cfg.loop = dataclasses.replace(
        cfg.loop, iterations=iterations, log_every=10, checkpoint_every=10**9
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


def one(name: str, bench: Path) -> dict:
    demo = demo_warmup()
    bcfg = BenchmarkConfig()
    if name == "demo-loop":
        return measure_loop(bench, 60)
    if name == "demo-bare":
        return measure_bare(demo.model, demo.batch_size, demo.augment.crop_size, 20)
    if name == "demo-eval":
        return measure_eval(demo.model, (bcfg.height, bcfg.width), 20)
    if name == "paper-bare":
        return measure_bare(PAPER_MODEL, 1, (512, 1024), 2)
    if name == "paper-eval":
        return measure_eval(PAPER_MODEL, (512, 1024), 2)
    raise ValueError(name)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--paper", action="store_true", help="also the paper-sized model")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--bench", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        torch.set_num_threads(2)
        print(json.dumps(one(args.one, args.bench)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "bench"
        make_benchmark(bench, BenchmarkConfig())
        names = ["demo-loop", "demo-bare", "demo-eval"]
        if args.paper:
            names += ["paper-bare", "paper-eval"]
        res = {}
        for name in names:
            cmd = [sys.executable, __file__, "--one", name, "--bench", str(bench)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            res[name] = json.loads(out.strip().splitlines()[-1])
    demo = demo_warmup()
    rows = [
        [
            "demo warmup (pixcli loop)",
            f"{res['demo-loop']['it_s']:.2f} it/s",
            res["demo-loop"]["peak_mb"],
        ],
        [
            "demo warmup (bare step)",
            f"{res['demo-bare']['it_s']:.2f} it/s",
            res["demo-bare"]["peak_mb"],
        ],
        [
            "demo eval (whole image)",
            f"{res['demo-eval']['img_s']:.1f} img/s",
            res["demo-eval"]["peak_mb"],
        ],
    ]
    if args.paper:
        rows += [
            [
                "paper warmup step (bare, batch 1)",
                f"{res['paper-bare']['it_s']:.3f} it/s",
                res["paper-bare"]["peak_mb"],
            ],
            [
                "paper eval 1024x512",
                f"{res['paper-eval']['img_s']:.3f} img/s",
                res["paper-eval"]["peak_mb"],
            ],
        ]
    overhead = res["demo-bare"]["it_s"] / res["demo-loop"]["it_s"] - 1
    title = (
        f"warmup/eval on {torch.get_num_threads()} CPU threads; demo model {demo.model.backbone}+"
        f"{demo.model.head}, batch {demo.batch_size}, crop {demo.augment.crop_size}; "
        f"loop overhead {100 * overhead:.1f}% (goal < 10%)"
    )
    print_rows(title, ["what", "speed", "peak RSS (MiB)"], rows)


if __name__ == "__main__":
    main()
