"""What every stage does the same way: output directories, datasets, models, manifests."""

from __future__ import annotations

import time
from pathlib import Path

from pixcli.artifacts import check_classes, file_fingerprint, finished_manifest, load_checkpoint
from pixcli.data.readers import SegDataset, open_dataset
from pixcli.engine.progress import console
from pixcli.engine.runtime import Runtime, to_device
from pixcli.errors import UserError
from pixcli.models import Segmentor, SegmentorConfig, build_segmentor


def prepare_out_dir(
    out: Path, stage: str, inputs: dict[str, str], config: dict | None = None
) -> dict | None:
    """Create ``out``; return its manifest when ``stage`` already finished there.

    A finished run made from other inputs (or, when given, another configuration) is
    refused rather than silently kept.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    done = finished_manifest(out, stage)
    if done is not None:
        if done.get("inputs") != inputs or (config is not None and done.get("config") != config):
            what = "inputs" if done.get("inputs") != inputs else "settings"
            raise UserError(
                f"--out {out}: holds a finished {stage} run made with other {what}; "
                "choose another --out or delete it"
            )
        console.print(f"{out}: {stage} already finished (manifest.json); nothing to do")
    return done


def open_data(spec: str, split: str, what: str, require_labels: bool = False) -> SegDataset:
    """A dataset, labelled or not (``what`` names the option in errors)."""
    try:
        return open_dataset(spec, split=split, require_labels=require_labels)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


def open_labelled(spec: str, split: str, what: str) -> SegDataset:
    """A dataset that must have labels (``what`` names the option in errors)."""
    return open_data(spec, split, what, require_labels=True)


def load_model(path: Path, runtime: Runtime) -> tuple[Segmentor, dict]:
    """The Segmentor stored in a checkpoint, on the runtime's device (channels_last when
    the runtime says so), in eval mode."""
    ckpt = load_checkpoint(path)
    try:
        cfg = SegmentorConfig.from_dict(ckpt["model_config"])
    except (TypeError, KeyError) as exc:
        raise UserError(f"{path}: checkpoint has an unknown model configuration ({exc})") from None
    # the config keeps pretrained / weights_file (L_FD's ImageNet copy needs them); the
    # checkpoint's weights replace the backbone's, so they are not loaded here
    model = build_segmentor(cfg, load_weights=False)
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        first = str(exc).splitlines()[0]
        raise UserError(f"{path}: weights do not fit the stored architecture ({first})") from None
    return to_device(model, runtime).eval(), ckpt


def load_model_for(path: Path, dataset: SegDataset, runtime: Runtime) -> tuple[Segmentor, dict]:
    """Like :func:`load_model`, and refuse a checkpoint made for other classes."""
    model, ckpt = load_model(path, runtime)
    check_classes(path, ckpt, dataset.taxonomy.classes)
    return model, ckpt


def checkpoint_inputs(**paths: Path) -> dict[str, str]:
    """Fingerprints of input files for the manifest."""
    return {name: file_fingerprint(p) for name, p in paths.items()}


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start
