"""``pixcli pseudolabel``: a warmed-up model's soft pseudo labels, class prototypes and class
distribution on the target images, in one ``pseudo.h5`` (layout: :mod:`pixcli.pseudo_labels`).

Rerunning the same command continues an interrupted run (Ctrl-C or kill -9) and ends with
the same file as an uninterrupted one; a file made from another checkpoint, other target
images or other settings is refused. Every process writes its share of the images (every
``world_size``-th under torchrun) into its own work file ``pseudo.part{rank}-of-{world}.h5``
(h5py cannot write one file from several processes); when all are done, the main process
computes the prototypes and builds ``pseudo.h5`` from them. When the target has labels,
the pseudo labels' mIoU and their accuracy against confidence go into ``metrics.json``,
``manifest.json`` and two tables.

Inference is chosen as ``pixcli eval``'s and ``pixcli predict``'s
(:func:`pixcli.predictor.resolve_inference`): the settings the checkpoint was validated with
(its ``eval`` section: e.g. PiXL's multi-resolution windows, a scale), each replaced by the
one given in ``[inference]`` (``--window``, ``--stride``, ``--flip``); the settings used are
in the file's header and the manifest's ``results.inference``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from pixcli.artifacts import file_fingerprint, write_json
from pixcli.config import to_dict
from pixcli.data.readers import ReaderConfig, SegDataset, open_dataset
from pixcli.data.transforms import normalize
from pixcli.engine.evaluation import evaluate_pseudo_labels
from pixcli.engine.inference import InferenceConfig, predict_on_grid
from pixcli.engine.progress import make_progress
from pixcli.engine.prototypes import PrototypeAccumulator, class_feature_sums, hard_labels
from pixcli.engine.runtime import Runtime, setup_runtime, shutdown
from pixcli.errors import Interrupted, Terminated, UserError
from pixcli.models import Segmentor
from pixcli.predictor import InferenceChoice, resolve_inference
from pixcli.pseudo_labels import (
    Header,
    ImageRecord,
    PseudoLabelFile,
    PseudoLabelWriter,
    grid_size,
    image_stats,
    merge,
)
from pixcli.reporting import confidence_table, metrics_table, print_table
from stages.common import Timer, finish, load_model_for, prepare_out_dir

FILE = "pseudo.h5"


@dataclass
class PseudolabelConfig:
    target: str = ""  # KIND:PATH; labels are optional (used only to report quality)
    split: str = "train"
    output_stride: int | None = None  # grid of the stored labels; None = the model's own
    ignore_below: float = 0.0  # hard label 255 where the confidence is below this
    batch_size: int = 1  # images of equal size per forward pass (whole-image inference)
    num_workers: int = 2  # processes decoding images
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    # Inference; None keeps the checkpoint's own setting (its eval section), as pixcli eval
    # and pixcli predict (pixcli.predictor.resolve_inference).
    inference: InferenceChoice = field(default_factory=InferenceChoice)
    reader: ReaderConfig = field(default_factory=ReaderConfig)  # [reader]: acdc, darkzurich, folder


def run(cfg: PseudolabelConfig, checkpoint: Path, out: Path) -> dict:
    """Write ``pseudo.h5`` (+ ``metrics.json`` with target labels) and ``manifest.json``."""
    _check(cfg)
    timer = Timer()
    try:
        dataset = open_dataset(cfg.target, split=cfg.split, options=cfg.reader)
    except UserError as exc:
        raise UserError(f"--target: {exc}") from None
    inputs = {"checkpoint": file_fingerprint(checkpoint), "target": dataset.fingerprint()}
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    model, ckpt = load_model_for(checkpoint, dataset, runtime)
    inference = resolve_inference(ckpt, **dataclasses.asdict(cfg.inference))
    header = _header(cfg, inference, model, inputs, dataset)
    final = out / FILE
    if final.is_file():
        problem = header.mismatch(PseudoLabelFile(final).header)
        if problem:
            raise UserError(f"{final}: was {problem}; use another --out or delete it")
    finished = prepare_out_dir(out, "pseudolabel", inputs, to_dict(cfg), [checkpoint])
    if finished is not None:
        shutdown(runtime)
        return finished
    if not final.is_file():
        _write(cfg, inference, model, dataset, header, out, runtime)
    results = {**_results(final), "inference": to_dict(inference)}
    if dataset.has_labels:
        with PseudoLabelFile(final) as labels:
            quality = evaluate_pseudo_labels(labels, dataset, runtime)
        results["quality"] = _headline(quality)
    manifest: dict = {}
    if runtime.is_main:
        if dataset.has_labels:
            write_json(out / "metrics.json", quality)
            title = f"pseudo labels of {checkpoint} on {cfg.target} ({cfg.split})"
            print_table(metrics_table(quality, title))
            print_table(confidence_table(quality["confidence"], "pseudo-label accuracy"))
        paths = {"checkpoint": checkpoint}
        manifest = finish(out, "pseudolabel", to_dict(cfg), inputs, results, timer, paths)
    shutdown(runtime)
    return manifest


def _check(cfg: PseudolabelConfig) -> None:
    if not cfg.target:
        raise UserError("--target is required (KIND:PATH of the target images)")
    if cfg.output_stride is not None and cfg.output_stride < 1:
        raise UserError(f"--output-stride {cfg.output_stride}: must be at least 1")
    if not 0.0 <= cfg.ignore_below < 1.0:
        raise UserError(f"ignore_below {cfg.ignore_below}: must be in [0, 1)")
    if cfg.batch_size < 1:
        raise UserError(f"batch_size {cfg.batch_size}: must be at least 1")


def _header(
    cfg: PseudolabelConfig,
    inference: InferenceConfig,
    model: Segmentor,
    inputs: dict[str, str],
    dataset: SegDataset,
) -> Header:
    settings = {"inference": to_dict(inference), "ignore_below": cfg.ignore_below}
    return Header(
        classes=tuple(dataset.taxonomy.classes),
        names=tuple(name for _, _, name in dataset.items),
        output_stride=cfg.output_stride or model.output_stride,
        feature_dim=model.config.feature_dim,
        checkpoint=inputs["checkpoint"],
        dataset=dataset.spec(),
        split=cfg.split,
        dataset_fingerprint=inputs["target"],
        settings=Header.settings_json(settings),
    )


# ----------------------------------------------------------------------------- writing


def _work_file(out: Path, rank: int, world: int) -> Path:
    return out / f"pseudo.part{rank}-of-{world}.h5"


def _write(
    cfg: PseudolabelConfig,
    inference: InferenceConfig,
    model: Segmentor,
    dataset: SegDataset,
    header: Header,
    out: Path,
    runtime: Runtime,
) -> None:
    """Every rank writes its images into its work file; then the main rank builds
    ``pseudo.h5`` from the work files."""
    world = runtime.world_size
    _refuse_other_work_files(out, world)
    work_file = _work_file(out, runtime.rank, world)
    writer = PseudoLabelWriter.open(work_file, header, lambda: _image_sizes(dataset))
    indices = list(range(runtime.rank, len(dataset), world))
    _write_images(cfg, inference, model, dataset, writer, indices, runtime)
    runtime.barrier()
    if runtime.is_main:
        _finish([_work_file(out, r, world) for r in range(world)], out / FILE, header)
    runtime.barrier()


def _refuse_other_work_files(out: Path, world: int) -> None:
    """Work files of a run with another number of processes cannot be continued."""
    others = sorted(
        p.name for p in out.glob("pseudo.part*-of-*.h5") if not p.name.endswith(f"-of-{world}.h5")
    )
    if others:
        count = others[0].rsplit("-of-", 1)[1].removesuffix(".h5")
        raise UserError(
            f"{out}: holds the work files of an interrupted run with {count} processes "
            f"({others[0]}); rerun it with {count} processes or delete them"
        )


def _finish(work_files: list[Path], final: Path, header: Header) -> None:
    """Prototypes (CPSL Eq. 7) and class distribution (Eq. 10) from the per-image sums in
    image order, then ``pseudo.h5`` from the work files, which are removed."""
    acc = PrototypeAccumulator(len(header.classes), header.feature_dim)
    for sums, counts in image_stats(work_files):
        acc.add(sums, counts)
    merge(work_files, final, header, acc.prototypes(), acc.counts, acc.class_distribution())
    for path in work_files:
        path.unlink()


def _image_sizes(dataset: SegDataset) -> np.ndarray:
    return np.array([dataset.image_size(i) for i in range(len(dataset))], dtype=np.int32)


class _Images(Dataset):
    """Normalised images with their index (for a DataLoader decoding in workers)."""

    def __init__(self, dataset: SegDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, normalize(self.dataset.read_image(i))


def _collate(items: list[tuple[int, torch.Tensor]]) -> tuple[list[int], torch.Tensor]:
    return [i for i, _ in items], torch.stack([x for _, x in items])


def _batches(indices: list[int], sizes: np.ndarray, batch_size: int) -> list[list[int]]:
    """Consecutive images of equal size, ``batch_size`` at a time. Fixed by the image list
    alone, so a resumed run computes every image in the same batch as an uninterrupted one
    (batched convolutions need not be bit-identical to unbatched ones)."""
    batches: list[list[int]] = []
    for i in indices:
        last = batches[-1] if batches else None
        if last and len(last) < batch_size and tuple(sizes[last[0]]) == tuple(sizes[i]):
            last.append(i)
        else:
            batches.append([i])
    return batches


def _write_images(
    cfg: PseudolabelConfig,
    inference: InferenceConfig,
    model: Segmentor,
    dataset: SegDataset,
    writer: PseudoLabelWriter,
    indices: list[int],
    runtime: Runtime,
) -> None:
    pending = [b for b in _batches(indices, writer.image_sizes, cfg.batch_size)
               if not writer.done[b].all()]  # fmt: skip
    if not pending:
        return
    loader = DataLoader(
        _Images(dataset), batch_sampler=pending, num_workers=cfg.num_workers, collate_fn=_collate
    )
    batches = iter(loader)  # workers start here, before the HDF5 file is opened
    num_classes = len(writer.header.classes)
    interrupted = terminated = False
    with writer, make_progress(runtime.is_main) as progress:
        task = progress.add_task(
            "pseudolabel", total=len(indices), completed=int(writer.done[indices].sum()),
            rate="", info="",
        )  # fmt: skip
        try:
            for batch, x in batches:
                grid = grid_size(tuple(writer.image_sizes[batch[0]]), writer.header.output_stride)
                with runtime.autocast():
                    pred = predict_on_grid(model, x.to(runtime.device), inference, grid)
                probs = pred.logits.softmax(dim=1)
                for k, i in enumerate(batch):
                    if not writer.done[i]:
                        writer.write(i, _record(probs[k], pred.features[k], cfg, num_classes))
                        progress.advance(task)
        except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (Terminated)
            interrupted, terminated = True, isinstance(exc, Terminated)  # the with commits
    if interrupted:
        raise Interrupted(
            f"interrupted after {int(writer.done[indices].sum())} of {len(indices)} images; "
            "rerun the same command to resume",
            terminated=terminated,
        )


def _record(
    probs: torch.Tensor, features: torch.Tensor, cfg: PseudolabelConfig, num_classes: int
) -> ImageRecord:
    hard, confidence = hard_labels(probs, cfg.ignore_below)
    sums, counts = class_feature_sums(features, hard, num_classes)
    return ImageRecord(probs, hard, confidence, sums, counts)


# ----------------------------------------------------------------------------- results


def _results(path: Path) -> dict[str, Any]:
    with PseudoLabelFile(path) as labels:
        n = len(labels)
        dist = labels.class_distribution
        return {
            "images": n,
            "output_stride": labels.output_stride,
            "file_bytes": path.stat().st_size,
            "bytes_per_image": round(path.stat().st_size / max(n, 1)),
            "class_distribution": {
                c: round(float(d), 6) for c, d in zip(labels.classes, dist, strict=True)
            },
            "classes_with_prototypes": int((labels.class_counts > 0).sum()),
        }


def _headline(quality: dict) -> dict[str, Any]:
    keys = ("mIoU", "mIoU16", "mIoU13", "mAcc", "aAcc")
    return {
        **{k: quality[k] for k in keys if k in quality},
        "accuracy_vs_confidence": quality["confidence"],
    }
