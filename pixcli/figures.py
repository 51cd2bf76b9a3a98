"""Pictures of runs with matplotlib (imported only here, and only when a picture is drawn):
training curves of one or several runs on shared axes, and a row-normalised confusion matrix.

Sizes are fixed in pixels (``figsize`` x ``DPI``, no tight cropping), so that a picture of
``width`` x ``height`` pixels is what the caller asked for.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pixcli.artifacts import atomic_write

DPI = 100
CURVE_SIZE = (1200, 360)  # pixels: loss | learning rate | mIoU side by side


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only; never a window
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    """The figure as PNG bytes (the figure is closed)."""
    plt = _pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    plt.close(fig)
    return buffer.getvalue()


def save_png_bytes(path: Path, data: bytes) -> None:
    """Write PNG bytes (of :func:`curves_png`, :func:`confusion_png`) atomically."""
    atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _series(log: Sequence[dict], key: str) -> tuple[list[int], list[float]]:
    points = [(e["step"], e[key]) for e in log if isinstance(e.get(key), int | float)]
    return [s for s, _ in points], [float(v) for _, v in points]


# Numbers a step logs that are not losses: the loop's own, and the methods' diagnostics
# (``ctx.extras`` in pixcli.methods: counts, fractions, schedules).
NOT_LOSSES = frozenset(
    {"step", "lr_factor", "it_s"}
    | {"rectified_changed", "sinkhorn_iters", "anchors", "confident", "entropy_crop"}
    | {"eta", "drift_fraction", "prototypes", "ipix_omega"}
)
NOT_LOSS_PREFIXES = ("val_", "pl_")  # validation, the pseudo labels' quality


def loss_keys(log: Sequence[dict]) -> list[str]:
    """The loss keys of a training log (every number a step logs but those of
    :data:`NOT_LOSSES` and the ``val_`` / ``pl_`` figures), in the order they first appear."""
    keys: dict[str, None] = {}
    for entry in log:
        keys.update(
            (k, None)
            for k, v in entry.items()
            if isinstance(v, int | float)
            and not isinstance(v, bool)
            and k not in NOT_LOSSES
            and not k.startswith(NOT_LOSS_PREFIXES)
        )
    return list(keys)


def curves_png(
    runs: Sequence[tuple[str, Sequence[dict]]], size: tuple[int, int] = CURVE_SIZE
) -> bytes:
    """Training curves of ``(name, train_log entries)`` runs as a PNG of ``size`` pixels:
    losses (:func:`loss_keys`; one line style per loss, one colour per run), the learning-rate
    factor, and the validation mIoU with, when logged, the pseudo labels' mIoU (``pl_mIoU``,
    dashed)."""
    plt = _pyplot()
    fig, (ax_loss, ax_lr, ax_miou) = plt.subplots(
        1, 3, figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, sharex=True
    )
    styles = ["-", "--", ":", "-."]
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for r, (name, log) in enumerate(runs):
        colour = colours[r % len(colours)]
        for k, key in enumerate(loss_keys(log)):
            steps, values = _series(log, key)
            label = key if len(runs) == 1 else f"{name} {key}"
            ax_loss.plot(steps, values, styles[k % len(styles)], color=colour, label=label)
        ax_lr.plot(*_series(log, "lr_factor"), color=colour, label=name)
        steps, values = _series(log, "val_mIoU")
        if steps:
            ax_miou.plot(steps, values, "o-", color=colour, label=f"{name} val")
        steps, values = _series(log, "pl_mIoU")
        if steps:
            ax_miou.plot(steps, values, "--", color=colour, label=f"{name} pseudo labels")
        steps, values = _series(log, "pl_teacher_mIoU")  # when the method changed them
        if steps:
            ax_miou.plot(steps, values, ":", color=colour, label=f"{name} teacher's labels")
    for ax, title in ((ax_loss, "loss"), (ax_lr, "learning-rate factor"), (ax_miou, "mIoU")):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if _any_positive(ax_loss):
        ax_loss.set_yscale("log", nonpositive="mask")  # losses of different sizes; 0 not drawn
    fig.tight_layout()
    return _png(fig)


def _any_positive(ax: Any) -> bool:
    return any((np.asarray(line.get_ydata(), dtype=float) > 0).any() for line in ax.get_lines())


def confusion_size(num_classes: int) -> tuple[int, int]:
    """The pixel size of :func:`confusion_png`'s picture for ``num_classes`` classes."""
    side = 240 + 36 * num_classes
    return side, side


