"""What a training run logs, in three forms beside each other in its output directory:

- ``train_log.jsonl``: one JSON object per logged step (``step``, ``lr_factor``, ``it_s``,
  the losses, diagnostics such as ``pl_mIoU`` or the per-class ``pl_IoU``) and per
  validation (``val_mIoU``, per-class ``val_IoU``);
- ``metrics.csv``: the same numbers in long form, one ``step,name,value`` row per number;
  nested dicts are flattened to ``name/key`` (``pl_IoU/road``), so the columns never change
  and ``pandas.read_csv(...).pivot(index="step", columns="name", values="value")`` gives a
  table;
- ``tensorboard/``: event files with the same scalars (``tensorboard --logdir runs``), when
  the optional ``tensorboard`` package is installed (``pip install 'pixcli[tensorboard]'``),
  and at each validation the first :data:`VAL_PREVIEWS` val images as pictures
  (``val_preview/K``: input | ground truth | prediction in the classes' colours).

A resumed run first drops what the files hold past the step it resumes from, so that no step
appears twice.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

LOG_NAME = "train_log.jsonl"
CSV_NAME = "metrics.csv"
TENSORBOARD_DIR = "tensorboard"
CSV_HEADER = ("step", "name", "value")
VAL_PREVIEWS = 3  # val images shown in TensorBoard at each validation
PREVIEW_TAG = "val_preview"

Preview = tuple[np.ndarray, np.ndarray, np.ndarray]  # image HxWx3, label HxW, prediction HxW


def preview_strip(preview: Preview, palette: np.ndarray) -> np.ndarray:
    """``(H, 3W, 3) uint8``: the image, its label and the prediction side by side, the
    labels in ``palette``'s ``(C, 3)`` colours (ids without a colour, e.g. 255, black)."""
    image, label, pred = preview
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = np.asarray(palette, dtype=np.uint8).reshape(-1, 3)[:256]
    return np.concatenate([image, table[label], table[pred]], axis=1)


def flatten(entry: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, float]]:
    """``(name, value)`` of every finite number in ``entry`` but ``step``; nested dicts as
    ``name/key``."""
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from flatten(value, f"{name}/")
        elif (
            name != "step"
            and isinstance(value, int | float)
            and not isinstance(value, bool)
            and math.isfinite(value)
        ):
            yield name, float(value)


def read_log(path: Path) -> list[dict[str, Any]]:
    """The entries of a ``train_log.jsonl`` (a line cut short by a crash is skipped)."""
    entries = []
    for line in Path(path).read_text().splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict) and "step" in entry:
            entries.append(entry)
    return entries


def _summary_writer(log_dir: Path, purge_step: int | None) -> Any:
    """A TensorBoard ``SummaryWriter``, or None when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(log_dir), purge_step=purge_step)


class RunLog:
    """Appends entries to ``train_log.jsonl``, ``metrics.csv`` and TensorBoard in ``out_dir``.

    ``start`` is the step a resumed run continues from: entries past it are dropped first.
    ``tensorboard=False`` writes no event files even when tensorboard is installed.
    """

    def __init__(self, out_dir: Path, start: int = 0, tensorboard: bool = True) -> None:
        self.jsonl = out_dir / LOG_NAME
        self.csv = out_dir / CSV_NAME
        self._truncate(start)  # also at 0: a run killed before its first last.pt starts over
        self.writer = (
            _summary_writer(out_dir / TENSORBOARD_DIR, start if start > 0 else None)
            if tensorboard
            else None
        )

    def _truncate(self, start: int) -> None:
        if self.jsonl.is_file():
            kept = [e for e in read_log(self.jsonl) if e["step"] <= start]
            self.jsonl.write_text("".join(json.dumps(e) + "\n" for e in kept))
        if self.csv.is_file():
            with open(self.csv, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(r["step"]) <= start]
            with open(self.csv, "w", newline="") as fh:
                out = csv.writer(fh)
                out.writerow(CSV_HEADER)
                out.writerows([r["step"], r["name"], r["value"]] for r in rows)

    def write(self, entry: dict[str, Any]) -> None:
        """Log one entry (it must have ``step``)."""
        step = int(entry["step"])
        with open(self.jsonl, "a") as fh:
            fh.write(json.dumps(entry) + "\n")
        values = list(flatten(entry))
        new = not self.csv.is_file()
        with open(self.csv, "a", newline="") as fh:
            out = csv.writer(fh)
            if new:
                out.writerow(CSV_HEADER)
            out.writerows([step, name, repr(value)] for name, value in values)
        if self.writer is not None:
            for name, value in values:
                self.writer.add_scalar(name, value, step)
            self.writer.flush()

    def write_previews(self, step: int, previews: list[Preview], palette: np.ndarray) -> None:
        """Show validation predictions in TensorBoard (``val_preview/K``, one
        :func:`preview_strip` per image); nothing without tensorboard."""
        if self.writer is None:
            return
        for k, preview in enumerate(previews):
            strip = preview_strip(preview, palette)
            self.writer.add_image(f"{PREVIEW_TAG}/{k}", strip, step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()
            self.writer = None
