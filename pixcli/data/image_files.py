"""Arbitrary image files for prediction: finding them and reading them as 8-bit RGB.

``pixcli predict`` takes files, directories (searched recursively) and glob patterns, in any
mix of sizes and formats. Every image becomes ``(H, W, 3) uint8`` RGB (:func:`to_rgb`):

- 8-bit RGB as it is (read exactly as :func:`pixcli.data.readers.read_rgb` reads dataset
  images, so predictions equal ``pixcli eval``'s);
- greyscale repeated over the three channels; palette images expanded to their colours;
- the alpha channel of RGBA / grey+alpha dropped (the colour is kept as stored);
- 16-bit samples scaled to 8 bits, ``round(v / 257)`` (65535 -> 255). 16-bit PNG files are
  decoded with :func:`pixcli.data.png.read_png`: Pillow silently drops their precision (or
  returns zeros for three-channel ones).
"""

from __future__ import annotations

import glob
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pixcli.data.png import PNG_SIGNATURE, read_png
from pixcli.data.readers import read_rgb
from pixcli.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class ImageFile:
    """An input image and where its outputs go: ``relative`` (without suffix) under ``--out``."""

    path: Path
    relative: Path


def scale_16_to_8(array: np.ndarray) -> np.ndarray:
    """16-bit samples to 8 bits, rounded: ``round(v * 255 / 65535)``."""
    return ((array.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def to_rgb(image: np.ndarray | Image.Image) -> np.ndarray:
    """A PIL image or an array ``(H, W)``, ``(H, W, 1..4)`` of uint8 or uint16 as
    ``(H, W, 3) uint8`` RGB (see the module docstring); ValueError for anything else."""
    if isinstance(image, Image.Image):
        if image.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
            image = np.clip(np.asarray(image), 0, 65535).astype(np.uint16)
        else:
            return np.asarray(image.convert("RGB"), dtype=np.uint8)
    array = np.asarray(image)
    if array.dtype == np.uint16:
        array = scale_16_to_8(array)
    if array.dtype != np.uint8:
        raise ValueError(f"image array has dtype {array.dtype}; expected uint8 or uint16")
    if array.ndim == 3 and array.shape[2] in (1, 2):  # grey, grey + alpha
        array = array[:, :, 0]
    if array.ndim == 2:
        return np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] not in (3, 4):
        raise ValueError(f"image array has shape {array.shape}; expected (H, W) or (H, W, 3)")
    return np.ascontiguousarray(array[:, :, :3])


def _png_bit_depth(path: Path) -> int | None:
    """The bit depth in a PNG file's header, or None when ``path`` is not a PNG."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(25)
    except OSError:
        return None  # the reader below reports it
    if len(head) < 25 or not head.startswith(PNG_SIGNATURE) or head[12:16] != b"IHDR":
        return None
    return head[24]


def read_image(path: Path) -> np.ndarray:
    """Any image file as ``(H, W, 3) uint8`` RGB; an unreadable file is a UserError naming it.

    16-bit PNGs go through :func:`read_png` (scaled to 8 bits), everything else through
    :func:`read_rgb`, the dataset readers' function.
    """
    path = Path(path)
    if _png_bit_depth(path) == 16:
        return to_rgb(read_png(path))
    return read_rgb(path)


def _glob_root(pattern: str) -> Path:
    """The leading directories of ``pattern`` that hold no wildcard."""
    fixed = list(itertools.takewhile(lambda part: not glob.has_magic(part), Path(pattern).parts))
    return Path(*fixed) if fixed else Path(".")


def _expand(spec: str, exclude: Path | None) -> list[ImageFile]:
    """The images of one ``--images`` argument with their paths relative to its root."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [ImageFile(path, Path(path.stem))]
    if path.is_dir():
        root, found = path, [p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES]
    elif glob.has_magic(spec):
        root = _glob_root(str(path))
        found = [Path(p) for p in glob.glob(str(path), recursive=True)]
        found = [p for p in found if p.is_file()]
    else:
        raise UserError(f"--images {spec}: no such file or directory")
    if exclude is not None:
        found = [p for p in found if not p.resolve().is_relative_to(exclude)]
    if not found:
        raise UserError(
            f"--images {spec}: no images found (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return [ImageFile(p, p.relative_to(root).with_suffix("")) for p in sorted(found)]


def find_images(specs: Sequence[str], exclude: Path | None = None) -> list[ImageFile]:
    """The images named by ``specs`` (files, directories searched recursively, globs), each
    once, in the order given (sorted within a directory or glob). Files under ``exclude``
    (the output directory) are left out. Two images whose outputs would have the same name
    are a UserError naming both."""
    if not specs:
        raise UserError("--images is required (image files, directories or glob patterns)")
    skip = exclude.resolve() if exclude is not None else None
    seen: dict[Path, ImageFile] = {}
    outputs: dict[Path, ImageFile] = {}
    for spec in specs:
        for item in _expand(spec, skip):
            key = item.path.resolve()
            if key in seen:
                continue
            other = outputs.get(item.relative)
            if other is not None:
                raise UserError(
                    f"--images: {other.path} and {item.path} would both write "
                    f"{item.relative}_label.png; give them in separate runs or rename one"
                )
            seen[key] = outputs[item.relative] = item
    return list(seen.values())
