"""Time per adaptation iteration of each method against the plain self-training loop.

    python benchmarks/methods_bench.py                # demo setting, 20 timed iterations each
    python benchmarks/methods_bench.py --iterations 40

Each method runs `stages.adapt.run` for real with the demo's recipe on the same small
benchmark and untrained checkpoint (``benchmarks/adapt_fixture.py``); PGPC's contrastive term
is switched on from the first step (its warm-up would otherwise skip it) and PiXL switches to
entropy-chosen crops at once. The first ``SKIP`` steps (start-up, CPSL's bank filling) are not
timed. The papers: PGPC costs about a third more than its DAFormer baseline.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.adapt_fixture import adapt_fixture  # noqa: E402
from benchmarks.common import peak_rss_mb, report, table, timed_steps_arguments  # noqa: E402

METHODS = ("none", "cpsl", "pgpc", "pixl")
SKIP = 10  # CPSL's demo bank (16,384 rows) is full after 8 steps of 4 x 512 samples


def seconds_per_step(method: str, iterations: int, skip: int, quick: bool) -> float:
    """Mean wall time of the timed steps of one ``adapt --method`` run."""
    from pixcli.engine import self_training
    from stages import adapt

    stamps: list[float] = []
    call = self_training.SelfTrainingStep.__call__

    def timed_call(self: Any, step: int) -> dict[str, float]:
        out = call(self, step)
        stamps.append(time.perf_counter())
        return out

    self_training.SelfTrainingStep.__call__ = timed_call  # type: ignore[method-assign]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            cfg, ckpt = adapt_fixture(root, iterations + skip, quick)
            cfg.method = method
            cfg.pgpc.warmup_iterations = 0
            cfg.pixl.entropy_crop_start = 0
            adapt.run(cfg, ckpt, root / "adapt")
    finally:
        self_training.SelfTrainingStep.__call__ = call  # type: ignore[method-assign]
    timed = stamps[skip - 1 :]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def main() -> None:
    args = timed_steps_arguments(20, "timed steps per method")
    iterations, skip = (2, 1) if args.quick else (args.iterations, SKIP)
    times = {m: seconds_per_step(m, iterations, skip, args.quick) for m in METHODS}
    rows = [[m, f"{1000 * t:.0f} ms", f"{t / times['none']:.2f}x"] for m, t in times.items()]
    rows.append(["peak memory", f"{peak_rss_mb():.0f} MiB", ""])
    title = f"adapt iteration per method (demo recipe, {args.threads} threads)"
    report([table(title, ["method", "time / iteration", "vs none"], rows)], args.json)


if __name__ == "__main__":
    main()
