"""Dataset readers: ``KIND:PATH`` on the command line -> :class:`SegDataset`.

Layouts (``ROOT`` is PATH, ``{split}`` the split asked for):

- ``gta5``: ``ROOT/images/*.png`` and ``ROOT/labels/*.png`` (same file names, Cityscapes
  labelIds). No splits.
- ``synthia`` (RAND-CITYSCAPES): ``ROOT/RGB/*.png`` and ``ROOT/GT/LABELS/*.png``, 16-bit
  three-channel labels with the class id in the first channel. No splits.
- ``cityscapes``: ``ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
  ``ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png``; items are named ``city/stem``.
- ``folder``: ``ROOT/classes.txt`` (one class per line), ``ROOT/images/{split}/NAME.{png,jpg,
  jpeg}`` and ``ROOT/labels/{split}/NAME.png`` holding train ids (255 = ignore).

gta5, synthia and cityscapes use the 19 Cityscapes classes; their on-disk ids are mapped to
train ids (unmapped ids become 255). gta5 and synthia always need labels. For cityscapes and
folder a missing label *directory* means an unlabelled dataset (e.g. an adaptation target);
a label directory with some labels missing is an error naming the first missing file.

Every reader error is a :class:`~pixcli.errors.UserError` naming the path and the problem.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pixcli.data.png import read_png
from pixcli.data.taxonomy import (
    CITYSCAPES,
    CITYSCAPES_LABELID_TO_TRAINID,
    IGNORE_INDEX,
    SYNTHIA_ID_TO_TRAINID,
    Taxonomy,
    lookup_table,
    taxonomy_from_file,
)
from pixcli.errors import UserError

KINDS = ("gta5", "synthia", "cityscapes", "folder")

LAYOUTS: dict[str, str] = {
    "gta5": "ROOT/images/*.png and ROOT/labels/*.png",
    "synthia": "ROOT/RGB/*.png and ROOT/GT/LABELS/*.png",
    "cityscapes": "ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and "
    "ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png",
    "folder": "ROOT/classes.txt, ROOT/images/SPLIT/*.{png,jpg,jpeg} and ROOT/labels/SPLIT/*.png",
}

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Item = tuple[Path, Path | None, str]


def parse_dataset_spec(spec: str) -> tuple[str, Path]:
    """Split ``"KIND:PATH"`` into the kind and the path; UserError listing the kinds."""
    kind, sep, path = spec.partition(":")
    if not sep or kind not in KINDS or not path:
        raise UserError(f"dataset {spec!r}: expected KIND:PATH with KIND one of {', '.join(KINDS)}")
    return kind, Path(path).expanduser()


# --------------------------------------------------------------------------- file reading


def _load(path: Path, what: str, convert: Callable[[Image.Image], np.ndarray]) -> np.ndarray:
    """Open an image file with Pillow and convert it; unreadable files are UserErrors."""
    try:
        with Image.open(path) as img:
            img.load()
            return convert(img)
    except FileNotFoundError as exc:
        raise UserError(f"{path}: {what} file not found") from exc
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        raise UserError(f"{path}: cannot read {what} ({exc})") from exc


def read_rgb(path: Path) -> np.ndarray:
    """An image file as (H, W, 3) uint8 RGB (gray, palette and RGBA inputs are converted)."""
    return _load(path, "image", lambda img: np.array(img.convert("RGB"), dtype=np.uint8))


def read_index_png(path: Path) -> np.ndarray:
    """A single-channel label image (gray or palette indices) as a 2-D integer array."""

    def ids(img: Image.Image) -> np.ndarray:
        if img.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
            raise UserError(f"{path}: label image has mode {img.mode}; expected one channel of ids")
        return np.asarray(img)

    return _load(path, "label", ids)


@cache
def _table(name: str) -> np.ndarray:
    mapping = {"labelids": CITYSCAPES_LABELID_TO_TRAINID, "synthia": SYNTHIA_ID_TO_TRAINID}
    return lookup_table(mapping[name])


def _map_ids(ids: np.ndarray, table: str) -> np.ndarray:
    """On-disk ids -> train ids; ids the table does not know become ``IGNORE_INDEX``."""
    lut = _table(table)
    return lut[np.clip(ids.astype(np.int64), 0, lut.size - 1)]


def _labelid_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """Cityscapes/GTA5 labelIds -> train ids."""
    return _map_ids(read_index_png(path), "labelids")


def _synthia_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """SYNTHIA 16-bit labels: class id in the first channel -> train ids."""
    ids = read_png(path)
    return _map_ids(ids if ids.ndim == 2 else ids[:, :, 0], "synthia")


def _trainid_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """User labels already in train ids: check every id is a class or 255."""
    label = read_index_png(path)
    outside = (label < 0) | ((label >= taxonomy.num_classes) & (label != IGNORE_INDEX))
    bad = np.unique(label[outside])
    if bad.size:
        shown = ", ".join(str(int(v)) for v in bad[:5])
        raise UserError(
            f"{path}: label ids {shown} outside the {taxonomy.num_classes} classes "
            f"(0..{taxonomy.num_classes - 1}, 255 = ignore)"
        )
    return label.astype(np.uint8)


LABEL_READERS: dict[str, Callable[[Path, Taxonomy], np.ndarray]] = {
    "gta5": _labelid_label,
    "synthia": _synthia_label,
    "cityscapes": _labelid_label,
    "folder": _trainid_label,
}


# ------------------------------------------------------------------------------ dataset


@dataclass
class SegDataset:
    """Image/label pairs of one dataset split, in sorted (deterministic) name order.

    Items are ``(image path, label path or None, name)``. Indexing returns
    ``(image HxWx3 uint8 RGB, label HxW uint8 train ids or None, name)``. Plain data:
    picklable for DataLoader workers.
    """

    kind: str
    root: Path
    split: str
    taxonomy: Taxonomy
    items: list[Item] = field(default_factory=list)

    @property
    def has_labels(self) -> bool:
        """True when every item has a label file."""
        return bool(self.items) and all(label is not None for _, label, _ in self.items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray | None, str]:
        image, label = self.read_image(i), self.read_label(i)
        if label is not None and label.shape != image.shape[:2]:
            img_path, label_path, _ = self.items[i]
            raise UserError(
                f"{label_path}: label is {label.shape[1]}x{label.shape[0]} but image "
                f"{img_path} is {image.shape[1]}x{image.shape[0]}"
            )
        return image, label, self.items[i][2]

    def read_image(self, i: int) -> np.ndarray:
        """Item ``i``'s image as (H, W, 3) uint8 RGB."""
        return read_rgb(self.items[i][0])

    def image_size(self, i: int) -> tuple[int, int]:
        """Item ``i``'s image size (h, w) from the file header, without decoding pixels."""
        path = self.items[i][0]
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except FileNotFoundError as exc:
            raise UserError(f"{path}: image file not found") from exc
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise UserError(f"{path}: cannot read image ({exc})") from exc

    def read_label(self, i: int) -> np.ndarray | None:
        """Item ``i``'s label as (H, W) uint8 train ids (255 = ignore), or None."""
        path = self.items[i][1]
        if path is None:
            return None
        return LABEL_READERS[self.kind](path, self.taxonomy)

    def fingerprint(self) -> str:
        """Short sha256 of kind, split, classes, item names and file sizes (no decoding)."""
        h = hashlib.sha256()
        h.update(f"{self.kind}\0{self.split}\0{'|'.join(self.taxonomy.classes)}\0".encode())
        for image, label, name in sorted(self.items, key=lambda item: item[2]):
            sizes = [_file_size(image), _file_size(label) if label is not None else -1]
            h.update(f"{name}\0{sizes[0]}\0{sizes[1]}\n".encode())
        return h.hexdigest()[:16]

    def subset(self, indices: Sequence[int]) -> SegDataset:
        """The same dataset restricted to ``indices`` (in the given order)."""
        return replace(self, items=[self.items[int(i)] for i in indices])

    def spec(self) -> str:
        """The ``KIND:PATH`` string this dataset was opened from."""
        return f"{self.kind}:{self.root}"


