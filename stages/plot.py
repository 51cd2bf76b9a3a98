"""``pixcli plot RUN... --out curves.png``: training curves of one or several runs."""

from __future__ import annotations

from pathlib import Path

from pixcli.artifacts import read_json
from pixcli.engine.progress import console
from pixcli.engine.tracking import LOG_NAME, read_log
from pixcli.errors import UserError
from pixcli.figures import curves_png, save_png_bytes


def find_train_log(run: Path) -> Path | None:
    """The ``train_log.jsonl`` of a run: the file itself, the one in the directory, the last
    distillation round's (``round*/train/``), or, for an eval run, the one beside the
    checkpoint it evaluated (from its manifest's provenance). None when there is none."""
    if run.is_file():
        return run if run.suffix == ".jsonl" else None
    if (run / LOG_NAME).is_file():
        return run / LOG_NAME
    rounds = sorted(run.glob(f"round*/train/{LOG_NAME}"), key=lambda p: p.parts[-3])
    if rounds:
        return rounds[-1]
    checkpoint = run_checkpoint(run)
    if checkpoint is not None and checkpoint.parent != run:
        return find_train_log(checkpoint.parent)
    return None


def run_checkpoint(run: Path) -> Path | None:
    """The model of a run directory: its ``model.pt``, or the checkpoint an eval run
    evaluated (its manifest's ``provenance.paths.checkpoint``)."""
    if (run / "model.pt").is_file():
        return run / "model.pt"
    if (run / "manifest.json").is_file():
        path = read_json(run / "manifest.json").get("provenance", {}).get("paths", {})
        if path.get("checkpoint") and Path(path["checkpoint"]).is_file():
            return Path(path["checkpoint"])
    return None


def run_name(run: Path) -> str:
    """What a run is called in legends and tables: its directory's name."""
    return (run.parent if run.is_file() else run).name


def load_runs(runs: list[Path]) -> list[tuple[str, list[dict]]]:
    """``(name, train-log entries)`` of every run that has a training log."""
    found = []
    for run in runs:
        if not run.exists():
            raise UserError(f"{run}: not found")
        log = find_train_log(run)
        if log is None:
            console.print(f"{run}: no {LOG_NAME}; left out of the curves", highlight=False)
            continue
        found.append((run_name(run), read_log(log)))
    return found


def run(runs: list[Path], out: Path) -> Path:
    """Draw the curves of ``runs`` into the PNG ``out``; returns ``out``."""
    if out.suffix.lower() != ".png":
        raise UserError(f"--out {out}: the picture is a PNG; name it *.png")
    logs = load_runs(runs)
    if not logs:
        raise UserError(f"none of {', '.join(map(str, runs))} has a {LOG_NAME}")
    save_png_bytes(out, curves_png(logs))
    console.print(f"curves of {len(logs)} run(s) written to {out}", highlight=False)
    return out
