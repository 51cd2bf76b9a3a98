"""pseudo.h5: bytes per image, the share of wall time spent writing, peak memory.

    python benchmarks/pseudolabel_bench.py                  # trains a small model first (minutes)
    python benchmarks/pseudolabel_bench.py --checkpoint runs/demo/warmup/model.pt
    python benchmarks/pseudolabel_bench.py --n 40           # N: val has N, train 4N images
    python benchmarks/pseudolabel_bench.py --quick --json   # tiny sizes: checks it runs

On the built-in benchmark (256x128 images), one CPU thread, each run in a fresh process:
- bytes per image of the whole pseudo.h5 (also without its fixed ~20 KiB of attributes,
  names and prototypes: the growth from N to 4N images), and of its soft labels alone,
  against float32 soft labels at the same grid (goal: at least 8x smaller);
- share of the labelling wall time spent writing: quantising, compressing, flushing
  (``PseudoLabelWriter.write``) plus building pseudo.h5 from the work file (goal: under
  10%; the quality report that follows is not counted). It depends on what inference
  costs, so it is measured twice: with the small model (whose inference is nearly free)
  and with the demo's ResNet-18 DeepLabV2, untrained;
- peak resident memory of a run over N and over 4N images (goal: equal);
- the writer alone at a Cityscapes grid (19 x 128 x 256, the benchmark's soft labels
  upsampled, so smoother than real ones): ms and bytes per image, to set against a GPU
  model's time per image.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_common_options,
    last_json_line,
    peak_rss_mb,
    report,
    table,
)
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark  # noqa: E402

CITYSCAPES_GRID = (128, 256)


def train_small_model(bench: Path, out: Path, iterations: int) -> Path:
    """A quickly warmed-up model: a tiny ResNet + DeepLabV2 head at output stride 8."""
    from pixcli.data.transforms import AugmentConfig
    from pixcli.engine.optim import OptimConfig
    from pixcli.engine.trainer import LoopConfig
    from pixcli.models import SegmentorConfig
    from stages import warmup

    cfg = warmup.WarmupConfig(
        source=f"gta5:{bench / 'source'}",
        device="cpu",
        batch_size=8,
        num_workers=1,
        model=SegmentorConfig(
            backbone="test_resnet", head="deeplabv2", output_stride=8, feature_dim=64
        ),
        optim=OptimConfig(name="sgd", lr=0.05, head_lr_mult=1.0, weight_decay=1e-4),
        loop=LoopConfig(iterations=iterations, log_every=50, checkpoint_every=10**9),
        augment=AugmentConfig(crop_size=(128, 128), scale_range=(0.75, 1.5), flip=True),
    )
    warmup.run(cfg, out)
    return out / "model.pt"


def random_demo_model(path: Path) -> Path:
    """The demo's architecture (ResNet-18 + DeepLabV2, output stride 8), untrained: its
    inference costs what the demo's does, which is what the share of writing depends on."""
    from pixcli.artifacts import save_checkpoint
    from pixcli.data.taxonomy import CITYSCAPES
    from pixcli.models import SegmentorConfig, build_segmentor

    cfg = SegmentorConfig(backbone="resnet18", head="deeplabv2", output_stride=8)
    model = build_segmentor(cfg)
    save_checkpoint(
        path,
        {"model_config": cfg.to_dict(), "classes": list(CITYSCAPES.classes),
         "state_dict": model.state_dict(), "step": 0},
    )  # fmt: skip
    return path


