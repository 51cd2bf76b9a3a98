"""Rich tables for metrics: what a stage prints at its end."""

from __future__ import annotations

from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

stdout = Console()


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None or value != value else f"{value:.{digits}f}"


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


def confidence_table(rows: Sequence[dict], title: str) -> Table:
    """Accuracy against confidence (rows of :meth:`ConfidenceBins.evaluate`)."""
    table = Table(title=title)
    for col in ("confidence", "pixels %", "accuracy %", "kept if >= from %", "their accuracy %"):
        table.add_column(col, justify="right")
    for row in rows:
        closing = "]" if row["to"] >= 1.0 else ")"
        table.add_row(
            f"[{row['from']:.2f}, {row['to']:.2f}{closing}",
            _fmt(row["share"]),
            _fmt(row["accuracy"]),
            _fmt(row["kept_share"]),
            _fmt(row["kept_accuracy"]),
        )
    return table


# CH: Calinski-Harabasz, DB: Davies-Bouldin (see pixcli.engine.embedding.cluster_scores).
EMBEDDING_COLUMNS = ("checkpoint", "feature", "points", "CH ↑", "DB ↓", "silhouette ↑")


def embedding_rows(entries: Sequence[dict]) -> list[list[str]]:
    """Cells of :data:`EMBEDDING_COLUMNS`, one row per checkpoint of an embed-report."""
    return [
        [
            e["name"],
            f"{e['feature']} {e['dim']}",
            str(e["points"]),
            _fmt(e["calinski_harabasz"]),
            _fmt(e["davies_bouldin"], 3),
            _fmt(e["silhouette"], 3),
        ]
        for e in entries
    ]


def embedding_table(entries: Sequence[dict], title: str) -> Table:
    """How well each checkpoint's pixel features separate the classes."""
    table = Table(title=title, caption="CH: Calinski-Harabasz, DB: Davies-Bouldin")
    for i, col in enumerate(EMBEDDING_COLUMNS):
        table.add_column(col, justify="left" if i < 2 else "right")
    for row in embedding_rows(entries):
        table.add_row(*row)
    return table


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (``|`` in cells escaped)."""

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    return "\n".join([line(columns), line(["---"] * len(columns)), *map(line, rows)])


def distill_table(rounds: Sequence[dict], title: str) -> Table:
    """One row per distillation round (the round manifests' results of ``pixcli distill``)."""
    table = Table(title=title)
    for col in ("round", "teacher mIoU", "pseudo mIoU", "confident %", "student mIoU", "gain"):
        table.add_column(col, justify="right")
    for r in rounds:
        teacher, student = r["teacher_mIoU"], r["student_mIoU"]
        gain = None if teacher is None or student is None else student - teacher
        table.add_row(
            str(r["round"]),
            _fmt(teacher),
            _fmt(r["pseudo_mIoU"]),
            _fmt(100 * r["pseudo_confident"]),
            _fmt(student),
            "-" if gain is None else f"{gain:+.1f}",
        )
    return table
