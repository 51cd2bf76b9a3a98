"""The pseudo.h5 file format: its constants, the :class:`Header` that says what a file is
made from, opening an existing file (:func:`open_h5`), and creating every attribute and
dataset (:func:`create_layout`). Shared by the writer and the reader; the layout itself is
described in :mod:`pixcli.pseudo_labels`.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

import pixcli
from pixcli.artifacts import require_file
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError
from pixcli.pseudo_labels.quantize import grid_size

FORMAT = "pixcli-pseudo-labels"
VERSION = 1
GZIP_LEVEL = 4
CHUNKED = ("soft", "hard", "confidence")  # one image per chunk
WORK_CHUNKED = (*CHUNKED, "feature_sums_per_image")
QUANTIZATION = (
    "soft: uint8 q with sum_c q = 255 (largest-remainder rounding of 255 p), p = q / sum_c q, "
    "|error| < 1/255; confidence: round(255 p), |error| <= 1/510"
)
PROTOTYPE_FEATURES = (
    "decoder features (the classifier's input), L2-normalised per cell (CPSL Sec. 3.2), "
    "averaged per hard pseudo label (CPSL Eq. 7)"
)
DESCRIPTIONS = {
    "names": "image names, in the dataset's sorted order",
    "image_size": "H, W of each image in pixels",
    "grid_size": "h, w of each image's grid, ceil(H / output_stride); rows are padded",
    "soft": "soft pseudo labels: p = q / sum_c q (sum_c q = 255)",
    "hard": "hard pseudo labels: argmax of p, 255 = ignored or padding",
    "confidence": "max_c p, as round(255 p)",
    "class_counts_per_image": "grid cells per hard label, per image",
    "prototypes": "CPSL Eq. 7: per class, mean L2-normalised feature of its cells (0 if none)",
    "class_counts": "|Gamma_c| of CPSL Eq. 7: grid cells per hard label, all images",
    "class_distribution": "CPSL Eq. 10: class_counts / sum(class_counts)",
    "done": "work file only: 1 = the image's rows are written",
    "feature_sums_per_image": "work file only: per class, sum of L2-normalised features",
}


# ---------------------------------------------------------------------------- header


@dataclass(frozen=True)
class Header:
    """What a pseudo.h5 is made from. A file is resumed, or kept, only when its header
    equals the run's. ``settings`` holds the options that change the content, as JSON."""

    classes: tuple[str, ...]
    names: tuple[str, ...]
    output_stride: int
    feature_dim: int
    checkpoint: str
    dataset: str
    split: str
    dataset_fingerprint: str
    settings: str

    @staticmethod
    def settings_json(settings: dict[str, Any]) -> str:
        return json.dumps(settings, sort_keys=True)

    def mismatch(self, other: Header) -> str | None:
        """How ``other`` (a file's header) differs from this run's, in words, or None."""
        checks = [
            ("checkpoint", "checkpoint"),
            ("dataset_fingerprint", "target images with fingerprint"),
            ("classes", "classes"),
            ("names", "image names"),
            ("output_stride", "output stride"),
            ("feature_dim", "feature dimension"),
            ("settings", "settings"),
        ]
        for key, words in checks:
            mine, theirs = getattr(self, key), getattr(other, key)
            if mine != theirs:
                if key in ("classes", "names"):
                    return f"made for other {words}"
                return f"made with {words} {theirs}, this run has {mine}"
        return None

    @classmethod
    def from_file(cls, fh: h5py.File) -> Header:
        a = fh.attrs
        return cls(
            classes=tuple(_strs(a["classes"])),
            names=tuple(_strs(fh["names"][()])),
            output_stride=int(a["output_stride"]),
            feature_dim=int(a["feature_dim"]),
            checkpoint=as_str(a["checkpoint"]),
            dataset=as_str(a["dataset"]),
            split=as_str(a["split"]),
            dataset_fingerprint=as_str(a["dataset_fingerprint"]),
            settings=as_str(a["settings"]),
        )


def as_str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strs(values: Any) -> list[str]:
    return [as_str(v) for v in np.asarray(values).reshape(-1)]


