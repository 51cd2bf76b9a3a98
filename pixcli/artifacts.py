"""On-disk formats: checkpoints, manifests and JSON files, all written atomically.

A checkpoint (``model.pt``, ``last.pt``, ``best.pt``) is a plain dict of tensors and plain
data, loaded with ``weights_only=True`` so that a checkpoint can never run code:

``format``           "pixcli-checkpoint"
``version``          format version (1)
``model_config``     the Segmentor's configuration (``SegmentorConfig.to_dict()``)
``classes``          class names, index = train id
``palette``          one RGB triple per class
``state_dict``       the model weights
``step``             iterations done
``train_state``      optional: optimiser states and whatever else resuming needs
``meta``             optional plain data: stage, config, dataset fingerprints

The pseudo-label file ``pseudo.h5`` (writer, reader, layout) is :mod:`pixcli.pseudo_labels`.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pixcli.errors import UserError
from pixcli.provenance import provenance, versions

CHECKPOINT_FORMAT = "pixcli-checkpoint"
CHECKPOINT_VERSION = 1


def atomic_write(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A crash of the process leaves either the old file or the new one, never a half-written
    one. With ``durable`` the file and the rename are also flushed to the disk (fsync), so
    that a power loss cannot leave an empty file either; without it (files that are cheap to
    make again and many, as predict's: the two fsyncs were about 1.5 ms an image) a power loss
    may leave an empty file, which the writer must treat as missing. The file gets the mode
    an ordinary ``open`` would give it (0644 under umask 022), not mkstemp's 0600, so that
    others in the group can read the artifacts.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = f"{_HOST}-{os.getpid()}"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".{owner}.tmp", dir=path.parent)
    os.close(fd)
    _WRITING.add(Path(tmp).name)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~_umask())
        if durable:
            _fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _WRITING.discard(Path(tmp).name)
    if durable:
        _fsync(path.parent)  # the rename itself reaches the disk


def _umask() -> int:
    """The process's umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# A temporary file of atomic_write is named ``.NAME.RANDOM.HOST-PID.tmp`` after the process
# writing it (HOST without dots, so that the name splits at them).
_HOST = socket.gethostname().replace(".", "_")
_WRITING: set[str] = set()  # the names of this process's temporary files being written now
# When this process started: the test for a temporary file that names no owner on this host.
_STARTED = time.time()


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _is_stale(tmp: Path) -> bool:
    """Whether ``tmp``'s writer is gone: this process when it is not writing it, another
    process on this host when that has ended; else (another host, an older pixcli's name)
    when the file is older than this process."""
    host, _, pid = tmp.name.removesuffix(".tmp").rpartition(".")[2].rpartition("-")
    if host == _HOST and pid.isdigit():
        if int(pid) == os.getpid():
            return tmp.name not in _WRITING
        return not _process_alive(int(pid))
    return tmp.stat().st_mtime < _STARTED


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files :func:`atomic_write` left in ``directory`` when a run
    was killed (never one a live process is writing, see :func:`_is_stale`)."""
    removed = []
    for tmp in directory.glob(".*.tmp"):
        if tmp.is_file() and not tmp.is_symlink() and _is_stale(tmp):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str) + "\n"))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not valid JSON ({exc})") from None


def require_file(path: Path, what: str = "file") -> None:
    """A one-line UserError unless ``path`` is a regular file ("is a directory" or "not
    found", naming ``what`` it should be)."""
    if Path(path).is_dir():
        raise UserError(f"{path}: is a directory, expected a {what}")
    if not Path(path).is_file():
        raise UserError(f"{path}: {what} not found")


def file_fingerprint(path: Path) -> str:
    """Short sha256 of a file's content; a missing file is a user error naming it."""
    require_file(path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def save_checkpoint(path: Path, checkpoint: dict) -> None:
    """Write a checkpoint dict atomically (fills in the format name and version)."""
    data = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **checkpoint}
    atomic_write(path, lambda tmp: torch.save(data, tmp))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict:
    """Load and check a pixcli checkpoint; any problem is a one-line ``UserError``."""
    path = Path(path)
    require_file(path, "checkpoint")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for truncated or foreign files
        raise UserError(f"{path}: not a readable checkpoint ({_load_problem(exc)})") from None
    if not isinstance(data, dict) or data.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path}: not a pixcli checkpoint")
    if data.get("version", 0) > CHECKPOINT_VERSION:
        raise UserError(f"{path}: checkpoint format {data['version']} is newer than this pixcli")
    for key in ("model_config", "classes", "state_dict"):
        if key not in data:
            raise UserError(f"{path}: checkpoint lacks '{key}'")
    return data


