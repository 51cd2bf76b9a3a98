"""``pixcli predict``: a checkpoint's predictions for any images, as PNG/JPEG files.

Per input image, mirroring the input tree under ``out`` (``REL`` = its path relative to the
``--images`` argument it came from, without suffix):

- ``REL_label.png``: class ids (uint8 palette PNG: viewable, and its values are the ids;
  the same file ``pixcli eval --save-predictions`` writes);
- ``REL_color.png``: the classes' colours (RGB);
- ``REL_overlay.jpg``: the image blended with the colours (``alpha``);
- with ``confidence``: ``REL_confidence.png``, the max class probability x 255 (grey);
- with ``probs``: ``REL_probs.npy``, the class probabilities ``(C, H, W) float16``.

All predictions go through :class:`pixcli.predictor.Predictor` (``pixcli.load``). An
image is finished when all its files exist and none is empty (each is written atomically,
without fsync: an interrupted run leaves whole files or none, a power loss at worst an
empty one); a rerun predicts only the others. An unreadable image is reported and
skipped, the rest written, and the run ends with a UserError (exit 2) listing how many
were skipped. Under torchrun each rank predicts every ``world_size``-th unfinished image;
rank 0 writes ``manifest.json``.
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image

from pixcli.artifacts import (
    atomic_write,
    file_fingerprint,
    read_json,
    save_label_png,
    write_manifest,
)
from pixcli.config import to_dict
from pixcli.data.image_files import ImageFile, find_images, read_image
from pixcli.engine.progress import console, make_progress
from pixcli.engine.runtime import Runtime, setup_runtime, shutdown
from pixcli.errors import UserError
from pixcli.predictor import InferenceChoice, Predictor, blend, class_ids
from stages.common import Timer

STAGE = "predict"
IO_AHEAD = 4  # images read ahead, and finished images waiting to be written


@dataclass
class PredictConfig:
    images: list[str] = field(default_factory=list)  # files, directories, glob patterns
    device: str = "auto"
    amp: bool = True
    seed: int = 0
    batch_size: int = 1  # images of equal size per forward pass
    alpha: float = 0.5  # weight of the colours in the overlay
    confidence: bool = False  # also write REL_confidence.png
    probs: bool = False  # also write REL_probs.npy (float16)
    # Not on a terminal: a progress line every this many images (0: every tenth of them).
    log_every: int = 0
    # Inference; None keeps the checkpoint's own setting (its eval section), as pixcli eval.
    eval: InferenceChoice = field(default_factory=InferenceChoice)


def output_paths(out: Path, image: ImageFile, cfg: PredictConfig) -> dict[str, Path]:
    """The files written for ``image``, by kind."""
    base = out / image.relative
    paths = {
        "label": base.with_name(f"{base.name}_label.png"),
        "color": base.with_name(f"{base.name}_color.png"),
        "overlay": base.with_name(f"{base.name}_overlay.jpg"),
    }
    if cfg.confidence:
        paths["confidence"] = base.with_name(f"{base.name}_confidence.png")
    if cfg.probs:
        paths["probs"] = base.with_name(f"{base.name}_probs.npy")
    return paths


# zlib level 1 for the colour and confidence PNGs: PIL's default 6 took 0.9 ms of a 256x128
# colour image's 5.7 ms of writing (benchmarks/predict_bench.py); level 1's files are 1.34x
# larger (20 colour maps of the street benchmark's val images: 66 against 49 KB)
PNG_OPTIONS = {"compress_level": 1}
JPEG_OPTIONS = {"quality": 90}


def _save_image(path: Path, array: np.ndarray) -> None:
    image = Image.fromarray(array)
    fmt, options = ("JPEG", JPEG_OPTIONS) if path.suffix == ".jpg" else ("PNG", PNG_OPTIONS)
    atomic_write(path, lambda tmp: image.save(tmp, format=fmt, **options), durable=False)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    atomic_write(path, write, durable=False)


def is_finished(paths: dict[str, Path]) -> bool:
    """Whether an image's files are all there and none is empty (what a power loss during
    a non-durable write can leave)."""
    return all(p.is_file() and p.stat().st_size > 0 for p in paths.values())


def image_arrays(logits: torch.Tensor, cfg: PredictConfig) -> list[dict[str, np.ndarray]]:
    """Per image of a batch of logits ``(B, C, H, W)``: its class ids (``label``, ``(H, W)
    uint8``) and, when asked for, ``confidence`` (``(H, W) uint8``) and ``probs`` (``(C, H,
    W) float16``). Computed on the model's thread (torch's threads), so that the writing
    threads run no torch operations of their own."""
    arrays: list[dict[str, np.ndarray]] = [{"label": ids} for ids in class_ids(logits)]
    if cfg.confidence or cfg.probs:
        probs = logits.softmax(1)
        if cfg.confidence:
            conf = probs.max(1).values.mul(255).round().to(torch.uint8).cpu().numpy()
            for item, c in zip(arrays, conf, strict=True):
                item["confidence"] = c
        if cfg.probs:
            for item, p in zip(arrays, probs.to(torch.float16).cpu().numpy(), strict=True):
                item["probs"] = p
    return arrays


def write_outputs(
    predictor: Predictor,
    image: np.ndarray,
    arrays: dict[str, np.ndarray],
    paths: dict[str, Path],
    alpha: float,
) -> None:
    """Write one image's files from its :func:`image_arrays`; the label file last."""
    if "confidence" in paths:
        _save_image(paths["confidence"], arrays["confidence"])
    if "probs" in paths:
        _save_npy(paths["probs"], arrays["probs"])
    colors = predictor.colorize(arrays["label"])
    _save_image(paths["color"], colors)
    _save_image(paths["overlay"], blend(image, colors, alpha))
    save_label_png(paths["label"], arrays["label"], predictor.palette_table(), durable=False)