# ---------------------------------------------------------------------------- opening


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open an existing pseudo.h5 or work file; unreadable or foreign files are one-line
    UserErrors."""
    require_file(path, "pseudo-label file")
    try:
        fh = h5py.File(path, mode)
    except OSError as exc:
        hint = "; on file systems without locks set HDF5_USE_FILE_LOCKING=FALSE"
        raise UserError(
            f"{path}: not a readable HDF5 file, truncated or damaged ({first_line(exc)})"
            + (hint if "lock" in str(exc) else "")
        ) from None
    problem = None
    if as_str(fh.attrs.get("format", "")) != FORMAT:
        problem = f"not a pixcli pseudo-label file (no format={FORMAT!r} attribute)"
    elif int(fh.attrs.get("version", 0)) > VERSION:
        problem = f"pseudo-label format {fh.attrs['version']} is newer than this pixcli"
    else:
        missing = [k for k in ("names", "image_size", *CHUNKED, "prototypes") if k not in fh]
        if missing:
            problem = f"damaged pseudo-label file (lacks {', '.join(missing)})"
        elif HEADER_CHECKSUM in fh.attrs and as_str(fh.attrs[HEADER_CHECKSUM]) != header_digest(fh):
            problem = (
                "damaged pseudo-label file (its attributes or image names do not match their "
                f"checksum {HEADER_CHECKSUM}); delete it and run pixcli pseudolabel again"
            )
    if problem:
        fh.close()
        raise UserError(f"{path}: {problem}")
    return fh


def read_or_fail(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """Run ``read()``; an HDF5 read error (bad checksum, cut-off file) becomes a UserError."""
    try:
        return read()
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"{path}: {what} is unreadable, the file is damaged ({first_line(exc)}); "
            "delete it and run pixcli pseudolabel again"
        ) from None


# ---------------------------------------------------------------------------- checksums

HEADER_CHECKSUM = "header_sha256"


def header_digest(fh: h5py.File) -> str:
    """sha256 of every root attribute (but the checksum itself) and of the image names,
    which (variable-length strings) cannot carry HDF5's Fletcher-32 checksum."""
    digest = hashlib.sha256()
    for key in sorted(k for k in fh.attrs if k != HEADER_CHECKSUM):
        value = fh.attrs[key]
        text = _strs(value) if isinstance(value, np.ndarray) else as_str(value)
        digest.update(f"{key}\0{text}\0".encode())
    for name in _strs(fh["names"][()]):
        digest.update(f"{name}\n".encode())
    return digest.hexdigest()


def seal_header(fh: h5py.File) -> None:
    """Store :func:`header_digest` (call after the last change to the attributes)."""
    fh.attrs[HEADER_CHECKSUM] = header_digest(fh)


# ---------------------------------------------------------------------------- layout


def create_layout(fh: h5py.File, header: Header, sizes: np.ndarray, work: bool) -> None:
    """Create every attribute and dataset of a pseudo.h5 (``work``: of a work file)."""
    sizes = np.asarray(sizes, dtype=np.int32).reshape(-1, 2)
    if len(sizes) != len(header.names):
        raise ValueError(f"{len(sizes)} image sizes for {len(header.names)} names")
    grids = np.array([grid_size((h, w), header.output_stride) for h, w in sizes], np.int32)
    hmax, wmax = (int(v) for v in grids.max(axis=0))
    n, c, d = len(header.names), len(header.classes), header.feature_dim
    text = h5py.string_dtype()
    fh.attrs.update(
        {
            "format": FORMAT,
            "version": VERSION,
            "complete": 0,
            "classes": np.array(header.classes, dtype=text),
            "num_classes": c,
            "output_stride": header.output_stride,
            "feature_dim": d,
            "checkpoint": header.checkpoint,
            "dataset": header.dataset,
            "split": header.split,
            "dataset_fingerprint": header.dataset_fingerprint,
            "settings": header.settings,
            "pixcli_version": pixcli.__version__,
            "quantization": QUANTIZATION,
            "prototype_features": PROTOTYPE_FEATURES,
            "compression": f"gzip level {GZIP_LEVEL} + fletcher32, one image per chunk; "
            f"fletcher32 on every other dataset; {HEADER_CHECKSUM} over attributes and names",
            "ignore_index": IGNORE_INDEX,
        }
    )
    fh.create_dataset("names", data=np.array(header.names, dtype=text))  # in HEADER_CHECKSUM
    fh.create_dataset("image_size", data=sizes, fletcher32=True)
    fh.create_dataset("grid_size", data=grids, fletcher32=True)
    chunked = {
        "soft": ((n, c, hmax, wmax), np.uint8, 0),
        "hard": ((n, hmax, wmax), np.uint8, IGNORE_INDEX),
        "confidence": ((n, hmax, wmax), np.uint8, 0),
    }
    if work:
        chunked["feature_sums_per_image"] = ((n, c, d), np.float32, 0)
        fh.create_dataset("done", data=np.zeros(n, np.uint8), fletcher32=True)
    for name, (shape, dtype, fill) in chunked.items():
        fh.create_dataset(
            name, shape, dtype, chunks=(1, *shape[1:]), compression="gzip",
            compression_opts=GZIP_LEVEL, fletcher32=True, fillvalue=fill,
        )  # fmt: skip
    small = {
        "class_counts_per_image": np.zeros((n, c), np.int32),
        "prototypes": np.zeros((c, d), np.float32),
        "class_counts": np.zeros(c, np.int64),
        "class_distribution": np.zeros(c, np.float64),
    }
    for name, zeros in small.items():
        fh.create_dataset(name, data=zeros, fletcher32=True)
    for name in fh:
        fh[name].attrs["description"] = DESCRIPTIONS[name]
    seal_header(fh)
