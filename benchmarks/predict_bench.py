"""`pixcli predict` images/s against a bare forward pass, and `pixcli --help` latency.

    python benchmarks/predict_bench.py                # demo model on the benchmark's val images
    OMP_WAIT_POLICY=passive python benchmarks/predict_bench.py   # on a machine others use
    python benchmarks/predict_bench.py --quick --json # tiny model: checks it runs

- ``predict``: `stages.predict.run` for real on the built-in benchmark's target val images
  (read from disk, whole-image inference, label + colour + overlay files written), images/s
  over its prediction loop (the manifest's ``images_per_s``; loading the model excluded).
- ``bare``: the checkpoint's model on the same images already in memory as normalised
  tensors, stacked as predict stacks them: forward, upsampling, class ids
  (:func:`pixcli.predictor.class_ids`, as predict), batch 1. Overhead = bare / predict - 1
  (goal: under 15%).
- The two are measured ``--rounds`` times (default 5) one after the other, in alternating
  order, after one untimed warm-up of each, in one process (same torch threads); the
  table gives the median and range of the per-round overhead, and each side's CPU time
  per image (all threads; predict's includes loading the model, about 0.14 s per run),
  which a shared machine disturbs much less than wall time.
- OpenMP's default wait policy spins: with other processes on the cores, a 2-thread
  forward then runs 2-4x slower, by an amount that depends on the process's other threads
  (torch operations in other threads make libgomp throttle its spinning), so that wall-time
  ratios measure the scheduler, not predict. ``OMP_WAIT_POLICY=passive`` (set before
  Python starts; the title shows it) avoids that on a shared machine.
- ``--help``: wall time of ``pixcli --help`` in a fresh interpreter (median of 5 runs), now
  and with the training loop (so torch) imported first, as ``pixcli/cli.py`` did before
  issue 18; and the cumulative import time of ``pixcli.cli`` from ``python -X importtime``.
  Measured at commit 0913188 (before), ``python -X importtime -c "import pixcli.cli"``:
  1.71 s, of which torch 1.62 s; ``time pixcli --help``: 2.8 s on a busy 2-core machine.

Measured at commit d174e15 on an idle machine (load 0.9-1.3, ``OMP_WAIT_POLICY=passive``):
bare 8.97 img/s and 206 CPU ms per image, predict 8.42 img/s and 218 CPU ms; overhead 6.5%
(rounds 6.2% to 6.9%), extra CPU 6.1%; writing one image's files 5.72 CPU ms before 55f77ac
(fsyncs, zlib 6), 4.51 now. That machine's forward was about 4x slower than the one below,
so the same extra milliseconds are a smaller share.

Measured at commit 5ecded4 (``OMP_WAIT_POLICY=passive python benchmarks/predict_bench.py``,
the demo model with the hypercolumn ``stage_dim`` 64, the machine shared with three or four
trainings, load average 4.3-5.4): bare 12.07 img/s and 49 CPU ms per image, predict 9.81
img/s and 58 CPU ms (medians); overhead 22.6% (rounds: 17.7% to 77.7%), over the goal;
extra CPU time 19.3% (17.7% to 23.3%). The code before 1684519 against 1684519 in one run
(interleaved, 3 rounds): extra CPU 26-38% against 18-23%. Where predict's extra time goes
(CPU ms per 256x128 image, measured under load): reading the PNG 1.2; writing 5.7 (the
fsyncs of atomic writes about 1.5, colour PNG 0.9, label PNG 0.45, JPEG 0.13, colours and
blending 0.55, temporary files and renames the rest); normalising about 1; class ids and
their conversion 0.6. Earlier the writing threads also ran the argmax in torch (4 ms, in
an OpenMP team of their own).
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pixcli  # noqa: E402
from benchmarks.common import add_common_options, report, table  # noqa: E402
from pixcli.artifacts import atomic_write, save_checkpoint, save_label_png  # noqa: E402
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark  # noqa: E402
from pixcli.data.image_files import ImageFile, read_image  # noqa: E402
from pixcli.data.taxonomy import CITYSCAPES  # noqa: E402
from pixcli.data.transforms import normalize  # noqa: E402
from pixcli.engine.inference import upsampled_logits  # noqa: E402
from pixcli.models import SegmentorConfig, build_segmentor  # noqa: E402
from pixcli.models.checkpoint import segmentor_from_checkpoint  # noqa: E402
from pixcli.predictor import Predictor, blend, class_ids  # noqa: E402
from stages import predict  # noqa: E402
from stages.demo import demo_warmup  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUICK_BENCHMARK = BenchmarkConfig(width=64, height=32, n_source=2, n_target_train=2, n_target_val=4)
QUICK_MODEL = SegmentorConfig(backbone="test_resnet", head="deeplabv2", feature_dim=16)


def checkpoint(path: Path, model_cfg: SegmentorConfig) -> Path:
    """A checkpoint of an untrained model (speed does not depend on the weights)."""
    torch.manual_seed(0)
    weights = build_segmentor(model_cfg, load_weights=False).state_dict()
    save_checkpoint(
        path,
        {"model_config": model_cfg.to_dict(), "classes": list(CITYSCAPES.classes),
         "state_dict": weights, "step": 0},
    )  # fmt: skip
    return path


@dataclass
class Speed:
    images_per_s: float
    cpu_ms: float  # CPU time of the whole process (every thread) per image


def predict_speed(ckpt: Path, images: list[Path], out: Path) -> Speed:
    """`stages.predict.run` on ``images`` into ``out``: its loop's images/s (the manifest's
    ``images_per_s``: reading, predicting, writing; loading the model excluded) and the
    process's CPU time per image (loading the model included: about 0.14 s)."""
    cfg = predict.PredictConfig(images=[str(p) for p in images], device="cpu")
    cpu = time.process_time()
    rate = predict.run(cfg, ckpt, out)["images_per_s"]
    return Speed(rate, 1000 * (time.process_time() - cpu) / len(images))