def _settings(cfg: PredictConfig, predictor: Predictor) -> dict:
    """What decides the files' content: a rerun into the same ``out`` must match it."""
    return {
        "inference": to_dict(predictor.inference),
        "alpha": cfg.alpha,
        "confidence": cfg.confidence,
        "probs": cfg.probs,
    }


def _check_out_dir(out: Path, inputs: dict[str, str], settings: dict) -> None:
    """Create ``out``; refuse one holding another stage's output or predictions made by
    another checkpoint or with other settings (finished or not)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    if not (out / "manifest.json").is_file():
        return
    old = read_json(out / "manifest.json")
    if old.get("stage") != STAGE:
        raise UserError(f"{out}: holds the output of '{old.get('stage')}', not '{STAGE}'")
    if old.get("inputs") != inputs:
        what = "another checkpoint"
    elif old.get("config", {}).get("settings") != settings:
        what = "other settings"
    else:
        return
    raise UserError(
        f"--out {out}: holds predictions made with {what}; choose another --out or delete it"
    )


def _read_ahead(
    pool: ThreadPoolExecutor, todo: list[ImageFile], depth: int
) -> Iterator[tuple[ImageFile, np.ndarray | UserError]]:
    """``(image, its pixels or the UserError reading it)`` in order, reading up to
    ``depth`` images ahead in ``pool``'s threads (while the model runs)."""
    queue: deque[tuple[ImageFile, Future[np.ndarray]]] = deque()
    upcoming = iter(todo)
    while True:
        while len(queue) < depth and (item := next(upcoming, None)) is not None:
            queue.append((item, pool.submit(read_image, item.path)))
        if not queue:
            return
        item, future = queue.popleft()
        try:
            yield item, future.result()
        except UserError as exc:
            yield item, exc


