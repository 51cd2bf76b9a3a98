"""Small helpers shared by the benchmark scripts: timing, peak memory, tables, options."""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from collections.abc import Callable

import torch
from rich.console import Console
from rich.table import Table


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux: ru_maxrss is KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Callable[[], object], repeat: int, warmup: int = 1) -> float:
    """Seconds per call of ``fn``, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeat


def print_rows(title: str, columns: list[str], rows: list[list[object]]) -> None:
    table = Table(title=title)
    for col in columns:
        table.add_column(col)
    for row in rows:
        table.add_row(*(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row))
    Console(file=sys.stdout).print(table)


Rows = list[list[object]]


def table(title: str, columns: list[str], rows: Rows) -> dict:
    """One table of figures, as ``report`` prints it and ``run_all.py`` reads it."""
    return {"title": title, "columns": columns, "rows": rows}


def report(tables: list[dict], as_json: bool) -> None:
    """Print ``tables``; with ``as_json`` as one JSON line ``{"tables": [...]}`` instead (the
    last line of the output, which ``run_all.py`` parses)."""
    if as_json:
        print(json.dumps({"tables": tables}, default=str))
        return
    for t in tables:
        print_rows(t["title"], t["columns"], t["rows"])


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--json`` and ``--quick``, which every benchmark script takes."""
    parser.add_argument("--json", action="store_true", help="print one JSON line of tables")
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks the script runs, measures nothing"
    )


def timed_steps_arguments(default_iterations: int, what: str) -> argparse.Namespace:
    """``--iterations``, ``--threads``, ``--json``, ``--quick`` parsed; torch's thread count set
    (one thread with ``--quick``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=default_iterations, help=what)
    parser.add_argument("--threads", type=int, default=2)
    add_common_options(parser)
    args = parser.parse_args()
    torch.set_num_threads(1 if args.quick else args.threads)
    return args


def last_json_line(stdout: str) -> dict:
    """The JSON object on the last line of a child process's output."""
    return json.loads(stdout.strip().splitlines()[-1])
