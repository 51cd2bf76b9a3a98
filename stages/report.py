"""``pixcli report RUN... --out report.html``: one self-contained HTML page comparing runs.

The page holds, with every picture embedded as a ``data:image/png;base64`` URI (the file can
be mailed or attached as it is):

- a table of the runs' eval metrics (``metrics.json`` of each RUN: mIoU and per-class IoU);
- their training curves (:func:`pixcli.figures.curves_png`, from each run's
  ``train_log.jsonl``, found as ``pixcli plot`` finds it);
- a grid of a few images of ``--data``: input | ground truth | each run's prediction
  (whole-image inference with the run's model: its ``model.pt``, or for an eval run the
  checkpoint its manifest names).

A RUN is any pixcli output directory: a training run (warmup, adapt, distill) or an eval.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pixcli.artifacts import atomic_write, read_json
from pixcli.data.readers import SegDataset
from pixcli.data.transforms import normalize
from pixcli.engine.inference import InferenceConfig, predict_logits
from pixcli.engine.progress import console
from pixcli.engine.runtime import setup_runtime, shutdown
from pixcli.engine.tracking import read_log
from pixcli.errors import UserError
from pixcli.figures import curves_png
from stages.common import load_model_for, open_data
from stages.plot import find_train_log, run_checkpoint, run_name


@dataclass
class Run:
    """What the report knows of one RUN directory."""

    name: str
    path: Path
    metrics: dict | None
    checkpoint: Path | None
    log: list[dict]


def find_run(path: Path) -> Run:
    """Read what a RUN directory offers (each part may be missing)."""
    if not path.is_dir():
        raise UserError(f"{path}: not a run directory")
    metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else None
    if metrics is not None and "per_class" not in metrics:
        metrics = None  # e.g. an embed-report's
    log_path = find_train_log(path)
    log = read_log(log_path) if log_path is not None else []
    return Run(run_name(path), path, metrics, run_checkpoint(path), log)


def data_spec(runs: list[Run]) -> str | None:
    """The labelled data the runs were evaluated on (the first eval manifest's, absolute)."""
    for run in runs:
        manifest = run.path / "manifest.json"
        if run.metrics is not None and manifest.is_file():
            data = read_json(manifest)
            spec = data.get("provenance", {}).get("paths", {}).get("data")
            spec = spec or data.get("config", {}).get("data")
            if spec:
                return spec
    return None


def png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def prediction_grid(
    runs: list[Run], dataset: SegDataset, images: int, device: str
) -> tuple[list[str], list[list[bytes]]]:
    """Column titles and rows of PNGs: input | ground truth | each run's prediction, for the
    first ``images`` images of ``dataset`` (runs without a model are left out)."""
    with_model = [r for r in runs if r.checkpoint is not None]
    palette = dataset.taxonomy.palette_array()
    picks = list(range(min(images, len(dataset))))
    rows: list[list[bytes]] = []
    for i in picks:
        image, label, _ = dataset[i]
        gt = palette[label] if label is not None else np.full_like(image, 128)
        rows.append([_png(image), _png(gt)])
    runtime = setup_runtime(device, True, 0)
    for run in with_model:
        assert run.checkpoint is not None
        model, _ = load_model_for(run.checkpoint, dataset, runtime)
        for row, i in zip(rows, picks, strict=True):
            x = normalize(dataset.read_image(i)).unsqueeze(0).to(runtime.device)
            with torch.no_grad(), runtime.autocast():
                pred = predict_logits(model, x, InferenceConfig()).argmax(1)[0].cpu().numpy()
            row.append(_png(palette[pred.astype(np.uint8)]))
    shutdown(runtime)
    return ["input", "ground truth", *(r.name for r in with_model)], rows


def metrics_table_html(runs: list[Run]) -> str:
    """The comparison table: one row per run with metrics, mIoU then per-class IoU."""
    scored = [r for r in runs if r.metrics is not None]
    if not scored:
        return "<p>No run has a metrics.json (run <code>pixcli eval</code>).</p>"
    classes = [
        c
        for c in scored[0].metrics["per_class"]  # type: ignore[index]
        if any(r.metrics["per_class"].get(c, {}).get("pixels", 0) > 0 for r in scored)  # type: ignore[index]
    ]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["run", "mIoU", *classes])
    body = []
    for r in scored:
        assert r.metrics is not None
        cells = [_cell(r.metrics.get("mIoU"))]
        cells += [_cell(r.metrics["per_class"].get(c, {}).get("IoU")) for c in classes]
        body.append(f"<tr><th>{html.escape(r.name)}</th>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"


def _cell(value: float | None) -> str:
    return "<td>-</td>" if value is None or value != value else f"<td>{value:.1f}</td>"


STYLE = """
body { font-family: sans-serif; margin: 2em; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: right; }
th { background: #f3f3f3; }
.grid img { display: block; max-width: 320px; image-rendering: pixelated; }
"""


def render(runs: list[Run], curves: bytes | None, grid: tuple[list[str], list[list[bytes]]]) -> str:
    """The report page."""
    when = datetime.now(UTC).isoformat(timespec="seconds")
    listing = "".join(
        f"<li><b>{html.escape(r.name)}</b>: <code>{html.escape(str(r.path.resolve()))}</code></li>"
        for r in runs
    )
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>pixcli report</title>",
        f"<style>{STYLE}</style></head><body><h1>pixcli report</h1>",
        f"<p>Written {when}.</p><ul>{listing}</ul>",
        "<h2>Eval metrics (IoU %)</h2>",
        metrics_table_html(runs),
        "<h2>Training curves</h2>",
        f"<img alt='curves' src='{png_uri(curves)}'>" if curves else "<p>No training logs.</p>",
    ]
    titles, rows = grid
    if rows:
        head = "".join(f"<th>{html.escape(t)}</th>" for t in titles)
        body = "".join(
            "<tr>" + "".join(f"<td><img alt='' src='{png_uri(p)}'></td>" for p in row) + "</tr>"
            for row in rows
        )
        parts += ["<h2>Predictions</h2>", f"<table class='grid'><tr>{head}</tr>{body}</table>"]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def run(
    paths: list[Path],
    out: Path,
    data: str | None = None,
    split: str = "val",
    images: int = 4,
    device: str = "auto",
) -> Path:
    """Write the report on ``paths`` into ``out`` (HTML); returns ``out``."""
    if out.suffix.lower() not in (".html", ".htm"):
        raise UserError(f"--out {out}: the report is an HTML page; name it *.html")
    runs = [find_run(p) for p in paths]
    logs = [(r.name, r.log) for r in runs if r.log]
    curves = curves_png(logs) if logs else None
    grid: tuple[list[str], list[list[bytes]]] = ([], [])
    spec = data or data_spec(runs)
    if spec and images > 0:
        grid = prediction_grid(runs, open_data(spec, split, "--data"), images, device)
    page = render(runs, curves, grid)
    atomic_write(out, lambda tmp: tmp.write_text(page))
    console.print(f"report on {len(runs)} run(s) written to {out}", highlight=False)
    return out
