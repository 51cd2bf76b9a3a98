"""Tiny dataset writers for tests: every layout :mod:`pixcli.data.readers` reads.

Pixel content is deterministic: image ``i`` is :func:`pattern_image` ``(i, size)`` and its
label holds :func:`pattern_ids` ``(i, size, ids)``, so a test can recompute what it
expects. ``i`` counts from 0 in sorted name order within each dataset (for cityscapes:
over cities in sorted order, then files).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from pixcli.data.png import write_png as write_png_any

Size = tuple[int, int]  # (h, w)

# On-disk ids with their expected train ids (independent of pixcli's tables on purpose).
LABELID_EXPECTED = {7: 0, 26: 13, 0: 255, 33: 18, 24: 11}
SYNTHIA_EXPECTED = {3: 0, 8: 13, 259: 255, 0: 255, 11: 18}  # 259: low byte 3, high byte 1


def pattern_image(i: int, size: Size = (8, 12)) -> np.ndarray:
    """A deterministic (h, w, 3) uint8 RGB image, different for every ``i``."""
    h, w = size
    rows, cols = np.indices((h, w))
    return np.stack(
        [(rows * 17 + i * 40) % 256, (cols * 13 + i * 7) % 256, (rows * cols + i * 90) % 256],
        axis=-1,
    ).astype(np.uint8)


def pattern_ids(i: int, size: Size, ids: Sequence[int]) -> np.ndarray:
    """A deterministic (h, w) int64 map cycling through ``ids`` (shifted by ``i``)."""
    rows, cols = np.indices(size)
    return np.asarray(ids, dtype=np.int64)[(rows + 2 * cols + i) % len(ids)]


def map_ids(ids: np.ndarray, expected: dict[int, int]) -> np.ndarray:
    """Apply an expected id -> train id mapping (ids missing from it become 255)."""
    out = np.full(ids.shape, 255, dtype=np.uint8)
    for src, dst in expected.items():
        out[ids == src] = dst
    return out


def write_png(path: Path, array: np.ndarray, palette: bool = False) -> Path:
    """Write an 8-bit image (gray, RGB or RGBA) with Pillow, creating parent directories.

    ``palette=True`` stores a 2-D array as palette indices (mode "P", as GTA5 labels are).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(np.asarray(array, dtype=np.uint8))
    if palette:
        img.putpalette([v for k in range(256) for v in ((k * 37) % 256, k, 255 - k)])
    img.save(path)
    return path


def write_png16(
    path: Path, array: np.ndarray, filters: int | Sequence[int] = (0, 1, 2, 3, 4)
) -> Path:
    """Write a 16-bit PNG (gray or RGB) keeping all 16 bits; rows cycle through ``filters``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png_any(path, np.asarray(array, dtype=np.uint16), filters)
    return path


def make_gta5(
    root: Path, n: int = 3, size: Size = (8, 12), ids: Sequence[int] = tuple(LABELID_EXPECTED)
) -> Path:
    """``root/images/0000i.png`` and ``root/labels/0000i.png`` (labelIds), i = 1..n."""
    for i in range(n):
        write_png(root / "images" / f"{i + 1:05d}.png", pattern_image(i, size))
        write_png(root / "labels" / f"{i + 1:05d}.png", pattern_ids(i, size, ids), palette=True)
    return root


def synthia_label(i: int, size: Size, ids: Sequence[int]) -> np.ndarray:
    """A SYNTHIA-style (h, w, 3) uint16 label: class id, then instance-like values > 255."""
    cls = pattern_ids(i, size, ids)
    return np.stack([cls, cls * 1000 + 7, np.full(size, 40000 + i)], axis=-1).astype(np.uint16)


def make_synthia(
    root: Path, n: int = 3, size: Size = (8, 12), ids: Sequence[int] = tuple(SYNTHIA_EXPECTED)
) -> Path:
    """``root/RGB/000000i.png`` and 16-bit ``root/GT/LABELS/000000i.png``, i = 0..n-1."""
    for i in range(n):
        write_png(root / "RGB" / f"{i:07d}.png", pattern_image(i, size))
        write_png16(root / "GT" / "LABELS" / f"{i:07d}.png", synthia_label(i, size, ids))
    return root


def make_cityscapes(
    root: Path,
    split: str = "train",
    cities: Sequence[str] = ("aachen", "bremen"),
    per_city: int = 2,
    size: Size = (8, 12),
    ids: Sequence[int] = tuple(LABELID_EXPECTED),
    labels: bool = True,
) -> Path:
    """``leftImg8bit/{split}/{city}/{city}_000000_00000j_leftImg8bit.png`` (+ gtFine labelIds)."""
    i = 0
    for city in sorted(cities):
        for j in range(per_city):
            stem = f"{city}_000000_{j:06d}"
            write_png(
                root / "leftImg8bit" / split / city / f"{stem}_leftImg8bit.png",
                pattern_image(i, size),
            )
            if labels:
                write_png(
                    root / "gtFine" / split / city / f"{stem}_gtFine_labelIds.png",
                    pattern_ids(i, size, ids),
                )
            i += 1
    return root


def make_folder(
    root: Path,
    split: str = "train",
    n: int = 3,
    classes: Sequence[str] = ("sky", "road", "car"),
    size: Size = (8, 12),
    labels: bool = True,
) -> Path:
    """``classes.txt``, ``images/{split}/img_i.png``, ``labels/{split}/img_i.png`` (train ids,
    cycling through every class and 255)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("".join(f"{c}\n" for c in classes))
    ids = [*range(len(classes)), 255]
    for i in range(n):
        write_png(root / "images" / split / f"img_{i}.png", pattern_image(i, size))
        if labels:
            write_png(root / "labels" / split / f"img_{i}.png", pattern_ids(i, size, ids))
    return root