def bare_speed(model: torch.nn.Module, tensors: list[torch.Tensor]) -> Speed:
    """Forward, upsampling and class ids of each tensor (batch 1, already in memory and
    normalised; the ids as predict takes them, :func:`pixcli.predictor.class_ids`)."""
    start, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        for x in tensors:
            class_ids(upsampled_logits(model, x))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return Speed(len(tensors) / seconds, 1000 * cpu_seconds / len(tensors))


def interleaved(
    ckpt: Path, images: list[Path], tmp: Path, rounds: int
) -> list[tuple[Speed, Speed]]:
    """``(bare, predict)`` per round, the two measured one after the other in each round
    (in alternating order), so that both see the same load on a shared machine. Same model
    (the checkpoint's), same images and input tensors (stacked as predict stacks them),
    same threads; one warm-up of each, not counted."""
    model, _ = segmentor_from_checkpoint(ckpt)
    tensors = [torch.stack([normalize(read_image(p))]) for p in images]
    bare_speed(model, tensors[:10])
    predict_speed(ckpt, images[:10], tmp / "warm-up")
    pairs = []
    for r in range(rounds):
        if r % 2 == 0:
            bare = bare_speed(model, tensors)
            pred = predict_speed(ckpt, images, tmp / f"round{r}")
        else:
            pred = predict_speed(ckpt, images, tmp / f"round{r}")
            bare = bare_speed(model, tensors)
        pairs.append((bare, pred))
    return pairs


def _write_before(predictor: Predictor, image: np.ndarray, label: np.ndarray, out: Path) -> None:
    """One image's three files as predict wrote them before 55f77ac: fsynced atomic writes,
    PNGs at PIL's default zlib level 6."""
    colors = predictor.colorize(label)
    for name, array, fmt, options in (("color.png", colors, "PNG", {}),
                                      ("overlay.jpg", blend(image, colors, 0.5), "JPEG",
                                       {"quality": 90})):  # fmt: skip
        pil = Image.fromarray(array)
        atomic_write(out / name, lambda tmp, p=pil, f=fmt, o=options: p.save(tmp, format=f, **o))
    save_label_png(out / "label.png", label, predictor.palette_table())


def writing_cpu_ms(ckpt: Path, image_path: Path, tmp: Path, rounds: int) -> tuple[float, float]:
    """CPU ms to write one image's label, colour and overlay files, before 55f77ac and now
    (:func:`stages.predict.write_outputs`): medians over ``rounds`` interleaved rounds of 20
    images each (the model's class ids of one benchmark image)."""
    predictor = pixcli.load(ckpt, device="cpu")
    image = read_image(image_path)
    label = predictor.predict(image)
    cfg = predict.PredictConfig()
    times: dict[str, list[float]] = {"before": [], "now": []}
    for r in range(rounds):
        for kind in ("before", "now"):
            cpu = time.process_time()
            for i in range(20):
                out = tmp / f"write-{kind}-{r}-{i}"
                out.mkdir(parents=True)
                if kind == "before":
                    _write_before(predictor, image, label, out)
                else:
                    item = ImageFile(image_path, f"write-{kind}-{r}-{i}/x")
                    paths = predict.output_paths(tmp, item, cfg)
                    predict.write_outputs(predictor, image, {"label": label}, paths, 0.5)
            times[kind].append(1000 * (time.process_time() - cpu) / 20)
    return statistics.median(times["before"]), statistics.median(times["now"])


