"""Dataset readers: ``KIND:PATH`` on the command line -> :class:`SegDataset`.

Layouts (``ROOT`` is PATH, ``{split}`` the split asked for; ``**/`` means any depth of
subdirectories, ``{seq}`` one directory per recording):

- ``gta5``: ``ROOT/images/*.png`` and ``ROOT/labels/*.png`` (same file names, Cityscapes
  labelIds). No splits.
- ``synthia`` (RAND-CITYSCAPES): ``ROOT/RGB/*.png`` and ``ROOT/GT/LABELS/*.png``, 16-bit
  three-channel labels with the class id in the first channel. No splits.
- ``cityscapes``: ``ROOT/leftImg8bit/{split}/{city}/*_leftImg8bit.png`` and
  ``ROOT/gtFine/{split}/{city}/*_gtFine_labelIds.png`` (or, when that is absent,
  ``*_gtFine_labelTrainIds.png`` made by cityscapesScripts); items are named ``city/stem``.
- ``acdc``: ``ROOT/rgb_anon/{condition}/{split}/{seq}/*_rgb_anon.png`` and
  ``ROOT/gt/{condition}/{split}/{seq}/*_gt_labelTrainIds.png`` for the conditions of
  ``reader.conditions`` (default all four: fog, night, rain, snow); items are named
  ``condition/seq/stem``. The test split (no ``gt``) is unlabelled.
- ``darkzurich``: ``ROOT/rgb_anon/{split}/{time}/**/*_rgb_anon.png`` and
  ``ROOT/gt/{split}/{time}/**/*_gt_labelTrainIds.png`` for the times of day of
  ``reader.times_of_day`` (default night, the usual target); train (day, twilight, night)
  and test are unlabelled, val (night) is labelled. Items are named ``time/seq/stem``.
- ``bdd100k``: ``ROOT/images/10k/{split}/*.jpg`` and ``ROOT/labels/sem_seg/masks/{split}/*.png``
  (train ids); the test split is unlabelled.
- ``folder``: ``ROOT/classes.txt`` (one class per line), ``ROOT/images/{split}/**/NAME.{png,jpg,
  jpeg}`` and ``ROOT/labels/{split}/**/NAME{reader.label_suffix}`` (default ``.png``) holding
  train ids (255 = ignore); items are named by their path below ``images/{split}``.

All kinds but folder use the 19 Cityscapes classes; on-disk ids are mapped to train ids
(unmapped ids become 255); acdc, darkzurich, bdd100k and cityscapes ``labelTrainIds`` files
hold train ids already (checked to be 0..18 or 255). gta5 and synthia always need labels. For
the others a missing label *directory* means an unlabelled dataset (e.g. an adaptation
target); a label directory with some labels missing is an error naming the first missing
file and listing the first five unpaired images and label files.

Every reader error is a :class:`~pixcli.errors.UserError` naming the path and the problem.
"""

from __future__ import annotations

import hashlib
import sys
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

KINDS = ("gta5", "synthia", "cityscapes", "acdc", "darkzurich", "bdd100k", "folder")

LAYOUTS: dict[str, str] = {
    "gta5": "ROOT/images/*.png and ROOT/labels/*.png",
    "synthia": "ROOT/RGB/*.png and ROOT/GT/LABELS/*.png",
    "cityscapes": "ROOT/leftImg8bit/SPLIT/CITY/*_leftImg8bit.png and "
    "ROOT/gtFine/SPLIT/CITY/*_gtFine_labelIds.png (or *_gtFine_labelTrainIds.png)",
    "acdc": "ROOT/rgb_anon/CONDITION/SPLIT/SEQ/*_rgb_anon.png and "
    "ROOT/gt/CONDITION/SPLIT/SEQ/*_gt_labelTrainIds.png",
    "darkzurich": "ROOT/rgb_anon/SPLIT/TIME/SEQ/*_rgb_anon.png and "
    "ROOT/gt/SPLIT/TIME/SEQ/*_gt_labelTrainIds.png",
    "bdd100k": "ROOT/images/10k/SPLIT/*.jpg and ROOT/labels/sem_seg/masks/SPLIT/*.png",
    "folder": "ROOT/classes.txt, ROOT/images/SPLIT/**/*.{png,jpg,jpeg} and "
    "ROOT/labels/SPLIT/**/*.png",
}

ACDC_CONDITIONS = ("fog", "night", "rain", "snow")
DARKZURICH_TIMES = ("day", "twilight", "night")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")

Item = tuple[Path, Path | None, str]


