"""``pixcli embed-report``: how well each checkpoint's pixel features separate the classes.

For every checkpoint: sample pixel features of the ``--data`` images (at most ``per_class``
pixels per class, see :class:`~pixcli.engine.embedding.ClassBudgetSampler`), labelled with
the ground truth brought down to the model's output grid, or with the model's own
predictions when the data has no labels; score them (Calinski-Harabasz, Davies-Bouldin,
silhouette) and draw their t-SNE embedding. Written into OUT:

- ``tsne_<name>.png`` per checkpoint, and ``tsne_side_by_side.png`` when there are several;
- ``report.json`` (settings and numbers per checkpoint), ``report.md`` (table and pictures);
- ``manifest.json``.

Under torchrun the main rank does all of it; the other ranks end at once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from pixcli.artifacts import atomic_write, file_fingerprint, read_json, write_json
from pixcli.config import to_dict
from pixcli.data.readers import ReaderConfig, SegDataset
from pixcli.data.taxonomy import Taxonomy
from pixcli.data.transforms import normalize
from pixcli.engine.embedding import (
    ClassBudgetSampler,
    TsneConfig,
    cluster_scores,
    labels_on_grid,
    tsne_2d,
)
from pixcli.engine.progress import console, make_progress
from pixcli.engine.runtime import Runtime, setup_runtime, shutdown
from pixcli.errors import UserError
from pixcli.models import Segmentor
from pixcli.plots import legend_image, save_png, scatter_panel, side_by_side
from pixcli.reporting import (
    EMBEDDING_COLUMNS,
    embedding_rows,
    embedding_table,
    markdown_table,
    print_table,
)
from stages.common import Timer, finish, load_model_for, open_data, prepare_out_dir

FEATURES = ("auto", "features", "proj")
SIDE_BY_SIDE = "tsne_side_by_side.png"
SCORES = ("calinski_harabasz", "davies_bouldin", "silhouette")


@dataclass
class EmbedReportConfig:
    data: str = ""  # KIND:PATH; labels used when present, predictions otherwise
    split: str = "val"
    per_class: int = 500  # pixels sampled per class (fewer when a class has fewer)
    feature: str = "auto"  # auto (the projection head's when the model has one), features, proj
    silhouette_points: int = 5000  # random subset for the silhouette (quadratic cost)
    tsne: TsneConfig = field(default_factory=TsneConfig)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder
    seed: int = 0
    device: str = "auto"
    amp: bool = True


@dataclass
class Embedding:
    """One checkpoint's result: its ``report.json`` entry and its t-SNE points."""

    entry: dict
    points: np.ndarray  # (N, 2)
    labels: np.ndarray  # (N,)


def run(cfg: EmbedReportConfig, checkpoints: list[Path], out: Path) -> dict:
    """Write the report into ``out`` and print its table; return ``report.json``'s content
    (under torchrun: on the main rank; the other ranks return ``{}`` at once)."""
    _check(cfg, checkpoints)
    timer = Timer()
    dataset = open_data(cfg.data, cfg.split, "--data", reader=cfg.reader)
    names = checkpoint_names(checkpoints)
    inputs = {"data": dataset.fingerprint()}
    inputs |= {
        f"checkpoint {n}": file_fingerprint(p) for n, p in zip(names, checkpoints, strict=True)
    }
    if prepare_out_dir(out, "embed-report", inputs, to_dict(cfg)) is not None:
        return read_json(out / "report.json")
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    # Under torchrun the main rank alone computes the report (t-SNE does not shard) and the
    # ranks exchange nothing: all leave the process group here, so that none waits in a
    # barrier for minutes of t-SNE (NCCL's watchdog gives up after 10), and the others end.
    shutdown(runtime)
    if not runtime.is_main:
        return {}
    results = [
        _embed(cfg, path, name, dataset, runtime)
        for name, path in zip(names, checkpoints, strict=True)
    ]
    report = _report(cfg, dataset, results)
    _write(out, dataset.taxonomy, results, report)
    headline = {r.entry["name"]: {k: r.entry[k] for k in SCORES} for r in results}
    paths = {f"checkpoint{i}": p for i, p in enumerate(checkpoints)}
    finish(out, "embed-report", to_dict(cfg), inputs, headline, timer, paths)
    title = f"pixel features on {cfg.data} ({cfg.split}, {report['labels']})"
    print_table(embedding_table(report["checkpoints"], title))
    return report