def _file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError as exc:
        raise UserError(f"{path}: file disappeared or unreadable ({exc.strerror})") from exc


# ------------------------------------------------------------------------------ layouts


def _require_dir(path: Path, kind: str) -> Path:
    if not path.is_dir():
        raise UserError(f"{path}: directory not found; a {kind} dataset needs {LAYOUTS[kind]}")
    return path


def _images(directory: Path, suffixes: tuple[str, ...], pattern: str = "*") -> list[Path]:
    return sorted(
        p for p in directory.glob(pattern) if p.is_file() and p.suffix.lower() in suffixes
    )


def _pair(
    images: list[tuple[Path, str]],
    label_of: Callable[[Path, str], Path],
    label_dir: Path,
    optional: bool,
) -> list[Item]:
    """Attach label paths; an absent ``label_dir`` is an unlabelled dataset if optional."""
    if optional and not label_dir.is_dir():
        return [(image, None, name) for image, name in images]
    items: list[Item] = []
    for image, name in images:
        label = label_of(image, name)
        if not label.is_file():
            raise UserError(f"{label}: label file missing for image {image}")
        items.append((image, label, name))
    return items


def _scan_flat(root: Path, kind: str, image_dir: str, label_dir: str) -> list[Item]:
    """gta5 / synthia: one image directory and one label directory, same file names."""
    images = _require_dir(root / image_dir, kind)
    labels = _require_dir(root / label_dir, kind)
    found = [(p, p.stem) for p in _images(images, (".png",))]
    return _pair(found, lambda image, _: labels / image.name, labels, optional=False)


