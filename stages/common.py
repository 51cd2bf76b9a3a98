"""What every stage does the same way: output directories, datasets, models, manifests."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

from pixcli.artifacts import (
    check_classes,
    file_fingerprint,
    finished_manifest,
    read_json,
    remove_stale_temporaries,
    write_manifest,
)
from pixcli.config import config_differences
from pixcli.data.readers import ReaderConfig, SegDataset, open_dataset
from pixcli.engine.progress import console
from pixcli.engine.runtime import Runtime, to_device
from pixcli.errors import UserError
from pixcli.models import Segmentor
from pixcli.models.checkpoint import segmentor_from_checkpoint


def prepare_out_dir(
    out: Path,
    stage: str,
    inputs: dict[str, str],
    config: dict | None = None,
    input_files: Sequence[Path] = (),
) -> dict | None:
    """Create ``out``; return its manifest when ``stage`` already finished there.

    A finished run made from other inputs (or, when given, another configuration) is
    refused rather than silently kept. So is an ``out`` that is the folder of one of the
    ``input_files``, one holding files but no ``manifest.json`` or ``last.pt`` (not a
    pixcli run), and one
    holding a symbolic link (pixcli never writes through one). A run that starts writes an
    unfinished manifest first, so that its partial output is known as pixcli's when the
    command is run again (which resumes it); temporary files a killed run left are removed.
    """
    _check_out_dir(out, input_files)
    out.mkdir(parents=True, exist_ok=True)
    if _is_main_process():
        remove_stale_temporaries(out)
    done = finished_manifest(out, stage)
    if done is not None:
        differ = config_differences(done.get("inputs", {}), inputs, ignore=frozenset())
        differ = [f"input {d}" for d in differ]
        if config is not None:
            differ += config_differences(done.get("config", {}), config)
        if differ:
            raise UserError(
                f"--out {out}: holds a finished {stage} run made with other settings "
                f"({'; '.join(differ)}); choose another --out, or --force to start over"
            )
        console.print(f"{out}: {stage} already finished (manifest.json); nothing to do")
    elif _is_main_process():
        write_manifest(out, stage, config or {}, inputs, {}, 0.0, complete=False)
    return done


def _check_out_dir(out: Path, input_files: Sequence[Path]) -> None:
    """The refusals of :func:`prepare_out_dir`, before anything is written."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: exists and is not a directory")
    for path in input_files:
        if Path(path).resolve().parent == out.resolve():
            raise UserError(
                f"--out {out}: is the folder of the input {path}, which the run would "
                "overwrite; choose another --out"
            )
    if not out.is_dir():
        return
    entries = [p for p in out.iterdir() if not (p.name.startswith(".") and p.suffix == ".tmp")]
    links = [p for p in entries if p.is_symlink()]
    if links:
        raise UserError(f"{links[0]}: is a symbolic link; pixcli never writes through one")
    if entries and not any((out / name).is_file() for name in ("manifest.json", "last.pt")):
        raise UserError(
            f"--out {out}: holds files ({entries[0].name}, ...) but no pixcli manifest.json; "
            "choose a new or empty directory"
        )


def _is_main_process() -> bool:
    """Rank 0 of a torchrun job, or a single process (shared files are rank 0's to write)."""
    return int(os.environ.get("RANK", "0")) == 0


def open_data(
    spec: str,
    split: str,
    what: str,
    require_labels: bool = False,
    reader: ReaderConfig | None = None,
) -> SegDataset:
    """A dataset, labelled or not (``what`` names the option in errors; ``reader``: the
    stage's ``[reader]`` settings)."""
    try:
        return open_dataset(spec, split=split, require_labels=require_labels, options=reader)
    except UserError as exc:
        raise UserError(f"{what}: {exc}") from None


def open_labelled(
    spec: str, split: str, what: str, reader: ReaderConfig | None = None
) -> SegDataset:
    """A dataset that must have labels (``what`` names the option in errors)."""
    return open_data(spec, split, what, require_labels=True, reader=reader)


def load_model(path: Path, runtime: Runtime) -> tuple[Segmentor, dict]:
    """The Segmentor stored in a checkpoint, on the runtime's device (channels_last when
    the runtime says so), in eval mode; the checks of
    :func:`pixcli.models.checkpoint.segmentor_from_checkpoint` (which ``pixcli.load`` shares)."""
    model, ckpt = segmentor_from_checkpoint(path)
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


def start_over(out: Path, stage: str) -> None:
    """``--force``: delete the run of ``stage`` in ``out`` so that the command starts afresh.

    Only a directory whose ``manifest.json`` (finished or not) names this stage is deleted;
    a missing or empty one is left as it is; anything else is refused, so that ``--force``
    never deletes a folder pixcli did not write.
    """
    import shutil

    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    _check_out_dir(out, ())  # a file, a symbolic link inside, files but no manifest.json
    found = read_json(out / "manifest.json").get("stage")
    if found != stage:
        raise UserError(f"--force: {out} holds the output of '{found}', not '{stage}'")
    shutil.rmtree(out)
    console.print(f"--force: deleted {out}; starting over", highlight=False)


def finish(
    out: Path,
    stage: str,
    config: dict,
    inputs: dict[str, str],
    results: dict,
    timer: Timer,
    paths: dict[str, Path] | None = None,
) -> dict:
    """Write the finished stage's ``manifest.json`` (see :func:`write_manifest`) and print
    its summary line: what was written, the wall time and the headline figure."""
    manifest = write_manifest(out, stage, config, inputs, results, timer.seconds(), paths=paths)
    written = sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir())
    line = f"{stage} finished in {manifest['wall_time_s']:.1f} s: {out}"
    line += f" ({', '.join(n for n in written if not n.startswith('.'))})"
    figure = headline(results)
    console.print(line + (f"; {figure}" if figure else ""), highlight=False, soft_wrap=True)
    return manifest


def headline(results: dict) -> str:
    """The figure a stage is judged by, from its manifest results: ``mIoU 45.2``, or
    ``val_best mIoU 45.2`` (the first nested one), or "" when there is none."""
    if isinstance(results.get("mIoU"), int | float):
        return f"mIoU {results['mIoU']:.1f}"
    for key, value in results.items():
        if isinstance(value, dict) and isinstance(value.get("mIoU"), int | float):
            return f"{key} mIoU {value['mIoU']:.1f}"
    return ""