def _check(cfg: EmbedReportConfig, checkpoints: list[Path]) -> None:
    if not cfg.data:
        raise UserError("--data is required (KIND:PATH of the images to embed)")
    if not checkpoints:
        raise UserError("--checkpoint is required (repeat it to compare models)")
    for path in checkpoints:
        if not path.is_file():
            raise UserError(f"{path}: checkpoint not found")
    if len({p.resolve() for p in checkpoints}) < len(checkpoints):
        raise UserError("--checkpoint: the same file is given more than once")
    if cfg.feature not in FEATURES:
        raise UserError(f"feature {cfg.feature!r}: expected one of {', '.join(FEATURES)}")
    if cfg.per_class < 1:
        raise UserError(f"--per-class {cfg.per_class}: must be at least 1")
    if cfg.silhouette_points < 2:
        raise UserError(f"silhouette_points {cfg.silhouette_points}: must be at least 2")
    if cfg.tsne.perplexity <= 0 or cfg.tsne.max_iter < 250 or cfg.tsne.pca_dims < 0:
        raise UserError("tsne: perplexity must be > 0, max_iter >= 250 and pca_dims >= 0")


def checkpoint_names(paths: list[Path]) -> list[str]:
    """Short distinct names: the fewest trailing path parts (at least two) that tell the
    checkpoints apart, e.g. ``warmup/model.pt`` and ``adapt/model.pt``."""
    parts = [p.resolve().parts for p in paths]
    for k in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-max(k, 2) :]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return ["/".join(x) for x in parts]  # unreachable: resolved paths differ


def png_names(names: list[str]) -> list[str]:
    """``tsne_<name>.png`` file names, numbered when two names would give the same file."""
    slugs = [re.sub(r"[^A-Za-z0-9]+", "_", n.removesuffix(".pt")).strip("_") for n in names]
    if len(set(slugs)) < len(slugs):
        slugs = [f"{i + 1}_{s}" for i, s in enumerate(slugs)]
    return [f"tsne_{s}.png" for s in slugs]


def _feature_kind(choice: str, model: Segmentor, path: Path) -> str:
    has_proj = model.projector is not None
    if choice == "proj" and not has_proj:
        raise UserError(f"{path}: feature = proj, but the model has no projection head")
    if choice == "auto":
        return "proj" if has_proj else "features"
    return choice


@torch.no_grad()
def _sample(
    model: Segmentor, dataset: SegDataset, kind: str, cfg: EmbedReportConfig, runtime: Runtime
) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced pixel features ``(N, D)`` and labels ``(N,)`` on the model's grid."""
    sampler = ClassBudgetSampler(dataset.taxonomy.num_classes, cfg.per_class, cfg.seed)
    with make_progress(runtime.is_main) as progress:
        task = progress.add_task("features", total=len(dataset), rate="", info="")
        for i in range(len(dataset)):
            image, label, _ = dataset[i]
            with runtime.autocast():
                out = model(normalize(image).unsqueeze(0).to(runtime.device))
            maps = (out.proj if kind == "proj" else out.features)[0].float()
            if label is None:
                grid_labels = out.logits[0].argmax(0).cpu().numpy()
            else:
                grid_labels = labels_on_grid(label, tuple(maps.shape[-2:]))
            sampler.add(i, maps.flatten(1).T.cpu().numpy(), grid_labels.reshape(-1))
            progress.advance(task)
    return sampler.result()