def _scan_cityscapes(root: Path, split: str) -> list[Item]:
    images = _require_dir(root / "leftImg8bit" / split, "cityscapes")
    labels = root / "gtFine" / split
    found = [
        (p, f"{p.parent.name}/{p.name[: -len('_leftImg8bit.png')]}")
        for p in _images(images, (".png",), "*/*_leftImg8bit.png")
    ]
    return _pair(
        found, lambda _, name: labels / f"{name}_gtFine_labelIds.png", labels, optional=True
    )


def _scan_folder(root: Path, split: str) -> list[Item]:
    images = _require_dir(root / "images" / split, "folder")
    labels = root / "labels" / split
    found = [(p, p.stem) for p in _images(images, IMAGE_SUFFIXES)]
    names = [name for _, name in found]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{images}: several images named {dup!r} (different extensions)")
    return _pair(found, lambda _, name: labels / f"{name}.png", labels, optional=True)


def _scan(kind: str, root: Path, split: str) -> list[Item]:
    if kind == "gta5":
        return _scan_flat(root, kind, "images", "labels")
    if kind == "synthia":
        return _scan_flat(root, kind, "RGB", "GT/LABELS")
    if kind == "cityscapes":
        return _scan_cityscapes(root, split)
    return _scan_folder(root, split)


def open_dataset(spec: str, split: str = "train", require_labels: bool = False) -> SegDataset:
    """Open ``KIND:PATH`` (split ignored for gta5/synthia); checks layout, not pixels."""
    kind, root = parse_dataset_spec(spec)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (a {kind} dataset needs {LAYOUTS[kind]})")
    taxonomy = taxonomy_from_file(root / "classes.txt") if kind == "folder" else CITYSCAPES
    items = sorted(_scan(kind, root, split), key=lambda item: item[2])
    if not items:
        raise UserError(f"{root}: no images found for split {split!r}; expected {LAYOUTS[kind]}")
    ds = SegDataset(kind, root, split, taxonomy, items)
    if require_labels and not ds.has_labels:
        raise UserError(f"{root}: dataset has no labels for split {split!r}, but they are needed")
    return ds
