"""``pixcli make-benchmark``: write the built-in synthetic-to-real benchmark."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from pixcli.data.benchmark import BenchmarkConfig, make_benchmark
from pixcli.engine.progress import console, make_progress
from pixcli.errors import UserError


def parse_size(size: str) -> tuple[int, int]:
    """``"256x128"`` -> (width, height)."""
    try:
        w, h = (int(v) for v in size.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {size!r}: expected WxH, e.g. 256x128") from None
    if w < 32 or h < 16:
        raise UserError(f"--size {size!r}: at least 32x16")
    return w, h


def run(
    out: Path,
    seed: int = 0,
    size: str | None = None,
    n_source: int | None = None,
    n_target_train: int | None = None,
    n_target_val: int | None = None,
    base: BenchmarkConfig | None = None,
    style: str | None = None,
) -> dict:
    """Write the benchmark into ``out`` unless the same one is already there."""
    cfg = dataclasses.replace(base or BenchmarkConfig(), seed=seed)
    if style is not None:
        cfg.style = style
    if size is not None:
        cfg.width, cfg.height = parse_size(size)
    for name, value in (
        ("n_source", n_source), ("n_target_train", n_target_train), ("n_target_val", n_target_val)
    ):  # fmt: skip
        if value is not None:
            if value < 1:
                raise UserError(f"--{name.replace('_', '-')} {value}: at least 1")
            setattr(cfg, name, value)
    with make_progress() as progress:
        task = progress.add_task("draw", total=None, rate="", info="")

        def tick(done: int, total: int) -> None:
            progress.update(task, completed=done, total=total)

        summary = make_benchmark(out, cfg, progress=tick)
    specs = summary.get("specs", {})
    console.print(f"benchmark written to {out}: " + ", ".join(f"{k} {v}" for k, v in specs.items()))
    return summary