def confusion_png(confusion: Sequence[Sequence[float]], classes: Sequence[str]) -> bytes:
    """The confusion matrix (rows ground truth, columns prediction), each row divided by its
    total, as a PNG of :func:`confusion_size` pixels; cells show percentages. A class with no
    ground-truth pixels has an empty row."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, totals, out=np.full_like(counts, np.nan), where=totals > 0)
    width, height = confusion_size(len(classes))
    fig, ax = plt.subplots(figsize=(width / DPI, height / DPI), dpi=DPI)
    ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0)
    ticks = np.arange(len(classes))
    ax.set_xticks(ticks, labels=list(classes), rotation=90, fontsize=8)
    ax.set_yticks(ticks, labels=list(classes), fontsize=8)
    ax.set_xlabel("prediction")
    ax.set_ylabel("ground truth")
    ax.set_title("confusion (% of each ground-truth row)")
    for i, j in zip(*np.nonzero(np.nan_to_num(share) >= 0.005), strict=True):
        colour = "white" if share[i, j] > 0.5 else "black"
        ax.text(
            j, i, f"{100 * share[i, j]:.0f}", ha="center", va="center", fontsize=6, color=colour
        )
    fig.tight_layout()
    return _png(fig)


PANEL_SIZE = (520, 400)  # pixels of one benchmark's panel in :func:`comparison_png`


def comparison_bars(
    runs: dict[str, Sequence[float]], bounds: tuple[str, str] = ("warmup", "oracle")
) -> list[tuple[str, float, float, list[float]]]:
    """The bars of one panel: ``(model, mean, std, per-run values)`` for every model of
    ``runs`` with at least one run, in order, leaving out the two ``bounds`` (drawn as lines).
    The std is the sample one (0 for a single run), as the quality tables give it."""
    bars = []
    for name, values in runs.items():
        if name in bounds or not values:
            continue
        v = np.asarray(values, dtype=np.float64)
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        bars.append((name, float(v.mean()), std, [float(x) for x in v]))
    return bars


def comparison_png(
    panels: Sequence[tuple[str, dict[str, Sequence[float]]]],
    bounds: tuple[str, str] = ("warmup", "oracle"),
) -> bytes:
    """Models compared over seeds, one panel per benchmark side by side: a bar per model at
    its mean mIoU with a +-std whisker and a dot per run, and the ``bounds`` models (the
    source-only warm-up and the oracle) as dashed lines across the panel. ``panels`` are
    ``(title, {model: per-seed mIoU})``; the PNG is ``len(panels)`` x :data:`PANEL_SIZE`."""
    if not panels:
        raise ValueError("comparison_png: no panels to draw")
    plt = _pyplot()
    width, height = PANEL_SIZE
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels) / DPI, height / DPI), dpi=DPI, squeeze=False
    )
    for ax, (title, runs) in zip(axes[0], panels, strict=True):
        bars = comparison_bars(runs, bounds)
        x = np.arange(len(bars))
        ax.bar(x, [b[1] for b in bars], yerr=[b[2] for b in bars], capsize=4, color="#9ecae1")
        for i, (_, _, _, values) in enumerate(bars):
            ax.plot([i] * len(values), values, "o", color="#08519c", markersize=3)
        for name, style in zip(bounds, ("--", ":"), strict=True):
            if runs.get(name):
                level = float(np.mean(runs[name]))
                ax.axhline(level, linestyle=style, color="black", linewidth=1)
                ax.text(len(bars) - 0.5, level, f" {name} {level:.1f}", va="bottom", ha="right",
                        fontsize=7)  # fmt: skip
        ax.set_xticks(x, labels=[b[0] for b in bars], rotation=30, ha="right", fontsize=8)
        ax.set_ylabel("mIoU")
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)
