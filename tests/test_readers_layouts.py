"""The adverse-condition and driving layouts (acdc, darkzurich, bdd100k), Cityscapes
labelTrainIds, and the recursive folder reader with ``reader.label_suffix``: each on a tiny
tree written here (labels decoded to train ids, unlabelled splits, bad layouts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    LABELID_EXPECTED,
    make_cityscapes,
    make_folder,
    map_ids,
    pattern_ids,
    pattern_image,
    write_png,
)
from PIL import Image

from pixcli.config import load_config
from pixcli.data.readers import ReaderConfig, open_dataset
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.errors import UserError

SIZE = (8, 12)
TRAIN_IDS = [0, 7, 18, 255]  # labelTrainIds files hold train ids already


def _write_pair(image: Path, label: Path | None, i: int) -> None:
    write_png(image, pattern_image(i, SIZE))
    if label is not None:
        write_png(label, pattern_ids(i, SIZE, TRAIN_IDS))


def make_acdc(
    root: Path, split: str = "train", conditions: Sequence[str] = ("fog", "night"), n: int = 2
) -> Path:
    """``rgb_anon/{cond}/{split}/GOPR0475/GOPR0475_frame_00000i_rgb_anon.png`` (+ gt
    labelTrainIds, except for the test split); image i counts over conditions then files."""
    i = 0
    for cond in conditions:
        for j in range(n):
            stem = f"GOPR0475_frame_{j:06d}"
            rel = Path(cond) / split / "GOPR0475"
            label = root / "gt" / rel / f"{stem}_gt_labelTrainIds.png"
            _write_pair(
                root / "rgb_anon" / rel / f"{stem}_rgb_anon.png",
                None if split == "test" else label,
                i,
            )
            i += 1
    return root


def make_darkzurich(root: Path) -> Path:
    """train/{day,night} unlabelled (2 images each), val/night labelled (2 images)."""
    for time in ("day", "night"):
        for j in range(2):
            write_png(
                root / "rgb_anon" / "train" / time / "GOPR0348" / f"GOPR0348_frame_{j:06d}"
                "_rgb_anon.png",
                pattern_image(j, SIZE),
            )
    for j in range(2):
        stem = f"GOPR0356_frame_{j:06d}"
        _write_pair(
            root / "rgb_anon" / "val" / "night" / "GOPR0356" / f"{stem}_rgb_anon.png",
            root / "gt" / "val" / "night" / "GOPR0356" / f"{stem}_gt_labelTrainIds.png",
            j,
        )
    return root


def make_bdd100k(root: Path, split: str = "val", n: int = 3, labels: bool = True) -> Path:
    """``images/10k/{split}/NAME.jpg`` and ``labels/sem_seg/masks/{split}/NAME.png``."""
    for i in range(n):
        name = f"7d2f7975-e0c{i}a4c8"
        path = root / "images" / "10k" / split / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern_image(i, SIZE)).save(path, quality=98)
        if labels:
            write_png(
                root / "labels" / "sem_seg" / "masks" / split / f"{name}.png",
                pattern_ids(i, SIZE, TRAIN_IDS),
            )
    return root


def _expected(i: int) -> np.ndarray:
    return pattern_ids(i, SIZE, TRAIN_IDS).astype(np.uint8)


# ------------------------------------------------------------------------------ acdc


def test_acdc_reads_every_condition_with_train_ids(tmp_path: Path) -> None:
    root = make_acdc(tmp_path, conditions=("fog", "night", "rain", "snow"), n=2)
    ds = open_dataset(f"acdc:{root}", split="train")  # all four conditions by default
    assert ds.taxonomy == CITYSCAPES and ds.has_labels and len(ds) == 8
    assert [name for _, _, name in ds.items[1:3]] == [
        "fog/GOPR0475/GOPR0475_frame_000001",
        "night/GOPR0475/GOPR0475_frame_000000",
    ]
    for i in (0, 3, 7):
        image, label, _ = ds[i]
        np.testing.assert_array_equal(image, pattern_image(i, SIZE))
        np.testing.assert_array_equal(label, _expected(i))


def test_acdc_conditions_setting_selects_and_missing_condition_names_found(
    tmp_path: Path,
) -> None:
    make_acdc(tmp_path)
    night = open_dataset(f"acdc:{tmp_path}", options=ReaderConfig(conditions=["night"]))
    assert len(night) == 2 and all(name.startswith("night/") for _, _, name in night.items)
    np.testing.assert_array_equal(night[0][1], _expected(2))
    with pytest.raises(
        UserError, match=r"rain/train: directory not found.*: fog, night\); set reader.conditions"
    ):
        open_dataset(f"acdc:{tmp_path}")  # the default asks for all four conditions


def test_acdc_test_split_is_unlabelled(tmp_path: Path) -> None:
    make_acdc(tmp_path, split="test", conditions=("snow",))
    ds = open_dataset(f"acdc:{tmp_path}", split="test", options=ReaderConfig(conditions=["snow"]))
    assert len(ds) == 2 and not ds.has_labels and ds[1][1] is None
    with pytest.raises(UserError, match="no labels"):
        open_dataset(
            f"acdc:{tmp_path}", "test", require_labels=True, options=ReaderConfig(["snow"])
        )


def test_acdc_missing_label_lists_unpaired(tmp_path: Path) -> None:
    make_acdc(tmp_path, conditions=("fog",), n=3)
    gt = tmp_path / "gt" / "fog" / "train" / "GOPR0475"
    (gt / "GOPR0475_frame_000001_gt_labelTrainIds.png").unlink()
    (gt / "GOPR0475_frame_000002_gt_labelTrainIds.png").rename(gt / "stray_gt_labelTrainIds.png")
    with pytest.raises(UserError) as err:
        open_dataset(f"acdc:{tmp_path}", options=ReaderConfig(conditions=["fog"]))
    msg = str(err.value)
    assert "GOPR0475_frame_000001_gt_labelTrainIds.png: label file missing" in msg
    assert "2 of 3 images have no label" in msg
    assert "GOPR0475_frame_000001_rgb_anon.png, GOPR0475_frame_000002_rgb_anon.png" in msg
    assert "label files without an image: stray_gt_labelTrainIds.png" in msg


def test_acdc_label_outside_classes_is_an_error(tmp_path: Path) -> None:
    make_acdc(tmp_path, conditions=("fog",), n=1)
    label = tmp_path / "gt/fog/train/GOPR0475/GOPR0475_frame_000000_gt_labelTrainIds.png"
    write_png(label, np.full(SIZE, 26))  # a labelId, not a train id
    ds = open_dataset(f"acdc:{tmp_path}", options=ReaderConfig(conditions=["fog"]))
    with pytest.raises(UserError, match="label ids 26 outside the 19 classes"):
        ds.read_label(0)


def test_reader_settings_come_from_set_options() -> None:
    cfg = load_config(ReaderConfig, overrides={"conditions": ["rain", "snow"]})
    assert cfg.conditions == ["rain", "snow"] and cfg.times_of_day == ["night"]
    with pytest.raises(UserError, match=r"reader.conditions: expected distinct values among"):
        ReaderConfig(conditions=["sunny"])
    with pytest.raises(UserError, match=r"reader.times_of_day"):
        ReaderConfig(times_of_day=[])
    with pytest.raises(UserError, match=r"reader.label_suffix"):
        ReaderConfig(label_suffix="")


# ------------------------------------------------------------------------------ darkzurich


def test_darkzurich_train_night_is_unlabelled_and_val_is_labelled(tmp_path: Path) -> None:
    make_darkzurich(tmp_path)
    train = open_dataset(f"darkzurich:{tmp_path}", split="train")
    assert [name for _, _, name in train.items] == [
        "night/GOPR0348/GOPR0348_frame_000000",
        "night/GOPR0348/GOPR0348_frame_000001",
    ]
    assert not train.has_labels
    val = open_dataset(f"darkzurich:{tmp_path}", split="val", require_labels=True)
    assert len(val) == 2
    np.testing.assert_array_equal(val[1][0], pattern_image(1, SIZE))
    np.testing.assert_array_equal(val[1][1], _expected(1))


def test_darkzurich_time_of_day_is_a_setting(tmp_path: Path) -> None:
    make_darkzurich(tmp_path)
    both = open_dataset(
        f"darkzurich:{tmp_path}", options=ReaderConfig(times_of_day=["day", "night"])
    )
    assert [name.split("/")[0] for _, _, name in both.items] == ["day"] * 2 + ["night"] * 2
    with pytest.raises(UserError, match=r"rgb_anon/val/day: directory not found.*found.*night"):
        open_dataset(f"darkzurich:{tmp_path}", "val", options=ReaderConfig(times_of_day=["day"]))


# ------------------------------------------------------------------------------ bdd100k


def test_bdd100k_val_labelled_and_test_unlabelled(tmp_path: Path) -> None:
    make_bdd100k(tmp_path, split="val")
    make_bdd100k(tmp_path, split="test", n=2, labels=False)
    val = open_dataset(f"bdd100k:{tmp_path}", split="val", require_labels=True)
    assert len(val) == 3 and val.items[0][2] == "7d2f7975-e0c0a4c8"
    image, label, _ = val[2]
    assert np.abs(image.astype(int) - pattern_image(2, SIZE)).mean() < 12  # JPEG
    np.testing.assert_array_equal(label, _expected(2))
    test = open_dataset(f"bdd100k:{tmp_path}", split="test")
    assert len(test) == 2 and not test.has_labels


def test_bdd100k_bad_layout_names_the_layout(tmp_path: Path) -> None:
    make_bdd100k(tmp_path, split="val")
    with pytest.raises(UserError, match=r"images/10k/train: directory not found; a bdd100k"):
        open_dataset(f"bdd100k:{tmp_path}", split="train")


# ------------------------------------------------------------------------------ cityscapes


def test_cityscapes_accepts_label_train_ids(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, split="val", cities=("aachen",), per_city=2)
    first = root / "gtFine/val/aachen/aachen_000000_000000_gtFine_labelIds.png"
    first.unlink()
    write_png(first.with_name("aachen_000000_000000_gtFine_labelTrainIds.png"), _expected(0))
    ds = open_dataset(f"cityscapes:{root}", split="val")
    assert ds.items[0][1].name.endswith("_gtFine_labelTrainIds.png")
    np.testing.assert_array_equal(ds[0][1], _expected(0))  # train ids kept as they are
    ids = pattern_ids(1, SIZE, list(LABELID_EXPECTED))
    np.testing.assert_array_equal(ds[1][1], map_ids(ids, LABELID_EXPECTED))  # labelIds mapped


# ------------------------------------------------------------------------------ folder


def test_folder_recurses_and_pairs_by_label_suffix(tmp_path: Path) -> None:
    make_folder(tmp_path, n=0)
    for i, rel in enumerate(["a/x", "a/b/y", "z"]):
        write_png(tmp_path / "images" / "train" / f"{rel}.jpg", pattern_image(i, SIZE))
        write_png(tmp_path / "labels" / "train" / f"{rel}_mask.png", np.full(SIZE, i))
    ds = open_dataset(f"folder:{tmp_path}", options=ReaderConfig(label_suffix="_mask.png"))
    assert [name for _, _, name in ds.items] == ["a/b/y", "a/x", "z"]
    assert [int(ds[i][1][0, 0]) for i in range(3)] == [1, 0, 2]


def test_folder_wrong_label_suffix_lists_unpaired_files(tmp_path: Path) -> None:
    make_folder(tmp_path, n=0)
    for i in range(7):
        write_png(tmp_path / "images" / "train" / f"im{i}.png", pattern_image(i, SIZE))
        write_png(tmp_path / "labels" / "train" / f"im{i}_mask.png", np.zeros(SIZE))
    with pytest.raises(UserError) as err:
        open_dataset(f"folder:{tmp_path}")  # the default suffix .png finds no im{i}.png
    msg = str(err.value)
    assert "7 of 7 images have no label" in msg
    assert "im0.png, im1.png, im2.png, im3.png, im4.png (and 2 more)" in msg
    assert "label files without an image: im0_mask.png, im1_mask.png" in msg


def test_stage_reader_section_reaches_the_reader(tmp_path: Path) -> None:
    from stages.common import open_labelled
    from stages.eval import EvalConfig

    make_acdc(tmp_path, split="val", conditions=("night",))
    cfg = load_config(EvalConfig, overrides={"reader.conditions": ["night"]})
    assert cfg.reader.conditions == ["night"]
    ds = open_labelled(f"acdc:{tmp_path}", "val", "--data", cfg.reader)
    assert len(ds) == 2 and ds.has_labels
    with pytest.raises(UserError, match=r"--data: .*rgb_anon/fog/val: directory not found"):
        open_labelled(f"acdc:{tmp_path}", "val", "--data", EvalConfig().reader)
