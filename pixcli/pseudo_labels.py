"""``pseudo.h5``: soft pseudo labels, prototypes and class distribution in one HDF5 file.

Written by ``pixcli pseudolabel``, read by ``adapt`` (:class:`PseudoLabelFile`) and by
anyone with plain h5py. ``N`` images, ``C`` classes, ``D`` feature channels; every image
has a grid of ``h x w = ceil(H / s) x ceil(W / s)`` cells for its ``H x W`` pixels and the
output stride ``s`` (cell ``(y, x)`` covers the image the way a model's output grid does:
resizing the grid bilinearly, align_corners=False, to ``H x W`` gives per-pixel values).
Per-image arrays are padded to the largest grid ``hmax x wmax`` (padding: soft 0, hard 255,
confidence 0); ``grid_size`` says how much of each is real.

Root attributes::

    format              "pixcli-pseudo-labels"
    version             1
    complete            1 (a pseudo.h5 only ever appears complete; work files have 0)
    classes             class names (index = train id); num_classes = C
    output_stride       s (image pixels per grid cell)
    feature_dim         D
    checkpoint          fingerprint (sha256 prefix) of the producing model.pt
    dataset, split      the target data (KIND:PATH) and split; dataset_fingerprint
    settings            JSON: the settings that change the content (inference, ignore_below)
    pixcli_version      the writer's version
    quantization, prototype_features, compression, ignore_index: how to read the numbers

Datasets (each has a ``description`` attribute)::

    names               (N,) str           image names, in the dataset's sorted order
    image_size          (N, 2) int32       H, W
    grid_size           (N, 2) int32       h, w
    soft                (N, C, hmax, wmax) uint8   q; p = q / sum_c q, and sum_c q = 255
    hard                (N, hmax, wmax) uint8      argmax_c p (taken before quantization);
                                                   255 = ignored (max p < ignore_below) or pad
    confidence          (N, hmax, wmax) uint8      round(255 max_c p)
    class_counts_per_image (N, C) int32    grid cells per hard label, per image
    prototypes          (C, D) float32     CPSL Eq. 7: per class, the mean L2-normalised
                                           decoder feature of its cells (0 if none)
    class_counts        (C,) int64         |Gamma_c| of Eq. 7: cells per hard label
    class_distribution  (C,) float64       CPSL Eq. 10: class_counts / sum(class_counts)

Quantization: soft labels are stored as uint8 ``q`` with ``sum_c q = 255`` at every cell
(largest-remainder rounding of ``255 p``: every ``q_c`` is ``floor`` or ``ceil`` of
``255 p_c``), so ``q / 255`` is already a distribution and ``|q_c / 255 - p_c| < 1/255``.
Readers divide by ``sum_c q`` anyway (renormalising), which keeps all-zero padding at zero.
Plain rounding ``round(255 p)`` would lose the sum (off by up to ``C/510``), and
renormalising that moves a probability by up to several times 1/255.

Storage: ``soft``, ``hard`` and ``confidence`` are chunked one image per chunk,
gzip-compressed (level 4; gzip is in every HDF5 build, unlike lzf; higher levels gain ~5%
for twice the time) with a Fletcher-32 checksum, so a damaged chunk is an error, never
silent garbage. Small arrays are contiguous.

Writing, resuming, several processes: each process writes its images into its own *work
file* (the layout above plus ``done`` (N,) uint8 and ``feature_sums_per_image`` (N, C, D)
float32, ``complete`` 0), created at once in a temporary file renamed into place. Images'
rows are written, the file is flushed, and only then are they marked in ``done``, so after
Ctrl-C or kill -9 the images marked done are exactly those whose data reached the file (no
SWMR; on reopening, an image marked done whose chunks are missing is redone). This commit
happens at least once a second, so a crash loses about a second of work and flushing
costs little. When every image is done, :func:`merge` builds ``pseudo.h5`` from the work
files through a temporary file, copying compressed chunks verbatim, with the prototypes
summed from the per-image feature sums in image order. So an interrupted and resumed run,
or several processes, give the same numbers as one uninterrupted run, and the resume state
stays out of the artifact. The default HDF5 format (superblock 0) is kept on purpose:
newer ones mark a file "open for writing" and refuse to open it after a crash.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

import pixcli
from pixcli.artifacts import atomic_write
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError

FORMAT = "pixcli-pseudo-labels"
VERSION = 1
SCALE = 255
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


# ---------------------------------------------------------------------------- numbers


def grid_size(image_size: tuple[int, int], stride: int) -> tuple[int, int]:
    """Grid cells (h, w) of an (H, W) image at ``stride``: ``ceil(H / stride)``, ..."""
    return math.ceil(image_size[0] / stride), math.ceil(image_size[1] / stride)


def quantize_probs(probs: torch.Tensor) -> torch.Tensor:
    """``C x ...`` probabilities -> uint8 ``q`` with ``sum_c q = 255`` at every position.

    Largest-remainder rounding: ``floor(255 p)``, plus one for the classes with the largest
    remainders until the sum is 255 (ties by class index). See the module docstring. Runs
    on the input's device (a GPU sorts the remainders of a Cityscapes grid in well under a
    millisecond; a CPU takes tens of milliseconds).
    """
    num_classes = probs.shape[0]
    scaled = probs.double().clamp(0, 1) * SCALE
    base = scaled.floor()
    missing = (SCALE - base.sum(0, keepdim=True)).round().clamp(0, num_classes)
    order = (scaled - base).argsort(dim=0, descending=True, stable=True)
    place = torch.arange(num_classes, device=probs.device).view(-1, *[1] * (probs.dim() - 1))
    return base.scatter_add_(0, order, (place < missing).double()).to(torch.uint8)


def quantize_unit(values: torch.Tensor) -> torch.Tensor:
    """Values in [0, 1] -> uint8 ``round(255 v)``."""
    return (values.double().clamp(0, 1) * SCALE).round().to(torch.uint8)


def dequantize_probs(q: np.ndarray) -> np.ndarray:
    """uint8 ``C x ...`` -> float32 distributions ``q / sum_c q`` (all-zero columns stay 0)."""
    q = q.astype(np.float32)
    return q / np.maximum(q.sum(axis=0, keepdims=True), 1.0)


def crop_resized(
    maps: torch.Tensor,
    size: tuple[int, int],
    top: int,
    left: int,
    crop: tuple[int, int],
    flip: bool = False,
) -> torch.Tensor:
    """``maps`` (``K x h x w``) bilinearly resized to ``size`` = (H, W), then the ``crop`` =
    (ch, cw) window at (``top``, ``left``), mirrored if ``flip``; zero outside (H, W).

    Equals ``F.interpolate(mode="bilinear", align_corners=False)`` followed by slicing, but
    samples only the window (a Cityscapes image's 19 classes at full size are 160 MB).
    """
    big_h, big_w = size
    rows = torch.arange(top, top + crop[0], dtype=torch.float64, device=maps.device)
    cols = torch.arange(left, left + crop[1], dtype=torch.float64, device=maps.device)
    # interpolate's source row (y + 0.5) * h / H - 0.5 is grid_sample's (y + 0.5) * 2 / H - 1
    gy, gx = (rows + 0.5) * 2 / big_h - 1, (cols + 0.5) * 2 / big_w - 1
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1).float()
    out = torch.nn.functional.grid_sample(
        maps[None].float(), grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )[0]
    inside_rows, inside_cols = (rows >= 0) & (rows < big_h), (cols >= 0) & (cols < big_w)
    out = out * (inside_rows[:, None] & inside_cols[None, :]).to(out.dtype)
    return out.flip(-1) if flip else out


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
            checkpoint=_str(a["checkpoint"]),
            dataset=_str(a["dataset"]),
            split=_str(a["split"]),
            dataset_fingerprint=_str(a["dataset_fingerprint"]),
            settings=_str(a["settings"]),
        )


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _strs(values: Any) -> list[str]:
    return [_str(v) for v in np.asarray(values).reshape(-1)]


# ---------------------------------------------------------------------------- opening


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def open_h5(path: Path, mode: str = "r") -> h5py.File:
    """Open an existing pseudo.h5 or work file; unreadable or foreign files are one-line
    UserErrors."""
    if not path.is_file():
        raise UserError(f"{path}: pseudo-label file not found")
    try:
        fh = h5py.File(path, mode)
    except OSError as exc:
        hint = "; on file systems without locks set HDF5_USE_FILE_LOCKING=FALSE"
        raise UserError(
            f"{path}: not a readable HDF5 file, truncated or damaged ({_first_line(exc)})"
            + (hint if "lock" in str(exc) else "")
        ) from None
    problem = None
    if _str(fh.attrs.get("format", "")) != FORMAT:
        problem = f"not a pixcli pseudo-label file (no format={FORMAT!r} attribute)"
    elif int(fh.attrs.get("version", 0)) > VERSION:
        problem = f"pseudo-label format {fh.attrs['version']} is newer than this pixcli"
    else:
        missing = [k for k in ("names", "image_size", *CHUNKED, "prototypes") if k not in fh]
        if missing:
            problem = f"damaged pseudo-label file (lacks {', '.join(missing)})"
    if problem:
        fh.close()
        raise UserError(f"{path}: {problem}")
    return fh


def _read(path: Path, what: str, read: Callable[[], Any]) -> Any:
    """Run ``read()``; an HDF5 read error (bad checksum, cut-off file) becomes a UserError."""
    try:
        return read()
    except (OSError, RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"{path}: {what} is unreadable, the file is damaged ({_first_line(exc)}); "
            "delete it and run pixcli pseudolabel again"
        ) from None


# ---------------------------------------------------------------------------- layout


def _layout(fh: h5py.File, header: Header, sizes: np.ndarray, work: bool) -> None:
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
            "compression": f"gzip level {GZIP_LEVEL} + fletcher32, one image per chunk",
            "ignore_index": IGNORE_INDEX,
        }
    )
    fh.create_dataset("names", data=np.array(header.names, dtype=text))
    fh.create_dataset("image_size", data=sizes)
    fh.create_dataset("grid_size", data=grids)
    chunked = {
        "soft": ((n, c, hmax, wmax), np.uint8, 0),
        "hard": ((n, hmax, wmax), np.uint8, IGNORE_INDEX),
        "confidence": ((n, hmax, wmax), np.uint8, 0),
    }
    if work:
        chunked["feature_sums_per_image"] = ((n, c, d), np.float32, 0)
        fh.create_dataset("done", data=np.zeros(n, np.uint8))
    for name, (shape, dtype, fill) in chunked.items():
        fh.create_dataset(
            name, shape, dtype, chunks=(1, *shape[1:]), compression="gzip",
            compression_opts=GZIP_LEVEL, fletcher32=True, fillvalue=fill,
        )  # fmt: skip
    fh.create_dataset("class_counts_per_image", data=np.zeros((n, c), np.int32))
    fh.create_dataset("prototypes", data=np.zeros((c, d), np.float32))
    fh.create_dataset("class_counts", data=np.zeros(c, np.int64))
    fh.create_dataset("class_distribution", data=np.zeros(c, np.float64))
    for name in fh:
        fh[name].attrs["description"] = DESCRIPTIONS[name]


def create_work_file(path: Path, header: Header, image_sizes: np.ndarray) -> None:
    """An empty work file with every dataset, created atomically (tmp file, then rename)."""

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            _layout(fh, header, image_sizes, work=True)

    atomic_write(path, write)


# ---------------------------------------------------------------------------- writing


@dataclass
class ImageRecord:
    """What is stored for one image, on its grid (``h x w``)."""

    probs: torch.Tensor  # C x h x w soft labels, summing to 1 over C
    hard: torch.Tensor  # h x w uint8, IGNORE_INDEX = ignored
    confidence: torch.Tensor  # h x w, max_c p
    feature_sums: torch.Tensor  # C x D, sum of normalised features per hard label
    class_counts: torch.Tensor  # C, cells per hard label


class PseudoLabelWriter:
    """Writes images into a work file; see the module docstring.

    ``PseudoLabelWriter.open(path, header, sizes)`` creates the work file or checks that the
    existing one was made from the same inputs (else a UserError) and reads its ``done``
    mask. The HDF5 file is open only inside ``with writer:`` (so DataLoader workers forked
    before never hold it). Written images are committed (flushed, then marked done) at
    most every ``COMMIT_SECONDS`` and when the ``with`` block ends, also by an exception:
    a crash loses at most that much work.
    """

    COMMIT_SECONDS = 1.0

    def __init__(self, path: Path, header: Header) -> None:
        self.path = path
        self.header = header
        self.fh: h5py.File | None = None
        self._pending: list[int] = []
        self._committed = 0.0
        with open_h5(path) as fh:
            if "done" not in fh:
                raise UserError(f"{path}: a finished pseudo.h5, not a work file")
            problem = header.mismatch(_read(path, "the header", lambda: Header.from_file(fh)))
            if problem:
                raise UserError(
                    f"{path}: was {problem}; refusing to add to it (use another --out or delete it)"
                )
            self.image_sizes = fh["image_size"][()]
            self.grids = fh["grid_size"][()]
            self.pad = tuple(fh["soft"].shape[2:])
            self.done = _read(path, "the done mask", lambda: _verified_done(fh))

    @classmethod
    def open(
        cls, path: Path, header: Header, image_sizes: Callable[[], np.ndarray]
    ) -> PseudoLabelWriter:
        """Resume the work file ``path``, or create it with ``image_sizes()`` ((N, 2))."""
        if not path.exists():
            create_work_file(path, header, image_sizes())
        return cls(path, header)

    def __enter__(self) -> PseudoLabelWriter:
        self.fh = open_h5(self.path, "r+")
        self._ds = {name: self.fh[name] for name in (*WORK_CHUNKED, "class_counts_per_image")}
        self._committed = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fh is not None:
            self.commit()
            self.fh.close()  # flushes the done marks of the last commit
            self.fh = None

    def write(self, i: int, record: ImageRecord) -> None:
        """Store image ``i``'s rows; they count as done once committed."""
        if self.fh is None:
            raise RuntimeError("PseudoLabelWriter.write outside 'with'")
        h, w = (int(v) for v in self.grids[i])
        if tuple(record.probs.shape[-2:]) != (h, w):
            raise ValueError(f"image {i}: grid {tuple(record.probs.shape[-2:])}, expected {h, w}")
        rows = {
            "soft": self._pad(quantize_probs(record.probs).cpu(), 0),
            "hard": self._pad(record.hard.cpu(), IGNORE_INDEX),
            "confidence": self._pad(quantize_unit(record.confidence).cpu(), 0),
            "feature_sums_per_image": record.feature_sums.cpu().float().numpy(),
            "class_counts_per_image": record.class_counts.cpu().numpy(),
        }
        with self._write_errors():
            for name, value in rows.items():
                self._ds[name][i] = value
        self._pending.append(i)
        if time.monotonic() - self._committed >= self.COMMIT_SECONDS:
            self.commit()

    def commit(self) -> None:
        """Flush the rows written so far, then mark their images done (those marks reach
        the disk with the next flush at the latest)."""
        if self.fh is None or not self._pending:
            return
        pending = sorted(self._pending)
        with self._write_errors():
            self.fh.flush()
            self.fh["done"][pending] = 1
        self.done[pending] = 1
        self._pending.clear()
        self._committed = time.monotonic()

    @contextmanager
    def _write_errors(self) -> Iterator[None]:
        """A failed write (a full disk, a lost network drive) is the user's to fix."""
        try:
            yield
        except OSError as exc:
            raise UserError(
                f"{self.path}: cannot write ({_first_line(exc)}); fix that and rerun the same "
                "command to resume"
            ) from None

    def _pad(self, rows: torch.Tensor, fill: int) -> np.ndarray:
        out = np.full((*rows.shape[:-2], *self.pad), fill, np.uint8)
        out[..., : rows.shape[-2], : rows.shape[-1]] = rows.numpy()
        return out


def _verified_done(fh: h5py.File) -> np.ndarray:
    """The done mask, minus images whose chunks did not reach the disk."""
    done = fh["done"][()].astype(np.uint8)
    for i in np.flatnonzero(done):
        for name in WORK_CHUNKED:
            coord = (int(i),) + (0,) * (fh[name].ndim - 1)
            if fh[name].id.get_chunk_info_by_coord(coord).byte_offset is None:
                done[i] = 0
                break
    return done


# ---------------------------------------------------------------------------- merging


class _WorkFiles:
    """The work files of one run, open for reading; ``owner[i]`` is the one holding image i
    (every image must be done in one of them)."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)
        self.files: list[h5py.File] = []

    def __enter__(self) -> _WorkFiles:
        try:
            for path in self.paths:
                self.files.append(open_h5(path))
            self.owner = np.full(len(self.files[0]["names"]), -1)
            for k, fh in enumerate(self.files):
                self.owner[fh["done"][()] == 1] = k
        except BaseException:
            self.__exit__()
            raise
        if (self.owner < 0).any():
            self.__exit__()
            missing = int((self.owner < 0).sum())
            raise RuntimeError(f"{self.paths[0].parent}: {missing} images are in no work file")
        return self

    def __exit__(self, *exc: object) -> None:
        for fh in self.files:
            fh.close()

    def rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of dataset ``name``, each from the work file holding it."""
        out: np.ndarray | None = None
        for k, (fh, path) in enumerate(zip(self.files, self.paths, strict=True)):
            mine = self.owner[start:stop] == k
            if mine.any():
                block = _read(
                    path, f"images {start}-{stop - 1}", lambda fh=fh: fh[name][start:stop]
                )
                out = np.zeros_like(block) if out is None else out
                out[mine] = block[mine]
        assert out is not None
        return out


def image_stats(
    work_files: Sequence[Path], block: int = 256
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Per image, in image order: (feature sums ``C x D``, class counts ``C``) from the work
    files, read ``block`` images at a time."""
    with _WorkFiles(work_files) as wf:
        for start in range(0, len(wf.owner), block):
            stop = min(start + block, len(wf.owner))
            sums = wf.rows("feature_sums_per_image", start, stop)
            counts = wf.rows("class_counts_per_image", start, stop)
            for j in range(stop - start):
                yield torch.from_numpy(sums[j]), torch.from_numpy(counts[j])


def merge(
    work_files: Sequence[Path],
    out: Path,
    header: Header,
    prototypes: torch.Tensor,
    class_counts: torch.Tensor,
    distribution: torch.Tensor,
) -> None:
    """Write the finished ``out`` (pseudo.h5) atomically: every image's chunks copied
    verbatim from the work file holding it, plus prototypes (Eq. 7), counts and the class
    distribution (Eq. 10)."""
    with _WorkFiles(work_files) as wf:
        for fh, path in zip(wf.files, wf.paths, strict=True):
            problem = header.mismatch(Header.from_file(fh))
            if problem:
                raise UserError(f"{path}: work file was {problem}")

        def write(tmp: Path) -> None:
            with h5py.File(tmp, "w") as dst:
                _layout(dst, header, wf.files[0]["image_size"][()], work=False)
                for name in CHUNKED:
                    src = [fh[name].id for fh in wf.files]
                    _copy_chunks(src, dst[name].id, wf.owner, wf.paths)
                n = len(wf.owner)
                dst["class_counts_per_image"][...] = wf.rows("class_counts_per_image", 0, n)
                dst["prototypes"][...] = prototypes.cpu().float().numpy()
                dst["class_counts"][...] = class_counts.cpu().numpy()
                dst["class_distribution"][...] = distribution.cpu().double().numpy()
                dst.attrs["complete"] = 1

        atomic_write(out, write)


def _copy_chunks(
    src: list[h5py.h5d.DatasetID], dst: h5py.h5d.DatasetID, owner: np.ndarray, paths: list[Path]
) -> None:
    """Image i's chunk from ``src[owner[i]]`` to ``dst``, compressed bytes as they are."""
    rank = dst.rank
    for i, k in enumerate(owner):
        coord = (i,) + (0,) * (rank - 1)
        mask, data = _read(paths[k], f"image {i}", lambda k=k, c=coord: src[k].read_direct_chunk(c))
        dst.write_direct_chunk(coord, data, mask)


# ---------------------------------------------------------------------------- reading


class PseudoLabelFile:
    """Read access to a finished pseudo.h5, for training (``adapt``) and inspection.

    Opening checks the file and reads the small arrays; the HDF5 handle itself is opened
    lazily on first use, and again in every process (safe in DataLoader workers: the
    object pickles without its handle). Per-image reads of a damaged file raise UserError.

    Example::

        labels = PseudoLabelFile(Path("runs/pseudo/pseudo.h5"))
        i = labels.index("aachen/aachen_000000_000019")
        p = labels.soft_crop(i, size=(768, 1536), top=100, left=200, crop=(512, 512), flip=True)
        p.shape  # (19, 512, 512), float32, each pixel's row sums to 1
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fh: h5py.File | None = None
        self._pid = -1
        with open_h5(self.path) as fh:
            if not int(fh.attrs.get("complete", 0)):
                done = int(fh["done"][()].sum()) if "done" in fh else 0
                raise UserError(
                    f"{self.path}: an unfinished work file of pixcli pseudolabel ({done} of "
                    f"{len(fh['names'])} images written); rerun that command to finish it"
                )
            self.header = _read(self.path, "the header", lambda: Header.from_file(fh))
            self.image_sizes = fh["image_size"][()]
            self.grid_sizes = fh["grid_size"][()]
            self.class_counts_per_image = fh["class_counts_per_image"][()]
            self.prototypes = fh["prototypes"][()]
            self.class_counts = fh["class_counts"][()]
            self.class_distribution = fh["class_distribution"][()]
        self._index = {name: i for i, name in enumerate(self.header.names)}

    @property
    def classes(self) -> tuple[str, ...]:
        return self.header.classes

    @property
    def names(self) -> tuple[str, ...]:
        return self.header.names

    @property
    def output_stride(self) -> int:
        return self.header.output_stride

    def __len__(self) -> int:
        return len(self.header.names)

    def index(self, name: str) -> int:
        """Position of the image called ``name`` (a SegDataset item name)."""
        try:
            return self._index[name]
        except KeyError:
            raise UserError(f"{self.path}: has no pseudo labels for image {name!r}") from None

    def _h5(self) -> h5py.File:
        if self._fh is None or self._pid != os.getpid():
            self._fh = open_h5(self.path)
            self._pid = os.getpid()
        return self._fh

    def _rows(self, name: str, i: int) -> np.ndarray:
        h, w = (int(v) for v in self.grid_sizes[i])
        ds = self._h5()[name]
        rows = _read(self.path, f"{name} of image {i} ({self.names[i]})", lambda: ds[i])
        return rows[..., :h, :w]

    def soft(self, i: int) -> np.ndarray:
        """Image ``i``'s soft labels ``C x h x w`` float32 on its grid, summing to 1."""
        return dequantize_probs(self._rows("soft", i))

    def hard(self, i: int) -> np.ndarray:
        """Image ``i``'s hard labels ``h x w`` uint8 (255 = ignored)."""
        return self._rows("hard", i)

    def confidence(self, i: int) -> np.ndarray:
        """Image ``i``'s confidence ``h x w`` float32 in [0, 1]."""
        return self._rows("confidence", i).astype(np.float32) / SCALE

    def soft_crop(
        self,
        i: int,
        size: tuple[int, int],
        top: int = 0,
        left: int = 0,
        crop: tuple[int, int] | None = None,
        flip: bool = False,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Soft labels of image ``i`` as a training crop sees them, ``C x ch x cw`` float32.

        The image was resized to ``size`` = (H', W'), a ``crop`` = (ch, cw) window (default:
        all of it) taken at (``top``, ``left``), then mirrored if ``flip``. The result equals
        bilinearly resizing the soft labels to (H', W') (align_corners=False) and cropping,
        computed for the window only, on ``device``. Window pixels outside the resized image
        (a padded crop) get all-zero rows, i.e. no label; elsewhere rows sum to 1.
        """
        soft = torch.from_numpy(self.soft(i)).to(device)
        return crop_resized(soft, size, top, left, crop or size, flip)

    def soft_resized(
        self, i: int, size: tuple[int, int] | None = None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Soft labels resized to ``size`` (default: the image's own), ``C x H x W``."""
        target = size or (int(self.image_sizes[i][0]), int(self.image_sizes[i][1]))
        return self.soft_crop(i, tuple(target), device=device)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __enter__(self) -> PseudoLabelFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fh"], state["_pid"] = None, -1
        return state


# ---------------------------------------------------------------------------- summary


def summary(path: Path) -> dict[str, Any]:
    """What ``pixcli show`` prints about a pseudo.h5 or a work file."""
    with open_h5(path) as fh:
        header = _read(path, "the header", lambda: Header.from_file(fh))
        complete = bool(int(fh.attrs.get("complete", 0)))
        n = len(header.names)
        done = int(fh["done"][()].sum()) if "done" in fh else n
        dist = fh["class_distribution"][()]
        counts = fh["class_counts"][()]
        version = int(fh.attrs["version"])
        written_by = _str(fh.attrs.get("pixcli_version", "?"))
        datasets = ", ".join(
            f"{k} {'str' if v.dtype.kind == 'O' else v.dtype} {'x'.join(map(str, v.shape))}"
            for k, v in fh.items()
        )
    size = path.stat().st_size
    order = [c for c in np.argsort(-dist, kind="stable") if dist[c] > 0]
    return {
        "format": f"{FORMAT} v{version} (written by pixcli {written_by})",
        "complete": "yes" if complete else f"no, a work file: {done} of {n} images written",
        "images": f"{n} of {header.dataset} ({header.split}), "
        f"fingerprint {header.dataset_fingerprint}",
        "checkpoint": header.checkpoint,
        "classes": f"{len(header.classes)}: {', '.join(header.classes)}",
        "output stride": str(header.output_stride),
        "settings": json.loads(header.settings),
        "size on disk": f"{_size(size)}, {_size(size / max(done, 1))} per image",
        "prototypes": f"{len(header.classes)} x {header.feature_dim} float32, "
        f"{int((counts > 0).sum())} classes with pixels",
        "class distribution": ", ".join(f"{header.classes[c]} {100 * dist[c]:.1f}%" for c in order)
        if complete
        else "computed at the end",
        "datasets": datasets,
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