def help_seconds(runs: int, before: bool = False) -> float:
    """Median wall time of ``python -m pixcli --help``; ``before``: with the training loop
    (and so torch) imported first, as ``pixcli/cli.py`` did before issue 18."""
    eager = "import pixcli.engine.trainer; " if before else ""
    code = (
        f"{eager}import sys; sys.argv = ['pixcli', '--help']; from pixcli.cli import main; main()"
    )
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def import_seconds() -> float:
    """Cumulative import time of ``pixcli.cli`` from ``python -X importtime``."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-c", "import pixcli.cli"],
                          cwd=ROOT, check=True, capture_output=True, text=True)  # fmt: skip
    line = next(ln for ln in done.stderr.splitlines() if ln.rstrip().endswith("| pixcli.cli"))
    return int(re.split(r"\s*\|\s*", line)[1]) / 1e6


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5, help="bare/predict pairs measured")
    add_common_options(parser)
    args = parser.parse_args()
    threads = 1 if args.quick else 2
    torch.set_num_threads(threads)
    model_cfg = QUICK_MODEL if args.quick else demo_warmup().model
    rounds = 1 if args.quick else args.rounds
    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "bench"
        full = BenchmarkConfig(n_source=2, n_target_train=2)  # val: the default 100 images
        make_benchmark(bench, QUICK_BENCHMARK if args.quick else full)
        images = sorted((bench / "target" / "leftImg8bit" / "val").rglob("*.png"))
        ckpt = checkpoint(Path(tmp) / "model.pt", model_cfg)
        pairs = interleaved(ckpt, images, Path(tmp), rounds)
        write_before, write_now = writing_cpu_ms(ckpt, images[0], Path(tmp), rounds)
    runs = 2 if args.quick else 5
    help_now, help_before = help_seconds(runs), help_seconds(runs, before=True)
    overheads = sorted(100 * (b.images_per_s / p.images_per_s - 1) for b, p in pairs)
    cpu = sorted(100 * (p.cpu_ms / b.cpu_ms - 1) for b, p in pairs)
    speed = [
        ["bare forward (images in memory), median",
         f"{statistics.median(b.images_per_s for b, _ in pairs):.2f} img/s, "
         f"{statistics.median(b.cpu_ms for b, _ in pairs):.0f} CPU ms/img"],
        ["pixcli predict (read, predict, write 3 files), median",
         f"{statistics.median(p.images_per_s for _, p in pairs):.2f} img/s, "
         f"{statistics.median(p.cpu_ms for _, p in pairs):.0f} CPU ms/img"],
        ["predict overhead over the bare forward (goal < 15%): median, range of rounds",
         f"{statistics.median(overheads):.1f}%, {overheads[0]:.1f}% to {overheads[-1]:.1f}%"],
        ["predict's extra CPU time per image: median, range of rounds",
         f"{statistics.median(cpu):.1f}%, {cpu[0]:.1f}% to {cpu[-1]:.1f}%"],
        ["writing one image's 3 files, CPU ms: fsync + zlib 6 (before 55f77ac) / now",
         f"{write_before:.2f} / {write_now:.2f}"],
    ]  # fmt: skip
    latency = [
        ["pixcli --help, now (median wall time)", f"{help_now:.3f} s"],
        ["pixcli --help, torch imported eagerly (before)", f"{help_before:.3f} s"],
        ["import pixcli.cli (-X importtime, cumulative)", f"{import_seconds():.3f} s"],
    ]
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    title = (
        f"predict: {model_cfg.backbone}+{model_cfg.head} on {len(images)} benchmark val images, "
        f"{threads} CPU threads, OMP_WAIT_POLICY {policy}, {len(pairs)} interleaved rounds, "
        f"load average {load[0]:.1f} before, {os.getloadavg()[0]:.1f} after"
        + (" (--quick)" if args.quick else "")
    )
    report(
        [table(title, ["what", "speed"], speed), table("--help", ["what", "time"], latency)],
        args.json,
    )


if __name__ == "__main__":
    main()