def _load_problem(exc: Exception) -> str:
    """What torch.load said, in one line, without its advice to load unsafely."""
    text = str(exc).strip()
    if "Weights only load failed" in text:
        skip = ("Weights only load failed", "Please file an issue", "Check the documentation")
        lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
        detail = [ln for ln in lines if not ln.startswith(skip)]
        why = detail[0].removeprefix("WeightsUnpickler error:").strip() if detail else ""
        return f"not plain tensors and data, refused unread: {why[:120] or 'unknown content'}"
    first = text.splitlines()[0] if text else type(exc).__name__
    return first[:160]


def check_finite(path: Path, state_dict: dict) -> None:
    """Refuse weights holding NaN or infinite values (a run that diverged)."""
    for name, value in state_dict.items():
        floating = isinstance(value, torch.Tensor) and value.is_floating_point()
        if floating and not bool(torch.isfinite(value).all()):
            raise UserError(f"{path}: weight {name} holds NaN or infinite values")


def check_classes(path: Path, checkpoint: dict, classes: list[str] | tuple[str, ...]) -> None:
    """Refuse a checkpoint whose class list is not the dataset's."""
    if list(checkpoint["classes"]) != list(classes):
        raise UserError(
            f"{path}: checkpoint predicts {len(checkpoint['classes'])} classes "
            f"({', '.join(checkpoint['classes'][:4])}, ...) but the data has {len(classes)} "
            f"({', '.join(list(classes)[:4])}, ...)"
        )


def write_manifest(
    out_dir: Path,
    stage: str,
    config: dict,
    inputs: dict[str, str],
    results: dict,
    wall_time_s: float,
    complete: bool = True,
    paths: dict[str, Path] | None = None,
) -> dict:
    """``manifest.json``: what ran, on what, how long, and the headline numbers, with the
    ``provenance`` (:func:`pixcli.provenance.provenance`: command line, UTC start and end,
    host, device, git commit, absolute paths of the data and of the input files ``paths``)."""
    manifest = {
        "stage": stage,
        "complete": complete,
        "config": config,
        "inputs": inputs,
        "versions": versions(),
        "provenance": provenance(config, wall_time_s, paths),
        "wall_time_s": round(wall_time_s, 2),
        "results": results,
    }
    write_json(out_dir / "manifest.json", manifest)
    return manifest


def finished_manifest(out_dir: Path, stage: str) -> dict | None:
    """The manifest of a finished run of ``stage`` in ``out_dir``, or None."""
    path = out_dir / "manifest.json"
    if not path.is_file():
        return None
    manifest = read_json(path)
    if manifest.get("stage") != stage:
        raise UserError(f"{out_dir}: holds the output of '{manifest.get('stage')}', not '{stage}'")
    return manifest if manifest.get("complete") else None


def save_label_png(
    path: Path, label: np.ndarray, palette: np.ndarray, durable: bool = True
) -> None:
    """A train-id map as a palette PNG: pixel values are train ids, colours from ``palette``
    ((256, 3) uint8), so the file is both viewable and exactly readable as labels.
    ``durable``: as :func:`atomic_write`'s."""
    from PIL import Image

    img = Image.fromarray(label.astype("uint8"), mode="P")
    img.putpalette(palette.astype("uint8").reshape(-1).tolist())
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"), durable)