def _predict_shard(
    predictor: Predictor,
    todo: list[ImageFile],
    cfg: PredictConfig,
    out: Path,
    runtime: Runtime,
) -> list[dict[str, str]]:
    """Predict and write ``todo`` (this rank's share) in batches of equal-sized consecutive
    images; return the unreadable ones as ``{"image", "reason"}``.

    Two threads read the next images and write the finished ones while the model runs
    (PNG/JPEG coding releases the GIL); at most ``IO_AHEAD`` writes wait at any time, and
    an error while writing (a full disk) ends the run.
    """
    failed: list[dict[str, str]] = []
    pending: list[tuple[ImageFile, np.ndarray]] = []
    writes: deque[Future[None]] = deque()

    def flush() -> None:
        logits = predictor.logits([array for _, array in pending])
        for (item, array), arrays in zip(pending, image_arrays(logits, cfg), strict=True):
            paths = output_paths(out, item, cfg)
            writes.append(pool.submit(write_outputs, predictor, array, arrays, paths, cfg.alpha))
            while len(writes) > IO_AHEAD:
                writes.popleft().result()
        progress.advance(task, len(pending))
        pending.clear()

    progress = make_progress(runtime.is_main, log_every=cfg.log_every, unit="images")
    with progress, ThreadPoolExecutor(2) as pool:
        task = progress.add_task(STAGE, total=len(todo), rate="", info="")
        for item, array in _read_ahead(pool, todo, IO_AHEAD):
            if isinstance(array, UserError):
                failed.append({"image": str(item.path), "reason": str(array)})
                console.print(f"[yellow]skipped[/] {array}", highlight=False, soft_wrap=True)
                progress.advance(task)
                continue
            if pending and (len(pending) >= cfg.batch_size or pending[0][1].shape != array.shape):
                flush()
            pending.append((item, array))
        if pending:
            flush()
        for write in writes:
            write.result()
    return failed


def summary_line(manifest: dict, out: Path) -> str:
    """The run's last line, like the other stages' (:func:`stages.common.finish`): e.g.
    ``predict finished in 4.2 s: 300 images predicted in 3.9 s (76.92 images/s), 0 already
    done, 0 unreadable -> runs/predict``."""
    results = manifest["results"]
    return (
        f"{STAGE} finished in {manifest['wall_time_s']:.1f} s: {results['predicted']} images "
        f"predicted in {results['predict_seconds']:.1f} s ({results['images_per_s']:.2f} "
        f"images/s), {results['already_done']} already done, {len(results['failed'])} "
        f"unreadable -> {out}"
    )


def run(cfg: PredictConfig, checkpoint: Path, out: Path) -> dict:
    """Predict every image of ``cfg.images`` into ``out``; return the manifest's results.

    Raises a UserError after writing everything else when some images could not be read.
    """
    timer = Timer()
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UserError(f"--alpha must be between 0 and 1, got {cfg.alpha}")
    images = find_images(cfg.images, exclude=out)
    runtime = setup_runtime(cfg.device, cfg.amp, cfg.seed)
    predictor, _ = Predictor.from_checkpoint(checkpoint, runtime, **dataclasses.asdict(cfg.eval))
    inputs = {"checkpoint": file_fingerprint(checkpoint)}
    settings = _settings(cfg, predictor)
    config = {**to_dict(cfg), "settings": settings}
    if runtime.is_main:
        _check_out_dir(out, inputs, settings)
    runtime.barrier()
    todo = [im for im in images if not is_finished(output_paths(out, im, cfg))]
    runtime.barrier()  # every rank has looked before any writes
    if runtime.is_main:
        write_manifest(out, STAGE, config, inputs, {"images": len(images)}, 0.0, complete=False)
        if len(todo) < len(images):
            console.print(f"{out}: {len(images) - len(todo)} images already predicted; skipped")
    loop = Timer()
    failed = _predict_shard(predictor, todo[runtime.rank :: runtime.world_size], cfg, out, runtime)
    if runtime.distributed:
        gathered: list[list[dict[str, str]]] = [[] for _ in range(runtime.world_size)]
        dist.all_gather_object(gathered, failed)
        failed = [f for part in gathered for f in part]
    predicting = loop.seconds()  # reading, predicting, writing (not loading the model)
    predicted = len(todo) - len(failed)
    results = {
        "images": len(images),
        "predicted": predicted,
        "already_done": len(images) - len(todo),
        "failed": failed,
        "predict_seconds": round(predicting, 3),
        "images_per_s": round(predicted / max(predicting, 1e-9), 3),
        "inference": to_dict(predictor.inference),
    }
    if runtime.is_main:
        manifest = write_manifest(out, STAGE, config, inputs, results, timer.seconds(), not failed)
        console.print(summary_line(manifest, out), highlight=False, soft_wrap=True)
    shutdown(runtime)
    if failed:
        raise UserError(
            f"{len(failed)} of {len(images)} images could not be read and were skipped "
            f"(listed above and in {out / 'manifest.json'})"
        )
    return results
