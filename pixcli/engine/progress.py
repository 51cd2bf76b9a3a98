"""Progress output: a rich bar on a terminal, plain lines otherwise; silent on non-main ranks.

On a terminal (``console.is_terminal``: stderr, where the bar is drawn) :func:`make_progress`
gives a rich bar whose count, rate, elapsed and remaining time keep fixed columns; the free
``info`` text (losses) takes what is left of the line and is cut with an ellipsis. When stderr
is not a terminal (``nohup``, SLURM, ``2> file``) it gives a :class:`LineProgress` instead:
one plain line every ``log_every`` steps (and at the end), e.g.
``train 40/250 2.31 it/s elapsed 0:00:17 eta 0:01:31 loss_ce 0.412``; ``unit`` names what
is counted (``predict 40/300 9.80 images/s ...``).
Both have the calls the stages use: ``add_task``, ``update``, ``advance`` and ``console``.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text

console = Console(stderr=True)


class RateColumn(ProgressColumn):
    """``unit``s per second over rich's recent window, in a fixed-width column."""

    def __init__(self, unit: str = "it", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.unit = unit

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        rate = "    -" if speed is None else f"{speed:5.2f}"
        return Text(f"{rate} {self.unit}/s", style="progress.data")


def make_progress(
    enabled: bool = True, log_every: int = 0, unit: str = "it"
) -> Progress | LineProgress:
    """A rich bar on a terminal, else a :class:`LineProgress` printing every ``log_every``
    steps (0: every tenth of the total); rates in ``unit``/s. ``enabled=False`` prints
    nothing at all."""
    if enabled and not console.is_terminal:
        return LineProgress(log_every, unit)
    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(no_wrap=True)),
        BarColumn(bar_width=16),
        MofNCompleteColumn(table_column=Column(no_wrap=True)),
        RateColumn(unit, table_column=Column(no_wrap=True)),
        TimeElapsedColumn(table_column=Column(no_wrap=True)),
        TextColumn("eta", table_column=Column(no_wrap=True)),
        TimeRemainingColumn(table_column=Column(no_wrap=True)),
        TextColumn(
            "{task.fields[info]}",
            table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1, min_width=0),
        ),
        console=console,
        disable=not enabled,
        expand=True,
    )


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=int(seconds)))


class _LineTask:
    def __init__(self, description: str, total: float | None, completed: float, fields: dict):
        self.description = description
        self.total = total
        self.completed = completed
        self.fields = {"info": "", **fields}
        self.start = time.perf_counter()
        self.start_completed = completed
        self.printed = completed


class LineProgress:
    """Plain-text progress for logs: one line per ``log_every`` completed steps and one when
    a task completes. The rate and ETA are measured since the task was added."""

    def __init__(self, log_every: int = 0, unit: str = "it") -> None:
        self.log_every = log_every
        self.unit = unit
        self.console = console
        self.tasks: list[_LineTask] = []

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = None, completed: float = 0, **fields: Any
    ) -> int:
        """Start a task; returns its id for :meth:`update`."""
        self.tasks.append(_LineTask(description, total, completed, fields))
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        """Count ``advance`` more steps done."""
        self.update(task_id, advance=advance)

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
        **fields: Any,
    ) -> None:
        """Like rich's ``Progress.update``; prints a line when a ``log_every`` boundary is
        crossed or the task completes."""
        task = self.tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        if completed is not None:
            task.completed = completed
        if advance is not None:
            task.completed += advance
        every = self.log_every or max(1, int(task.total or 0) // 10)
        boundary = int(task.completed) // every > int(task.printed) // every
        finished = task.total is not None and task.completed >= task.total > task.printed
        if boundary or finished:
            task.printed = task.completed
            self.console.print(self.line(task), highlight=False, markup=False, soft_wrap=True)

    def line(self, task: _LineTask) -> str:
        """``description done/total rate elapsed eta info`` of one task."""
        elapsed = time.perf_counter() - task.start
        rate = (task.completed - task.start_completed) / max(elapsed, 1e-9)
        total = "?" if task.total is None else f"{int(task.total)}"
        parts = [f"{task.description} {int(task.completed)}/{total}", f"{rate:.2f} {self.unit}/s"]
        parts.append(f"elapsed {_clock(elapsed)}")
        if task.total is not None and rate > 0:
            parts.append(f"eta {_clock((task.total - task.completed) / rate)}")
        if task.fields.get("info"):
            parts.append(str(task.fields["info"]))
        return " ".join(parts)
