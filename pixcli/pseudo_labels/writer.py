"""The writer side of pseudo.h5: work files (one per process, resumable), the
:class:`PseudoLabelWriter` that fills one, and :func:`merge`, which builds the finished
pseudo.h5 from all of them. See "Writing, resuming, several processes" in
:mod:`pixcli.pseudo_labels`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import torch

from pixcli.artifacts import atomic_write
from pixcli.data.taxonomy import IGNORE_INDEX
from pixcli.errors import UserError
from pixcli.pseudo_labels.fileformat import (
    CHUNKED,
    WORK_CHUNKED,
    Header,
    create_layout,
    first_line,
    open_h5,
    read_or_fail,
    seal_header,
)
from pixcli.pseudo_labels.quantize import quantize_probs, quantize_unit

# ---------------------------------------------------------------------------- work files


def create_work_file(path: Path, header: Header, image_sizes: np.ndarray) -> None:
    """An empty work file with every dataset, created atomically (tmp file, then rename)."""

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as fh:
            create_layout(fh, header, image_sizes, work=True)

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
    """Writes images into a work file; see :mod:`pixcli.pseudo_labels`.

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
            problem = header.mismatch(
                read_or_fail(path, "the header", lambda: Header.from_file(fh))
            )
            if problem:
                raise UserError(
                    f"{path}: was {problem}; refusing to add to it (use another --out or delete it)"
                )
            self.image_sizes = fh["image_size"][()]
            self.grids = fh["grid_size"][()]
            self.pad = tuple(fh["soft"].shape[2:])
            self.done = read_or_fail(path, "the done mask", lambda: _verified_done(fh))

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
                f"{self.path}: cannot write ({first_line(exc)}); fix that and rerun the same "
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
                block = read_or_fail(
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
                create_layout(dst, header, wf.files[0]["image_size"][()], work=False)
                for name in CHUNKED:
                    src = [fh[name].id for fh in wf.files]
                    _copy_chunks(src, dst[name].id, wf.owner, wf.paths)
                n = len(wf.owner)
                dst["class_counts_per_image"][...] = wf.rows("class_counts_per_image", 0, n)
                dst["prototypes"][...] = prototypes.cpu().float().numpy()
                dst["class_counts"][...] = class_counts.cpu().numpy()
                dst["class_distribution"][...] = distribution.cpu().double().numpy()
                dst.attrs["complete"] = 1
                seal_header(dst)

        atomic_write(out, write)


def _copy_chunks(
    src: list[h5py.h5d.DatasetID], dst: h5py.h5d.DatasetID, owner: np.ndarray, paths: list[Path]
) -> None:
    """Image i's chunk from ``src[owner[i]]`` to ``dst``, compressed bytes as they are."""
    rank = dst.rank
    for i, k in enumerate(owner):
        coord = (i,) + (0,) * (rank - 1)
        mask, data = read_or_fail(
            paths[k], f"image {i}", lambda k=k, c=coord: src[k].read_direct_chunk(c)
        )
        dst.write_direct_chunk(coord, data, mask)
