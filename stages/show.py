"""``pixcli show PATH``: a summary of any pixcli artifact (checkpoint, manifest, metrics,
pseudo.h5, train_log.jsonl)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.table import Table

from pixcli import pseudo_labels
from pixcli.artifacts import load_checkpoint, read_json
from pixcli.engine.tracking import read_log
from pixcli.errors import UserError
from pixcli.figures import loss_keys
from pixcli.reporting import metrics_table, print_table, stdout


def run(path: Path) -> None:
    if not path.exists():
        raise UserError(f"{path}: not found")
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise UserError(f"{path}: a directory without manifest.json")
        path = path / "manifest.json"
    if path.suffix == ".pt":
        show_checkpoint(path)
    elif path.suffix in (".h5", ".hdf5"):
        show_hdf5(path)
    elif path.suffix == ".jsonl":
        show_train_log(path)
    elif path.suffix == ".json":
        data = read_json(path)
        if isinstance(data, dict) and "per_class" in data:
            print_table(metrics_table(data, str(path)))
        elif isinstance(data, dict) and "stage" in data:
            show_manifest(path, data)
        else:
            stdout.print_json(json.dumps(data, default=str))
    else:
        raise UserError(
            f"{path}: not a pixcli artifact (.pt, .h5, manifest.json, metrics.json, "
            "train_log.jsonl)"
        )


def _kv_table(title: str, rows: dict) -> Table:
    table = Table(title=title, show_header=False)
    table.add_column("key", style="bold")
    table.add_column("value")
    for key, value in rows.items():
        table.add_row(key, value if isinstance(value, str) else json.dumps(value, default=str))
    return table


def show_checkpoint(path: Path) -> None:
    ckpt = load_checkpoint(path)
    n_params = sum(t.numel() for t in ckpt["state_dict"].values() if hasattr(t, "numel"))
    meta = ckpt.get("meta", {})
    rows = {
        "format": f"{ckpt['format']} v{ckpt['version']}",
        "stage": meta.get("stage", "?"),
        "step": str(ckpt.get("step", "?")),
        "model": ckpt["model_config"],
        "classes": f"{len(ckpt['classes'])}: {', '.join(ckpt['classes'])}",
        "parameters": f"{n_params:,}",
        "resumable": "yes" if "train_state" in ckpt else "no (weights only)",
        "inputs": meta.get("inputs", {}),
    }
    print_table(_kv_table(str(path), rows))


def show_train_log(path: Path) -> None:
    """A training log: steps, speed, the last value of each loss, the best validation and the
    pseudo labels' last mIoU."""
    log = read_log(path)
    if not log:
        raise UserError(f"{path}: no training-log entries (one JSON object per line, with step)")
    train = [e for e in log if "lr_factor" in e]
    val = [e for e in log if isinstance(e.get("val_mIoU"), int | float)]
    rows: dict = {"entries": str(len(log)), "steps": f"{log[0]['step']} .. {log[-1]['step']}"}
    if train:
        rates = [e["it_s"] for e in train if isinstance(e.get("it_s"), int | float)]
        if rates:
            rows["it/s (last)"] = f"{rates[-1]:.2f}"
        for key in loss_keys(train):
            last = next(e for e in reversed(train) if key in e)
            rows[f"{key} (step {last['step']})"] = f"{last[key]:.4f}"
        for key in ("pl_mIoU", "pl_teacher_mIoU"):
            pl = [e for e in train if isinstance(e.get(key), int | float)]
            if pl:
                rows[f"{key} (step {pl[-1]['step']})"] = f"{pl[-1][key]:.1f}"
    if val:
        best = max(val, key=lambda e: e["val_mIoU"])
        rows["val mIoU (last)"] = f"{val[-1]['val_mIoU']:.1f} at step {val[-1]['step']}"
        rows["val mIoU (best)"] = f"{best['val_mIoU']:.1f} at step {best['step']}"
    print_table(_kv_table(str(path), rows))


def show_manifest(path: Path, data: dict) -> None:
    rows = {
        "stage": data["stage"],
        "complete": str(data.get("complete")),
        "wall time (s)": str(data.get("wall_time_s")),
        "inputs": data.get("inputs", {}),
        "versions": data.get("versions", {}),
        **{f"result: {k}": v for k, v in data.get("results", {}).items()},
    }
    print_table(_kv_table(str(path), rows))


def show_hdf5(path: Path) -> None:
    """A pseudo.h5 summary (:func:`pixcli.pseudo_labels.summary`), else attributes and
    datasets of any HDF5 file."""
    import h5py

    try:
        fh = h5py.File(path, "r")
    except OSError as exc:
        raise UserError(f"{path}: not a readable HDF5 file ({exc})") from None
    with fh:
        is_pseudo = _attr(fh.attrs.get("format", "")) == pseudo_labels.FORMAT
        rows: dict = {f"attr {k}": _attr(v) for k, v in fh.attrs.items()}

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset) and len(rows) < 60:
                rows[name] = f"{obj.dtype} {obj.shape}"

        fh.visititems(visit)
    if is_pseudo:
        rows = pseudo_labels.summary(path)
    print_table(_kv_table(str(path), rows))


def _attr(value: object) -> str:
    if hasattr(value, "tolist"):
        value = value.tolist()  # type: ignore[union-attr]
    if isinstance(value, bytes):
        value = value.decode()
    return str(value)[:200]
