"""The reader side of pseudo.h5: :class:`PseudoLabelFile` (per-image soft and hard
labels, crops as training sees them) and :func:`summary` (what ``pixcli show`` prints).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from pixcli.errors import UserError
from pixcli.pseudo_labels.fileformat import FORMAT, Header, as_str, open_h5, read_or_fail
from pixcli.pseudo_labels.quantize import SCALE, crop_resized, dequantize_probs


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
            self.header = read_or_fail(self.path, "the header", lambda: Header.from_file(fh))
            small = read_small(self.path, fh)
        self.image_sizes = small["image_size"]
        self.grid_sizes = small["grid_size"]
        self.class_counts_per_image = small["class_counts_per_image"]
        self.prototypes = small["prototypes"]
        self.class_counts = small["class_counts"]
        self.class_distribution = small["class_distribution"]
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
        rows = read_or_fail(self.path, f"{name} of image {i} ({self.names[i]})", lambda: ds[i])
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


SMALL = (
    "image_size", "grid_size", "class_counts_per_image", "prototypes", "class_counts",
    "class_distribution",
)  # fmt: skip


def read_small(path: Path, fh: h5py.File) -> dict[str, np.ndarray]:
    """Every dataset but the per-image chunks, checksums verified (a damaged one is a
    UserError), refusing NaN or infinite prototypes and class distribution."""
    out = {name: read_or_fail(path, name, lambda name=name: fh[name][()]) for name in SMALL}
    for name in ("prototypes", "class_distribution"):
        if not np.isfinite(out[name]).all():
            raise UserError(
                f"{path}: {name} holds NaN or infinite values, the file is damaged; "
                "delete it and run pixcli pseudolabel again"
            )
    return out


# ---------------------------------------------------------------------------- summary


def summary(path: Path) -> dict[str, Any]:
    """What ``pixcli show`` prints about a pseudo.h5 or a work file."""
    with open_h5(path) as fh:
        header = read_or_fail(path, "the header", lambda: Header.from_file(fh))
        complete = bool(int(fh.attrs.get("complete", 0)))
        n = len(header.names)
        done = int(read_or_fail(path, "done", lambda: fh["done"][()]).sum()) if "done" in fh else n
        small = read_small(path, fh)
        dist, counts = small["class_distribution"], small["class_counts"]
        version = int(fh.attrs["version"])
        written_by = as_str(fh.attrs.get("pixcli_version", "?"))
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
        "checksums": "verified: attributes, names and small datasets (per-image chunks: "
        "Fletcher-32, checked as they are read)",
    }


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
