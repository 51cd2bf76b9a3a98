"""Class taxonomies and label-id tables.

Every label inside pixcli is a *train id*: ``0 .. C-1`` for the classes of a
:class:`Taxonomy`, ``IGNORE_INDEX`` (255) for pixels that count nowhere. Dataset readers
translate their on-disk ids with the look-up tables here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pixcli.errors import UserError

IGNORE_INDEX = 255

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
    "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car", "truck",
    "bus", "train", "motorcycle", "bicycle",
)  # fmt: skip

CITYSCAPES_PALETTE: tuple[tuple[int, int, int], ...] = (
    (128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
    (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
    (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100),
    (0, 80, 100), (0, 0, 230), (119, 11, 32),
)  # fmt: skip

# Cityscapes labelId -> trainId (cityscapesScripts' labels.py). GTA5 labels use the same ids.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
    25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}  # fmt: skip

# The inverse: Cityscapes trainId -> labelId (used to write labels, e.g. the built-in benchmark).
TRAINID_TO_LABELID: dict[int, int] = {t: i for i, t in CITYSCAPES_LABELID_TO_TRAINID.items()}

# SYNTHIA RAND-CITYSCAPES class id (first channel of the 16-bit GT/LABELS png) -> trainId.
# Only the 16 classes SYNTHIA shares with Cityscapes; terrain, truck and train are absent.
SYNTHIA_ID_TO_TRAINID: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 10, 10: 11, 17: 12,
    8: 13, 19: 15, 12: 17, 11: 18,
}  # fmt: skip

# Train ids of the SYNTHIA evaluation protocols (mIoU16 and mIoU13: no wall, fence, pole).
SYNTHIA16_TRAINIDS: tuple[int, ...] = tuple(sorted(SYNTHIA_ID_TO_TRAINID.values()))
SYNTHIA13_TRAINIDS: tuple[int, ...] = tuple(i for i in SYNTHIA16_TRAINIDS if i not in (3, 4, 5))


def lookup_table(mapping: dict[int, int], size: int = 65536) -> np.ndarray:
    """A dense id -> train id table (uint8), ``IGNORE_INDEX`` for every unmapped id."""
    table = np.full(size, IGNORE_INDEX, dtype=np.uint8)
    for src, dst in mapping.items():
        table[src] = dst
    return table


@dataclass(frozen=True)
class Taxonomy:
    """The classes a model predicts: names (index = train id) and a colour per class."""

    name: str
    classes: tuple[str, ...]
    palette: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subsets(self) -> dict[str, tuple[int, ...]]:
        """Extra mIoU variants that apply to this taxonomy (name -> train ids)."""
        if self.classes == CITYSCAPES_CLASSES:
            return {"mIoU16": SYNTHIA16_TRAINIDS, "mIoU13": SYNTHIA13_TRAINIDS}
        return {}

    def palette_array(self) -> np.ndarray:
        """(256, 3) uint8 colours; ignore and unused ids are black."""
        out = np.zeros((256, 3), dtype=np.uint8)
        out[: self.num_classes] = np.asarray(self.palette, dtype=np.uint8)
        return out


CITYSCAPES = Taxonomy("cityscapes", CITYSCAPES_CLASSES, CITYSCAPES_PALETTE)


def default_palette(n: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for user classes: Cityscapes' first, then a deterministic spread."""
    colours = list(CITYSCAPES_PALETTE[:n])
    rng = np.random.default_rng(0)
    while len(colours) < n:
        colours.append(tuple(int(v) for v in rng.integers(0, 256, 3)))  # type: ignore[arg-type]
    return tuple(colours)


def taxonomy_from_file(path: Path) -> Taxonomy:
    """User classes from ``classes.txt``: one class name per line, line i is train id i."""
    if not path.is_file():
        raise UserError(f"{path}: classes file not found (one class name per line)")
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    if not names:
        raise UserError(f"{path}: no class names in the classes file")
    if len(names) >= IGNORE_INDEX:
        raise UserError(f"{path}: {len(names)} classes; at most 254 are supported")
    if len(set(names)) != len(names):
        raise UserError(f"{path}: class names repeat")
    return Taxonomy(path.parent.name or "folder", names, default_palette(len(names)))