def measure_run(bench: Path, split: str, checkpoint: Path, out: Path) -> dict:
    """One pseudolabel run with the writer's time measured."""
    from pixcli.pseudo_labels import PseudoLabelWriter
    from stages import pseudolabel

    spent = {"write": 0.0, "finish": 0.0, "quality": 0.0}

    def timing(key: str, fn):
        def wrapped(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        return wrapped

    PseudoLabelWriter.write = timing("write", PseudoLabelWriter.write)
    pseudolabel._finish = timing("finish", pseudolabel._finish)
    pseudolabel.evaluate_pseudo_labels = timing("quality", pseudolabel.evaluate_pseudo_labels)
    cfg = pseudolabel.PseudolabelConfig(
        target=f"cityscapes:{bench / 'target'}", split=split, device="cpu", num_workers=1
    )
    start = time.perf_counter()
    pseudolabel.run(cfg, checkpoint, out)
    total = time.perf_counter() - start
    with h5py.File(out / "pseudo.h5", "r") as fh:
        n, c = len(fh["names"]), len(fh.attrs["classes"])
        grids = fh["grid_size"][()]
        soft_bytes = fh["soft"].id.get_storage_size()
        confidence = np.mean([fh["confidence"][i].mean() / 255 for i in range(n)])
    float32 = int(sum(c * h * w * 4 for h, w in grids))
    labelling = total - spent["quality"]
    return {
        "images": n,
        "grid": f"{grids[0][0]}x{grids[0][1]}",
        "file_bytes": (out / "pseudo.h5").stat().st_size,
        "soft_bytes": soft_bytes,
        "float32_bytes": float32,
        "mean_confidence": float(confidence),
        "write_s": spent["write"] + spent["finish"],
        "labelling_s": labelling,
        "peak_mb": peak_rss_mb(),
    }


def measure_cityscapes_grid(pseudo: Path, work: Path, count: int) -> dict:
    """The writer alone on Cityscapes-sized grids (19 x 128 x 256, stride 8)."""
    from pixcli.engine.prototypes import class_feature_sums, hard_labels
    from pixcli.pseudo_labels import (
        Header,
        ImageRecord,
        PseudoLabelFile,
        PseudoLabelWriter,
        quantize_probs,
    )

    labels = PseudoLabelFile(pseudo)
    count = min(count, len(labels))
    header = Header(
        classes=labels.classes,
        names=tuple(f"img{i}" for i in range(count)),
        output_stride=8,
        feature_dim=64,
        checkpoint="bench",
        dataset="bench",
        split="bench",
        dataset_fingerprint="bench",
        settings="{}",
    )
    sizes = np.tile([CITYSCAPES_GRID[0] * 8, CITYSCAPES_GRID[1] * 8], (count, 1))
    writer = PseudoLabelWriter.open(work, header, lambda: sizes)
    records = []
    for i in range(count):
        soft = torch.from_numpy(labels.soft(i))[None]
        probs = F.interpolate(soft, size=CITYSCAPES_GRID, mode="bilinear", align_corners=False)[0]
        hard, confidence = hard_labels(probs)
        sums, counts = class_feature_sums(torch.randn(64, *CITYSCAPES_GRID), hard, len(probs))
        records.append(ImageRecord(probs, hard, confidence, sums, counts))
    start = time.perf_counter()
    for record in records:
        quantize_probs(record.probs)
    quantize = time.perf_counter() - start
    start = time.perf_counter()
    with writer:
        for i, record in enumerate(records):
            writer.write(i, record)
    seconds = time.perf_counter() - start
    with h5py.File(work, "r") as fh:
        stored = sum(fh[k].id.get_storage_size() for k in ("soft", "hard", "confidence"))
    c = len(labels.classes)
    return {
        "ms_per_image": 1000 * seconds / count,
        "quantize_ms": 1000 * quantize / count,
        "bytes_per_image": stored / count,
        "float32_bytes": c * CITYSCAPES_GRID[0] * CITYSCAPES_GRID[1] * 4,
    }


def child(args: argparse.Namespace) -> dict:
    torch.set_num_threads(1)
    if args.one == "cityscapes":
        return measure_cityscapes_grid(args.pseudo, args.out / "work.h5", 20)
    return measure_run(args.bench, args.one, args.checkpoint, args.out)


def run_child(*extra: str) -> dict:
    cmd = [sys.executable, __file__, *extra]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(done.stderr[-3000:])
    return last_json_line(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--checkpoint", type=Path, help="a warmed-up model.pt (19 classes)")
    parser.add_argument("--n", type=int, default=40, help="N: val has N images, train 4N")
    parser.add_argument("--iterations", type=int, default=300, help="training of the small model")
    add_common_options(parser)
    for hidden in ("--one", "--bench", "--out", "--pseudo"):
        parser.add_argument(hidden, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.n, args.iterations = 2, 2
    if args.one:
        for key in ("bench", "out", "pseudo"):
            setattr(args, key, Path(getattr(args, key)) if getattr(args, key) else None)
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        bench = tmp / "bench"
        size = {"width": 64, "height": 32, "n_source": 4} if args.quick else {"n_source": 100}
        make_benchmark(bench, BenchmarkConfig(n_target_train=4 * args.n, n_target_val=args.n,
                                              **size))  # type: ignore[arg-type]  # fmt: skip
        checkpoint = args.checkpoint or train_small_model(bench, tmp / "warmup", args.iterations)
        common = ["--bench", str(bench), "--checkpoint", str(checkpoint)]
        runs = {
            split: run_child("--one", split, *common, "--out", str(tmp / split))
            for split in ("val", "train")
        }
        demo = random_demo_model(tmp / "demo.pt")
        timing = run_child("--one", "train", "--bench", str(bench), "--checkpoint", str(demo),
                           "--out", str(tmp / "demo"))  # fmt: skip
        city = run_child("--one", "cityscapes", "--pseudo", str(tmp / "val" / "pseudo.h5"),
                         "--out", str(tmp))  # fmt: skip
    rows = []
    for split, r in runs.items():
        rows.append(
            [
                f"{split}: {r['images']} images, grid {r['grid']}",
                f"{r['float32_bytes'] / r['images'] / 1024:.1f}",
                f"{r['file_bytes'] / r['images'] / 1024:.2f}",
                f"{r['float32_bytes'] / r['file_bytes']:.1f}x",
                f"{r['float32_bytes'] / r['soft_bytes']:.1f}x",
                f"{100 * r['write_s'] / r['labelling_s']:.1f}%",
                f"{r['peak_mb']:.0f}",
            ]
        )
    rows.append(
        [
            f"train again, demo model (ResNet-18, untrained): grid {timing['grid']}",
            f"{timing['float32_bytes'] / timing['images'] / 1024:.1f}",
            f"{timing['file_bytes'] / timing['images'] / 1024:.2f}",
            "(untrained)",
            "-",
            f"{100 * timing['write_s'] / timing['labelling_s']:.1f}%",
            f"{timing['peak_mb']:.0f}",
        ]
    )
    rows.append(
        [
            "writer alone, Cityscapes grid 19x128x256",
            f"{city['float32_bytes'] / 1024:.1f}",
            f"{city['bytes_per_image'] / 1024:.2f}",
            f"{city['float32_bytes'] / city['bytes_per_image']:.1f}x",
            "-",
            f"{city['ms_per_image']:.0f} ms/img ({city['quantize_ms']:.0f} quantising)",
            "-",
        ]
    )
    small, large = runs["val"], runs["train"]
    extra = (large["file_bytes"] - small["file_bytes"]) / (large["images"] - small["images"])
    per_image = large["float32_bytes"] / large["images"]
    rows.append(
        [
            f"each image beyond the first {small['images']}",
            f"{per_image / 1024:.1f}",
            f"{extra / 1024:.2f}",
            f"{per_image / extra:.1f}x" if extra > 0 else "-",  # tiny files grow in chunks
            "-",
            "-",
            "-",
        ]
    )
    confidence = runs["val"]["mean_confidence"]
    model = args.checkpoint or f"a test_resnet+DeepLabV2 warmed up {args.iterations} iterations"
    title = (
        f"pseudo.h5 on the built-in benchmark, 1 CPU thread; model: {model} (mean confidence "
        f"{confidence:.2f}). Goals: >= 8x smaller than float32, < 10% writing, equal memory"
    )
    columns = [
        "run", "float32 KiB/img", "pseudo.h5 KiB/img", "smaller (file)", "smaller (soft)",
        "time writing", "peak RSS MiB",
    ]  # fmt: skip
    report([table(title, columns, rows)], args.json)


if __name__ == "__main__":
    main()
