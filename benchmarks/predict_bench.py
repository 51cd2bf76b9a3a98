"""`pixcli predict` images/s against a bare forward pass, and `pixcli --help` latency.

    python benchmarks/predict_bench.py                # demo model on the benchmark's val images
    python benchmarks/predict_bench.py --quick --json # tiny model: checks it runs

- ``predict``: `stages.predict.run` for real on the built-in benchmark's target val images
  (read from disk, whole-image inference, label + colour + overlay files written), images/s
  over its prediction loop (the manifest's ``images_per_s``; loading the model excluded).
- ``bare``: the same model on the same images already in memory as normalised tensors:
  forward, upsampling, argmax, batch 1. Overhead = bare / predict - 1 (goal: under 15%).
- ``--help``: wall time of ``pixcli --help`` in a fresh interpreter (median of 5 runs), now
  and with the training loop (so torch) imported first, as ``pixcli/cli.py`` did before
  issue 18; and the cumulative import time of ``pixcli.cli`` from ``python -X importtime``.
  Measured at commit 0913188 (before), ``python -X importtime -c "import pixcli.cli"``:
  1.71 s, of which torch 1.62 s; ``time pixcli --help``: 2.8 s on a busy 2-core machine.
"""

from __future__ import annotations

import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import add_common_options, report, table, timed  # noqa: E402
from pixcli.artifacts import save_checkpoint  # noqa: E402
from pixcli.data.benchmark import BenchmarkConfig, make_benchmark  # noqa: E402
from pixcli.data.image_files import read_image  # noqa: E402
from pixcli.data.taxonomy import CITYSCAPES  # noqa: E402
from pixcli.data.transforms import normalize  # noqa: E402
from pixcli.engine.inference import upsampled_logits  # noqa: E402
from pixcli.models import SegmentorConfig, build_segmentor  # noqa: E402
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


def measure_predict(ckpt: Path, images: Path, out: Path) -> float:
    cfg = predict.PredictConfig(images=[str(images)], device="cpu")
    return predict.run(cfg, ckpt, out)["images_per_s"]


def measure_bare(model_cfg: SegmentorConfig, images: list[Path], repeat: int) -> float:
    model = build_segmentor(model_cfg, load_weights=False).eval()
    tensors = [normalize(read_image(p)).unsqueeze(0) for p in images]

    @torch.no_grad()
    def forward_all() -> None:
        for x in tensors:
            upsampled_logits(model, x).argmax(1)

    return len(tensors) / timed(forward_all, repeat)


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
    add_common_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1 if args.quick else 2)
    model_cfg = QUICK_MODEL if args.quick else demo_warmup().model
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "bench"
        full = BenchmarkConfig(n_source=2, n_target_train=2)  # val: the default 100 images
        make_benchmark(bench, QUICK_BENCHMARK if args.quick else full)
        val = bench / "target" / "leftImg8bit" / "val"
        ckpt = checkpoint(Path(tmp) / "model.pt", model_cfg)
        images = sorted(val.rglob("*.png"))
        bare = measure_bare(model_cfg, images, 1 if args.quick else 2)
        pred = measure_predict(ckpt, val, Path(tmp) / "pred")
    runs = 2 if args.quick else 5
    help_now, help_before = help_seconds(runs), help_seconds(runs, before=True)
    speed = [
        ["bare forward (images in memory)", f"{bare:.2f} img/s"],
        ["pixcli predict (read, predict, write 3 files)", f"{pred:.2f} img/s"],
        ["predict overhead over the bare forward (goal < 15%)", f"{100 * (bare / pred - 1):.1f}%"],
    ]
    latency = [
        ["pixcli --help, now (median wall time)", f"{help_now:.3f} s"],
        ["pixcli --help, torch imported eagerly (before)", f"{help_before:.3f} s"],
        ["import pixcli.cli (-X importtime, cumulative)", f"{import_seconds():.3f} s"],
    ]
    n = len(images)
    title = (
        f"predict: {model_cfg.backbone}+{model_cfg.head} on {n} benchmark val images, "
        f"{1 if args.quick else 2} CPU threads" + (" (--quick)" if args.quick else "")
    )
    report(
        [table(title, ["what", "speed"], speed), table("--help", ["what", "time"], latency)],
        args.json,
    )


if __name__ == "__main__":
    main()