def _embed(
    cfg: EmbedReportConfig, path: Path, name: str, dataset: SegDataset, runtime: Runtime
) -> Embedding:
    model, _ = load_model_for(path, dataset, runtime)
    kind = _feature_kind(cfg.feature, model, path)
    features, labels = _sample(model, dataset, kind, cfg, runtime)
    if labels.size == 0:
        raise UserError(f"--data {cfg.data}: no labelled pixels to sample (all ignored?)")
    scores = cluster_scores(features, labels, cfg.silhouette_points, cfg.seed)
    console.print(f"{name}: t-SNE of {labels.size} points", highlight=False)
    points = tsne_2d(features, cfg.tsne, cfg.seed)
    counts = np.bincount(labels, minlength=dataset.taxonomy.num_classes)
    entry = {
        "name": name,
        "checkpoint": str(path),
        "feature": kind,
        "dim": int(features.shape[1]),
        "points": int(labels.size),
        "classes": int((counts > 0).sum()),
        "points_per_class": {
            c: int(n) for c, n in zip(dataset.taxonomy.classes, counts, strict=True) if n
        },
        **scores,
    }
    return Embedding(entry, points, labels)


def _report(cfg: EmbedReportConfig, dataset: SegDataset, results: list[Embedding]) -> dict:
    pngs = png_names([r.entry["name"] for r in results])
    for r, png in zip(results, pngs, strict=True):
        r.entry["png"] = png
    return {
        "data": cfg.data,
        "split": cfg.split,
        "images": len(dataset),
        "labels": "ground truth" if dataset.has_labels else "predictions",
        "per_class": cfg.per_class,
        "silhouette_points": cfg.silhouette_points,
        "tsne": to_dict(cfg.tsne),
        "seed": cfg.seed,
        "checkpoints": [r.entry for r in results],
        "side_by_side": SIDE_BY_SIDE if len(results) > 1 else None,
    }


def _title(entry: dict) -> list[str]:
    ch, db, sil = (entry[k] for k in SCORES)
    if ch is None:
        return [entry["name"], "indices undefined (fewer than two classes)"]
    return [entry["name"], f"CH {ch:.1f}   DB {db:.3f}   silhouette {sil:.3f}"]


def _write(out: Path, taxonomy: Taxonomy, results: list[Embedding], report: dict) -> None:
    """The pictures, ``report.json`` and ``report.md``."""
    palette, classes = taxonomy.palette, taxonomy.classes
    panels = [scatter_panel(r.points, r.labels, palette, _title(r.entry)) for r in results]
    for r, panel in zip(results, panels, strict=True):
        counts = np.bincount(r.labels, minlength=len(classes))
        legend = [(f"{classes[c]} ({n})", palette[c]) for c, n in enumerate(counts) if n]
        save_png(out / r.entry["png"], side_by_side([panel, legend_image(legend)]))
    if len(results) > 1:
        present = sorted(set(np.concatenate([r.labels for r in results]).tolist()))
        legend = [(classes[c], palette[c]) for c in present]
        save_png(out / SIDE_BY_SIDE, side_by_side([*panels, legend_image(legend)]))
    write_json(out / "report.json", report)
    atomic_write(out / "report.md", lambda tmp: tmp.write_text(report_markdown(report)))


def report_markdown(report: dict) -> str:
    """``report.md``: the settings, the table and the pictures."""
    entries = report["checkpoints"]
    lines = [
        "# Pixel-feature embedding report",
        "",
        f"Data `{report['data']}` ({report['split']}, {report['images']} images), labelled by "
        f"{report['labels']} on each model's output grid; at most {report['per_class']} pixels "
        f"per class, seed {report['seed']}.",
        "",
        markdown_table(EMBEDDING_COLUMNS, embedding_rows(entries)),
        "",
        "CH (Calinski-Harabasz, higher is better) and DB (Davies-Bouldin, lower is better) are "
        "computed on the full-dimensional features; the silhouette (in [-1, 1], higher is "
        f"better) on a random subset of at most {report['silhouette_points']} of them. The "
        f"pictures are t-SNE embeddings (perplexity {report['tsne']['perplexity']}) of the same "
        "points.",
        "",
    ]
    if report["side_by_side"]:
        lines += ["## Side by side", "", f"![side by side]({report['side_by_side']})", ""]
    for entry in entries:
        lines += [f"## {entry['name']}", "", f"![{entry['name']}]({entry['png']})", ""]
    return "\n".join(lines)