@dataclass
class ReaderConfig:
    """Reader settings: the ``[reader]`` section of every stage (``--set reader.KEY=...``).

    Each setting concerns one kind and is ignored by the others.

    Attributes:
        conditions: ACDC conditions to read (``--set 'reader.conditions=["night"]'``).
        times_of_day: Dark Zurich times of day to read (train has all three, val and test
            only night; DAFormer/HRDA/MIC adapt to the night train images).
        label_suffix: folder: the label of ``images/SPLIT/a/NAME.jpg`` is
            ``labels/SPLIT/a/NAME{label_suffix}`` (e.g. ``_mask.png``).
    """

    conditions: list[str] = field(default_factory=lambda: list(ACDC_CONDITIONS))
    times_of_day: list[str] = field(default_factory=lambda: ["night"])
    label_suffix: str = ".png"

    def __post_init__(self) -> None:
        for key, value, known in (
            ("conditions", self.conditions, ACDC_CONDITIONS),
            ("times_of_day", self.times_of_day, DARKZURICH_TIMES),
        ):
            unknown = [v for v in value if v not in known]
            if unknown or not value or len(set(value)) != len(value):
                raise UserError(
                    f"reader.{key}: expected distinct values among {', '.join(known)}, "
                    f"got {list(value)}"
                )
        if not self.label_suffix or "/" in self.label_suffix:
            raise UserError(
                f"reader.label_suffix: expected a file name ending such as '.png' or "
                f"'_mask.png', got {self.label_suffix!r}"
            )


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


LABELID_COUNT = 34  # Cityscapes/GTA5 labelIds are 0..33 (void ones included)
_warned_label_dirs: set[Path] = set()


def _labelid_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """Cityscapes/GTA5 labelIds -> train ids. Ids outside 0..33 are not labelIds at all: they
    become ignore too, with a warning (once per folder and process) giving their share."""
    ids = read_index_png(path)
    unknown = ids >= LABELID_COUNT
    if unknown.any() and path.parent not in _warned_label_dirs:
        _warned_label_dirs.add(path.parent)
        print(
            f"warning: {path}: {100 * unknown.mean():.1f}% of pixels have label ids outside "
            f"the labelId table (0..{LABELID_COUNT - 1}, e.g. {int(ids[unknown][0])}); they "
            "are ignored (further files in this folder are not reported)",
            file=sys.stderr,
        )
    return _map_ids(ids, "labelids")


def _synthia_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """SYNTHIA 16-bit labels: class id in the first channel -> train ids."""
    ids = read_png(path)
    return _map_ids(ids if ids.ndim == 2 else ids[:, :, 0], "synthia")


def _trainid_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """Labels already in train ids: check every id is a class or 255."""
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


CITYSCAPES_TRAINID_SUFFIX = "_gtFine_labelTrainIds.png"


def _cityscapes_label(path: Path, taxonomy: Taxonomy) -> np.ndarray:
    """Cityscapes ``*_labelIds.png`` (mapped) or ``*_labelTrainIds.png`` (train ids)."""
    if path.name.endswith(CITYSCAPES_TRAINID_SUFFIX):
        return _trainid_label(path, taxonomy)
    return _labelid_label(path, taxonomy)


