"""``pixcli eval``: metrics of a checkpoint on labelled data, with sliding-window inference:
``metrics.json``, ``confusion.png`` (row-normalised) and ``manifest.json``.

Inference is chosen as ``pixcli predict``'s (:func:`pixcli.predictor.resolve_inference`):
the checkpoint's own settings, each ``[eval]`` setting given replacing one."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pixcli.artifacts import (
    file_fingerprint,
    read_json,
    save_label_png,
    write_json,
)
from pixcli.config import to_dict
from pixcli.data.readers import ReaderConfig
from pixcli.engine.evaluation import evaluate_dataset
from pixcli.engine.runtime import setup_runtime, shutdown
from pixcli.errors import UserError
from pixcli.figures import confusion_png, save_png_bytes
from pixcli.predictor import InferenceChoice, resolve_inference
from pixcli.reporting import metrics_table, print_table
from stages.common import Timer, finish, load_model_for, open_labelled, prepare_out_dir


@dataclass
class EvalConfig:
    data: str = ""  # KIND:PATH, labelled
    split: str = "val"
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    save_predictions: bool = False  # palette PNGs in OUT/predictions/
    eval: InferenceChoice = field(default_factory=InferenceChoice)  # None: the checkpoint's
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder


def run(cfg: EvalConfig, checkpoint: Path, out: Path) -> dict:
    """Write ``metrics.json`` and ``manifest.json`` into ``out``; return the metrics."""
    if not cfg.data:
        raise UserError("--data is required (KIND:PATH of labelled images)")
    timer = Timer()
    dataset = open_labelled(cfg.data, cfg.split, "--data", cfg.reader)
    inputs = {"checkpoint": file_fingerprint(checkpoint), "data": dataset.fingerprint()}
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    model, ckpt = load_model_for(checkpoint, dataset, runtime)
    infer = resolve_inference(ckpt, **dataclasses.asdict(cfg.eval))
    # the manifest's configuration holds the settings used, not what was left to the checkpoint
    config = {**to_dict(cfg), "eval": to_dict(infer)}
    done = prepare_out_dir(out, "eval", inputs, config, [checkpoint])
    if done is not None:
        shutdown(runtime)
        return read_json(out / "metrics.json")
    palette = dataset.taxonomy.palette_array()

    def save(name: str, pred: np.ndarray) -> None:
        save_label_png(out / "predictions" / f"{name}.png", pred, palette)

    metrics = evaluate_dataset(
        model, dataset, infer, runtime, on_prediction=save if cfg.save_predictions else None
    )
    if runtime.is_main:
        write_json(out / "metrics.json", metrics)
        picture = confusion_png(metrics["confusion"], list(metrics["per_class"]))
        save_png_bytes(out / "confusion.png", picture)
        headline = {
            k: metrics[k] for k in ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc") if k in metrics
        }
        headline["inference"] = to_dict(infer)
        finish(out, "eval", config, inputs, headline, timer, {"checkpoint": checkpoint})
        print_table(metrics_table(metrics, f"{checkpoint} on {cfg.data} ({cfg.split})"))
    shutdown(runtime)
    return metrics
