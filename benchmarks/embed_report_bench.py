"""Time of ``pixcli embed-report``'s per-checkpoint analysis for 5k, 10k and 20k points.

    python benchmarks/embed_report_bench.py                 # OpenMP threads as the machine has
    python benchmarks/embed_report_bench.py --threads 1     # one thread (a shared machine)
    OMP_WAIT_POLICY=passive python benchmarks/embed_report_bench.py
    python benchmarks/embed_report_bench.py --quick --json  # 500 points: checks it runs

On a CPU that other processes also use, OpenMP threads that spin while they wait (libgomp's
default) make scikit-learn's Barnes-Hut t-SNE two to three times slower than one thread;
``OMP_WAIT_POLICY=passive`` or ``--threads 1`` avoid that.

Synthetic features stand in for a model's (19 classes, 256 dimensions as DeepLabV2's
decoder features, well-separated class clusters with noise): the analysis costs the same
whatever model made them. Each size runs in its own process so that peak memory is its
own. Timed: the indices (Calinski-Harabasz, Davies-Bouldin, silhouette on 5000 points),
the t-SNE embedding (PCA to 50 dims first, 1000 iterations) and drawing the PNG. Not
timed: reading images and the model's forward passes (see ``warmup_eval_bench.py``).
Goal: 10k points in under 60 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    add_common_options,
    last_json_line,
    peak_rss_mb,
    report,
    table,
)

SIZES = (5_000, 10_000, 20_000)
QUICK_SIZES = (500,)
CLASSES = 19
DIM = 256


def synthetic(points: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``points`` features in ``CLASSES`` equal-sized Gaussian clusters of dimension ``DIM``."""
    rng = np.random.default_rng(seed)
    labels = np.arange(points) % CLASSES
    centres = rng.normal(size=(CLASSES, DIM)) * 0.6
    return (centres[labels] + rng.normal(size=(points, DIM))).astype(np.float32), labels


def one(points: int) -> dict:
    from pixcli.data.taxonomy import CITYSCAPES
    from pixcli.engine.embedding import TsneConfig, cluster_scores, tsne_2d
    from pixcli.plots import legend_image, save_png, scatter_panel, side_by_side

    features, labels = synthetic(points)
    times = {}
    start = time.perf_counter()
    scores = cluster_scores(features, labels)
    times["scores"] = time.perf_counter() - start
    start = time.perf_counter()
    xy = tsne_2d(features, TsneConfig())
    times["tsne"] = time.perf_counter() - start
    start = time.perf_counter()
    palette = CITYSCAPES.palette
    panel = scatter_panel(xy, labels, palette, ["bench", f"CH {scores['calinski_harabasz']:.1f}"])
    legend = legend_image([(c, palette[i]) for i, c in enumerate(CITYSCAPES.classes)])
    with tempfile.TemporaryDirectory() as tmp:
        save_png(Path(tmp) / "t.png", side_by_side([panel, legend]))
    times["picture"] = time.perf_counter() - start
    return {**times, "silhouette": scores["silhouette"], "peak_mb": peak_rss_mb()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, help="OpenMP threads (default: the machine's)")
    add_common_options(parser)
    parser.add_argument("--one", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one)))
        return
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    threads = env.get("OMP_NUM_THREADS", f"all {os.cpu_count()} cores")
    threads += f", wait policy {env.get('OMP_WAIT_POLICY', 'default')}"
    rows = []
    for points in QUICK_SIZES if args.quick else SIZES:
        cmd = [sys.executable, __file__, "--one", str(points)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
        r = last_json_line(done.stdout)
        total = r["scores"] + r["tsne"] + r["picture"]
        rows.append([points, r["scores"], r["tsne"], r["picture"], total, r["peak_mb"]])
    title = (
        f"embed-report analysis, {CLASSES} classes x {DIM} dims, OpenMP threads: {threads}; "
        "goal: 10k points < 60 s"
    )
    columns = ["points", "indices (s)", "t-SNE (s)", "PNG (s)", "total (s)", "peak RSS (MiB)"]
    report([table(title, columns, rows)], args.json)


if __name__ == "__main__":
    main()
