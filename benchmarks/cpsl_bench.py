"""Where a CPSL iteration's time goes, and Sinkhorn alone at the paper's size.

    python benchmarks/cpsl_bench.py                 # demo setting, 30 timed iterations
    python benchmarks/cpsl_bench.py --iterations 60
    python benchmarks/cpsl_bench.py --quick --json  # tiny sizes: checks it runs

1. Sinkhorn-Knopp on 65,792 x 19 scores (512 current samples + a full 65,536-row memory bank,
   CPSL Sec. 4.1), epsilon 0.05, clustered cosine scores and a Cityscapes-like marginal: the
   published 3 iterations and pixcli's default (to an L1 class-marginal error of 1e-4).
2. One `pixcli adapt --method cpsl` iteration for real (`stages.adapt.run` on the built-in
   benchmark with the demo's model and recipe, a random-init "warm-up" checkpoint and its
   `pseudo.h5`), split by timers wrapped around the pieces: data (the loaders' `next` and the
   pseudo-label crops read from `pseudo.h5`), Sinkhorn, memory bank (push and read), and the
   rest of the step (forward and backward passes of student and teacher, optimiser, EMA).
   The iterations that fill the memory bank (65,536 rows at 4 x 512 samples per step: 32) and
   three start-up ones are not counted: the timed ones see a full bank, as in a long run.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import peak_rss_mb, report, table, timed, timed_steps_arguments  # noqa: E402
from pixcli.losses.sinkhorn import sinkhorn  # noqa: E402

TIMES: dict[str, float] = defaultdict(float)


def clustered_scores(n: int, classes: int, dim: int = 256, seed: int = 0) -> torch.Tensor:
    """Cosine scores of ``n`` unit features drawn around ``classes`` random unit centres."""
    gen = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(classes, dim, generator=gen), dim=1)
    which = torch.randint(0, classes, (n,), generator=gen)
    z = F.normalize(centres[which] + 0.08 * torch.randn(n, dim, generator=gen), dim=1)
    return z @ centres.T


def cityscapes_like_marginal(classes: int) -> torch.Tensor:
    """A long-tailed class distribution (road, building, vegetation large; things small)."""
    r = torch.tensor([0.33, 0.05, 0.2, 0.006, 0.008, 0.011, 0.002, 0.005, 0.14, 0.01, 0.035,
                      0.011, 0.001, 0.06, 0.002, 0.002, 0.002, 0.001, 0.004])[:classes]  # fmt: skip
    return r / r.sum()


def sinkhorn_rows(reps: int, rows_n: int = 65_792) -> list[list[Any]]:
    scores = clustered_scores(rows_n, 19)
    r = cityscapes_like_marginal(19)
    rows = []
    for label, max_it, tol in (("published: 3 iterations", 3, None), ("pixcli default", 100, 1e-4)):
        result = sinkhorn(scores, 0.05, r, None, max_it, tol)
        sec = timed(lambda m=max_it, t=tol: sinkhorn(scores, 0.05, r, None, m, t), reps)
        rows.append([f"Sinkhorn {rows_n:,} x 19, {label}", f"{1000 * sec:.0f} ms",
                     str(result.iterations), f"{result.marginal_error:.1e}"])  # fmt: skip
    return rows


def timing(key: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` that adds its wall time to ``TIMES[key]``."""

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            TIMES[key] += time.perf_counter() - start

    return wrapped


class TimedIterator:
    """An iterator whose ``next`` counts as data time."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __iter__(self) -> TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self.inner)
        finally:
            TIMES["data: loaders"] += time.perf_counter() - start


def instrument(skip: int) -> None:
    """Wrap the pieces of a CPSL step in timers (module attributes, as the code calls them)."""
    import pixcli.losses.cpsl as cpsl_losses
    from pixcli.engine import self_training
    from pixcli.losses.memory_bank import MemoryBank
    from pixcli.pseudo_labels import PseudoLabelFile
    from stages import adapt

    cpsl_losses.sinkhorn = timing("Sinkhorn", cpsl_losses.sinkhorn)
    MemoryBank.push = timing("memory bank", MemoryBank.push)  # type: ignore[method-assign]
    MemoryBank.get = timing("memory bank", MemoryBank.get)  # type: ignore[method-assign]
    PseudoLabelFile.soft_crop = timing(  # type: ignore[method-assign]
        "data: pseudo.h5 crops", PseudoLabelFile.soft_crop
    )
    loader = adapt.infinite_loader
    adapt.infinite_loader = lambda *a, **k: TimedIterator(loader(*a, **k))
    step_call = self_training.SelfTrainingStep.__call__
    counted = {"n": 0}

    def call(self: Any, step: int) -> dict[str, float]:
        if counted["n"] == skip:  # start counting once the bank is full
            TIMES.clear()
        counted["n"] += 1
        return timing("step", step_call)(self, step)

    self_training.SelfTrainingStep.__call__ = call  # type: ignore[method-assign]


SKIP = 35  # 32 steps fill the demo's bank (65,536 / (4 x 512)), 3 more for start-up


def cpsl_rows(iterations: int, quick: bool = False) -> list[list[Any]]:
    """One CPSL iteration split; ``quick``: a tiny model and benchmark, 1 skipped step."""
    from benchmarks.adapt_fixture import adapt_fixture
    from stages import adapt

    skip = 1 if quick else SKIP
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        cfg, ckpt = adapt_fixture(root, iterations + skip, quick)
        cfg.method = "cpsl"
        cfg.cpsl.memory_length = 65_536  # the paper's bank (the demo's is 16,384)
        instrument(skip)
        adapt.run(cfg, ckpt, root / "adapt")
    total = TIMES.pop("step")
    data = TIMES["data: loaders"] + TIMES["data: pseudo.h5 crops"]
    TIMES["forward/backward, optimiser, EMA (the rest)"] = (
        total - data - TIMES["Sinkhorn"] - (TIMES["memory bank"])
    )
    rows = [[f"CPSL iteration ({cfg.batch_size} + {cfg.batch_size} images, "
             f"{cfg.augment.crop_size[0]}x{cfg.augment.crop_size[1]})",
             f"{1000 * total / iterations:.0f} ms", "100%", ""]]  # fmt: skip
    for key, sec in TIMES.items():
        rows.append(
            [f"  {key}", f"{1000 * sec / iterations:.1f} ms", f"{100 * sec / total:.1f}%", ""]
        )
    rows.append(["peak memory", f"{peak_rss_mb():.0f} MiB", "", ""])
    return rows


def main() -> None:
    args = timed_steps_arguments(30, "timed CPSL iterations")
    if args.quick:
        args.iterations = 2
    sink = sinkhorn_rows(1, 2_048) if args.quick else sinkhorn_rows(3)
    step = cpsl_rows(args.iterations, args.quick)
    report(
        [
            table("Sinkhorn alone", ["what", "time", "iterations", "class marginal L1 error"],
                  sink),
            table("One CPSL iteration, split", ["part", "time / iteration", "share", ""], step),
        ],
        args.json,
    )  # fmt: skip


if __name__ == "__main__":
    main()
