"""Rich tables for metrics: what a stage prints at its end."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

stdout = Console()


def _fmt(value: float | None) -> str:
    return "-" if value is None or value != value else f"{value:.1f}"


def metrics_table(metrics: dict, title: str) -> Table:
    """Per-class IoU and accuracy, then the means."""
    table = Table(title=title)
    for col in ("class", "IoU", "Acc", "pixels"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, row in metrics["per_class"].items():
        if row["pixels"] == 0 and row["IoU"] is None:
            continue
        table.add_row(name, _fmt(row["IoU"]), _fmt(row["Acc"]), str(row["pixels"]))
    table.add_section()
    for key in ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc"):
        if key in metrics:
            table.add_row(key, _fmt(metrics[key]), "", "")
    return table


def comparison_table(rows: Sequence[tuple[str, dict]], classes: Sequence[str], title: str) -> Table:
    """One row per model: mIoU and per-class IoU side by side."""
    table = Table(title=title)
    table.add_column("model")
    table.add_column("mIoU", justify="right")
    present = [c for c in classes if any(m["per_class"][c]["pixels"] > 0 for _, m in rows)]
    for c in present:
        table.add_column(c[:8], justify="right")
    for name, m in rows:
        table.add_row(name, _fmt(m["mIoU"]), *(_fmt(m["per_class"][c]["IoU"]) for c in present))
    return table


def print_table(table: Table) -> None:
    stdout.print(table)