LABEL_READERS: dict[str, Callable[[Path, Taxonomy], np.ndarray]] = {
    "gta5": _labelid_label,
    "synthia": _synthia_label,
    "cityscapes": _cityscapes_label,
    "acdc": _trainid_label,
    "darkzurich": _trainid_label,
    "bdd100k": _trainid_label,
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


def _require_dir(path: Path, kind: str, found: str = "") -> Path:
    if not path.is_dir():
        raise UserError(
            f"{path}: directory not found; a {kind} dataset needs {LAYOUTS[kind]}{found}"
        )
    return path


def _find(directory: Path, pattern: str, suffixes: tuple[str, ...]) -> list[tuple[Path, str]]:
    """Files under ``directory`` matching ``pattern`` whose name ends with one of
    ``suffixes`` (case-insensitive), as ``(path, name)``; the name is the path relative to
    ``directory`` without the suffix. Two files with the same name are an error."""
    found: list[tuple[Path, str]] = []
    for path in sorted(directory.glob(pattern)):
        ending = next((s for s in suffixes if path.name.lower().endswith(s.lower())), None)
        if ending is not None and path.is_file():
            found.append((path, path.relative_to(directory).as_posix()[: -len(ending)]))
    names = [name for _, name in found]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise UserError(f"{directory}: several images named {dup!r} (different extensions)")
    return found


def _listing(paths: Sequence[Path | str], limit: int = 5) -> str:
    shown = ", ".join(str(p) for p in paths[:limit])
    return shown + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


def _pair(
    images: list[tuple[Path, str]],
    label_dir: Path,
    label_suffixes: tuple[str, ...],
    *,
    optional: bool,
    prefix: str = "",
    pattern: str = "**/*",
) -> list[Item]:
    """Items ``(image, label, prefix + name)``; the label of image ``name`` is the first
    existing ``label_dir / (name + suffix)``. An absent ``label_dir`` is an unlabelled
    dataset if ``optional``. Images without a label are an error listing the first five,
    and the label files (``pattern``, ``label_suffixes``) that match no image."""
    if optional and not label_dir.is_dir():
        return [(image, None, prefix + name) for image, name in images]
    items: list[Item] = []
    missing: list[tuple[Path, Path]] = []
    for image, name in images:
        candidates = [label_dir / f"{name}{suffix}" for suffix in label_suffixes]
        label = next((c for c in candidates if c.is_file()), None)
        if label is None:
            missing.append((image, candidates[0]))
        items.append((image, label, prefix + name))
    if missing:
        image, label = missing[0]
        names = {name for _, name in images}
        orphans = [p for p, name in _find(label_dir, pattern, label_suffixes) if name not in names]
        extra = (
            f"; label files without an image: {_listing([p.name for p in orphans])}"
            if orphans
            else ""
        )
        raise UserError(
            f"{label}: label file missing for image {image}; {len(missing)} of {len(images)} "
            f"images have no label ({label_dir}/NAME{label_suffixes[0]}): "
            f"{_listing([i.name for i, _ in missing])}{extra}"
        )
    return items


def _scan_tree(
    kind: str,
    image_dir: Path,
    label_dir: Path,
    image_suffixes: tuple[str, ...],
    label_suffixes: tuple[str, ...],
    *,
    pattern: str = "**/*",
    optional: bool = True,
    prefix: str = "",
) -> list[Item]:
    """Images under ``image_dir`` paired with labels at the same relative path under
    ``label_dir``: every layout is one or several of these trees."""
    _require_dir(image_dir, kind)
    if not optional:
        _require_dir(label_dir, kind)
    found = _find(image_dir, pattern, image_suffixes)
    return _pair(
        found, label_dir, label_suffixes, optional=optional, prefix=prefix, pattern=pattern
    )


def _present(root: Path, missing: Path) -> str:
    """`` (found under D: a, b)``: the subdirectories of ``missing``'s nearest existing
    ancestor below ``root``, or ``""``."""
    parent = missing.parent
    while parent != root and not parent.is_dir():
        parent = parent.parent
    present = sorted(p.name for p in parent.iterdir() if p.is_dir()) if parent != root else []
    return f" (found under {parent}: {', '.join(present)})" if present else ""


def _scan_groups(
    kind: str,
    root: Path,
    groups: Sequence[str],
    subdir: Callable[[str], str],
    setting: str,
) -> list[Item]:
    """acdc / darkzurich: one ``rgb_anon`` and one ``gt`` tree per condition or time of day
    (``subdir(group)`` below both; ``setting`` names the option choosing the groups); items
    are named ``group/...``."""
    items: list[Item] = []
    for group in groups:
        image_dir = root / "rgb_anon" / subdir(group)
        if not image_dir.is_dir():
            _require_dir(image_dir, kind, f"{_present(root, image_dir)}; set reader.{setting}")
        items += _scan_tree(
            kind,
            image_dir,
            root / "gt" / subdir(group),
            ("_rgb_anon.png",),
            ("_gt_labelTrainIds.png",),
            prefix=f"{group}/",
        )
    return items


def _scan(kind: str, root: Path, split: str, options: ReaderConfig) -> list[Item]:
    png = (".png",)
    if kind == "gta5":
        return _scan_tree(
            kind, root / "images", root / "labels", png, png, pattern="*", optional=False
        )
    if kind == "synthia":
        labels = root / "GT" / "LABELS"
        return _scan_tree(kind, root / "RGB", labels, png, png, pattern="*", optional=False)
    if kind == "cityscapes":
        return _scan_tree(
            kind,
            root / "leftImg8bit" / split,
            root / "gtFine" / split,
            ("_leftImg8bit.png",),
            ("_gtFine_labelIds.png", CITYSCAPES_TRAINID_SUFFIX),
            pattern="*/*",
        )
    if kind == "acdc":
        return _scan_groups(kind, root, options.conditions, lambda c: f"{c}/{split}", "conditions")
    if kind == "darkzurich":
        return _scan_groups(
            kind, root, options.times_of_day, lambda t: f"{split}/{t}", "times_of_day"
        )
    if kind == "bdd100k":
        return _scan_tree(
            kind,
            root / "images" / "10k" / split,
            root / "labels" / "sem_seg" / "masks" / split,
            (".jpg", ".jpeg", ".png"),
            png,
            pattern="*",
        )
    return _scan_tree(
        kind,
        root / "images" / split,
        root / "labels" / split,
        IMAGE_SUFFIXES,
        (options.label_suffix,),
    )


def open_dataset(
    spec: str,
    split: str = "train",
    require_labels: bool = False,
    options: ReaderConfig | None = None,
) -> SegDataset:
    """Open ``KIND:PATH`` (split ignored for gta5/synthia); checks layout, not pixels.

    ``options`` are the ``[reader]`` settings (ACDC conditions, Dark Zurich times of day,
    the folder label suffix); None takes their defaults.
    """
    kind, root = parse_dataset_spec(spec)
    if not root.is_dir():
        raise UserError(f"{root}: dataset root not found (a {kind} dataset needs {LAYOUTS[kind]})")
    taxonomy = taxonomy_from_file(root / "classes.txt") if kind == "folder" else CITYSCAPES
    items = sorted(_scan(kind, root, split, options or ReaderConfig()), key=lambda item: item[2])
    if not items:
        raise UserError(f"{root}: no images found for split {split!r}; expected {LAYOUTS[kind]}")
    ds = SegDataset(kind, root, split, taxonomy, items)
    if require_labels and not ds.has_labels:
        raise UserError(f"{root}: dataset has no labels for split {split!r}, but they are needed")
    return ds
