"""Dataset readers (every layout, every error) and the 16-bit PNG codec."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    LABELID_EXPECTED,
    SYNTHIA_EXPECTED,
    make_cityscapes,
    make_folder,
    make_gta5,
    make_synthia,
    map_ids,
    pattern_ids,
    pattern_image,
    synthia_label,
    write_png,
    write_png16,
)
from PIL import Image

from pixcli.data.png import encode_png, read_png
from pixcli.data.readers import KINDS, SegDataset, open_dataset, parse_dataset_spec
from pixcli.data.taxonomy import CITYSCAPES
from pixcli.errors import UserError

SIZE = (8, 12)
FOLDER_IDS = [0, 1, 2, 255]
MAKERS = {
    "gta5": make_gta5,
    "synthia": make_synthia,
    "cityscapes": make_cityscapes,
    "folder": make_folder,
}


# ------------------------------------------------------------------------------ 16-bit PNG


@pytest.mark.parametrize("filters", [0, 1, 2, 3, 4, (0, 1, 2, 3, 4)])
@pytest.mark.parametrize("shape", [(6, 9, 3), (5, 7), (4, 3, 4), (1, 1, 3)])
def test_png16_round_trip_keeps_values_above_255(tmp_path: Path, filters, shape) -> None:
    rng = np.random.default_rng(sum(shape))
    array = rng.integers(0, 65536, shape, dtype=np.uint16)
    array.flat[0] = 65535
    array.flat[-1] = 256
    out = read_png(write_png16(tmp_path / "x.png", array, filters))
    assert out.dtype == np.uint16
    assert out.shape == array.shape
    np.testing.assert_array_equal(out, array)


def test_png16_rgb_encoder_agrees_with_pillow_high_bytes(tmp_path: Path) -> None:
    """Pillow reads 16-bit RGB as 8-bit high bytes: checks our encoder independently."""
    array = np.random.default_rng(1).integers(0, 65536, (13, 17, 3), dtype=np.uint16)
    path = write_png16(tmp_path / "x.png", array)
    np.testing.assert_array_equal(np.asarray(Image.open(path)), (array >> 8).astype(np.uint8))


def test_png16_gray_written_by_pillow(tmp_path: Path) -> None:
    array = np.random.default_rng(2).integers(0, 65536, (11, 14), dtype=np.uint16)
    Image.fromarray(array).save(tmp_path / "g.png")
    np.testing.assert_array_equal(read_png(tmp_path / "g.png"), array)


def test_png8_rgb_written_by_pillow_adaptive_filters(tmp_path: Path) -> None:
    rows, cols = np.indices((40, 50))
    image = np.stack([cols * 5, rows * 6, rows * cols], axis=-1).astype(np.uint8)
    image[::7] = np.random.default_rng(3).integers(0, 256, image[::7].shape)
    path = write_png(tmp_path / "c.png", image)
    out = read_png(path)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, image)


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b[:40],  # truncated
        lambda b: b"GIF89a" + b[6:],  # not a PNG
        lambda b: b[:60] + bytes([b[60] ^ 0xFF]) + b[61:],  # CRC mismatch in the data
    ],
)
def test_png_corrupt_files_are_user_errors(tmp_path: Path, mutate) -> None:
    data = encode_png(np.zeros((6, 6, 3), dtype=np.uint16) + 300)
    (tmp_path / "bad.png").write_bytes(mutate(data))
    with pytest.raises(UserError, match="bad.png"):
        read_png(tmp_path / "bad.png")


def test_png_palette_is_refused(tmp_path: Path) -> None:
    path = write_png(tmp_path / "p.png", np.zeros((4, 4)), palette=True)
    with pytest.raises(UserError, match="unsupported PNG format"):
        read_png(path)


# ------------------------------------------------------------------------------ specs


def test_parse_dataset_spec() -> None:
    assert parse_dataset_spec("gta5:/data/gta") == ("gta5", Path("/data/gta"))
    assert parse_dataset_spec("folder:rel/dir:x") == ("folder", Path("rel/dir:x"))


@pytest.mark.parametrize("spec", ["imagenet:/data", "/data/gta", "gta5:"])
def test_parse_dataset_spec_errors_list_kinds(spec: str) -> None:
    with pytest.raises(UserError, match=", ".join(KINDS)):
        parse_dataset_spec(spec)


# ------------------------------------------------------------------------------ layouts


def _check_item(ds: SegDataset, i: int, pattern: int, label: np.ndarray | None) -> None:
    image, got_label, name = ds[i]
    assert name == ds.items[i][2]
    assert image.dtype == np.uint8 and image.shape == (*SIZE, 3)
    np.testing.assert_array_equal(image, pattern_image(pattern, SIZE))
    if label is None:
        assert got_label is None
    else:
        assert got_label.dtype == np.uint8
        np.testing.assert_array_equal(got_label, label)


def test_gta5_first_and_last(tmp_path: Path) -> None:
    ds = open_dataset(f"gta5:{make_gta5(tmp_path, n=3)}", split="ignored")
    assert (ds.kind, len(ds), ds.taxonomy, ds.has_labels) == ("gta5", 3, CITYSCAPES, True)
    assert [name for _, _, name in ds.items] == ["00001", "00002", "00003"]
    for i in (0, 2):
        expected = map_ids(pattern_ids(i, SIZE, list(LABELID_EXPECTED)), LABELID_EXPECTED)
        _check_item(ds, i, i, expected)
    assert {0, 13, 255} <= set(np.unique(ds[0][1]))


def test_synthia_first_and_last_use_first_16bit_channel(tmp_path: Path) -> None:
    ds = open_dataset(f"synthia:{make_synthia(tmp_path, n=3)}")
    assert len(ds) == 3 and ds.taxonomy == CITYSCAPES
    for i in (0, 2):
        expected = map_ids(pattern_ids(i, SIZE, list(SYNTHIA_EXPECTED)), SYNTHIA_EXPECTED)
        _check_item(ds, i, i, expected)
    raw = read_png(ds.items[0][1])
    assert raw.shape == (*SIZE, 3) and raw.max() > 255  # the file really is 16-bit
    np.testing.assert_array_equal(raw, synthia_label(0, SIZE, list(SYNTHIA_EXPECTED)))


def test_cityscapes_first_and_last(tmp_path: Path) -> None:
    root = make_cityscapes(tmp_path, split="val", cities=("zurich", "aachen"), per_city=2)
    ds = open_dataset(f"cityscapes:{root}", split="val")
    assert [name for _, _, name in ds.items] == [
        "aachen/aachen_000000_000000",
        "aachen/aachen_000000_000001",
        "zurich/zurich_000000_000000",
        "zurich/zurich_000000_000001",
    ]
    for i in (0, 3):
        expected = map_ids(pattern_ids(i, SIZE, list(LABELID_EXPECTED)), LABELID_EXPECTED)
        _check_item(ds, i, i, expected)


def test_cityscapes_without_gtfine_is_unlabelled(tmp_path: Path) -> None:
    ds = open_dataset(f"cityscapes:{make_cityscapes(tmp_path, labels=False)}")
    assert not ds.has_labels and ds.read_label(0) is None
    with pytest.raises(UserError, match="no labels"):
        open_dataset(f"cityscapes:{tmp_path}", require_labels=True)


def test_folder_first_and_last(tmp_path: Path) -> None:
    ds = open_dataset(f"folder:{make_folder(tmp_path, split='val', n=3)}", split="val")
    assert ds.taxonomy.classes == ("sky", "road", "car")
    assert ds.spec() == f"folder:{tmp_path}"
    for i in (0, 2):
        _check_item(ds, i, i, pattern_ids(i, SIZE, FOLDER_IDS).astype(np.uint8))


def test_folder_unlabelled(tmp_path: Path) -> None:
    ds = open_dataset(f"folder:{make_folder(tmp_path, labels=False)}")
    assert not ds.has_labels
    _check_item(ds, 2, 2, None)
    with pytest.raises(UserError, match="no labels"):
        open_dataset(f"folder:{tmp_path}", require_labels=True)


def test_folder_converts_gray_rgba_and_jpeg(tmp_path: Path) -> None:
    make_folder(tmp_path, n=0)
    images = tmp_path / "images" / "train"
    rgb = pattern_image(0, SIZE)
    write_png(images / "a_gray.png", rgb[:, :, 0])
    write_png(images / "b_rgba.png", np.dstack([rgb, np.full(SIZE, 7, np.uint8)]))
    Image.fromarray(rgb).save(images / "c_jpeg.jpg", quality=95)
    ds = open_dataset(f"folder:{tmp_path}")
    gray, rgba, jpeg = (ds[i][0] for i in range(3))
    np.testing.assert_array_equal(gray, np.repeat(rgb[:, :, :1], 3, axis=2))
    np.testing.assert_array_equal(rgba, rgb)
    assert jpeg.shape == (*SIZE, 3) and np.abs(jpeg.astype(int) - rgb).mean() < 12


# ------------------------------------------------------------------------------ errors


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"nothere: dataset root not found"):
        open_dataset(f"gta5:{tmp_path / 'nothere'}")


@pytest.mark.parametrize(
    ("kind", "remove", "missing"),
    [
        ("gta5", "labels", "labels"),
        ("synthia", "GT", "GT/LABELS"),
        ("cityscapes", "leftImg8bit", "leftImg8bit/train"),
        ("folder", "images", "images/train"),
    ],
)
def test_missing_subdirectory_names_layout(
    tmp_path: Path, kind: str, remove: str, missing: str
) -> None:
    MAKERS[kind](tmp_path)
    shutil.rmtree(tmp_path / remove)
    with pytest.raises(UserError, match=rf"{missing}: directory not found; a {kind} dataset"):
        open_dataset(f"{kind}:{tmp_path}")


def test_folder_missing_classes_file(tmp_path: Path) -> None:
    make_folder(tmp_path)
    (tmp_path / "classes.txt").unlink()
    with pytest.raises(UserError, match="classes.txt: classes file not found"):
        open_dataset(f"folder:{tmp_path}")


def test_empty_dataset(tmp_path: Path) -> None:
    make_gta5(tmp_path, n=0)
    (tmp_path / "images").mkdir()
    (tmp_path / "labels").mkdir()
    with pytest.raises(UserError, match="no images found"):
        open_dataset(f"gta5:{tmp_path}")


def test_wrong_split_of_folder_is_missing_directory(tmp_path: Path) -> None:
    make_folder(tmp_path, split="train")
    with pytest.raises(UserError, match=r"images/val: directory not found"):
        open_dataset(f"folder:{tmp_path}", split="val")


@pytest.mark.parametrize(
    ("kind", "label"),
    [
        ("gta5", "labels/00002.png"),
        ("synthia", "GT/LABELS/0000001.png"),
        ("cityscapes", "gtFine/train/aachen/aachen_000000_000001_gtFine_labelIds.png"),
        ("folder", "labels/train/img_1.png"),
    ],
)
def test_image_without_label(tmp_path: Path, kind: str, label: str) -> None:
    MAKERS[kind](tmp_path)
    (tmp_path / label).unlink()
    with pytest.raises(UserError, match=rf"{label}: label file missing for image"):
        open_dataset(f"{kind}:{tmp_path}")


def test_size_mismatch_found_when_read(tmp_path: Path) -> None:
    make_gta5(tmp_path, n=2)
    write_png(tmp_path / "labels" / "00002.png", np.full((5, 5), 7))
    ds = open_dataset(f"gta5:{tmp_path}")
    ds[0]
    with pytest.raises(UserError, match=r"00002.png: label is 5x5 but image .*00002.png is 12x8"):
        ds[1]


def test_folder_label_ids_outside_classes(tmp_path: Path) -> None:
    make_folder(tmp_path, n=2)
    label = pattern_ids(1, SIZE, FOLDER_IDS)
    label[0, 0], label[1, 1] = 3, 200
    write_png(tmp_path / "labels" / "train" / "img_1.png", label)
    ds = open_dataset(f"folder:{tmp_path}")
    assert ds[0][1] is not None
    with pytest.raises(UserError, match=r"img_1.png: label ids 3, 200 outside the 3 classes"):
        ds[1]


def test_corrupt_image(tmp_path: Path) -> None:
    make_gta5(tmp_path, n=2)
    (tmp_path / "images" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    ds = open_dataset(f"gta5:{tmp_path}")
    with pytest.raises(UserError, match=r"00001.png: cannot read image"):
        ds[0]


def test_corrupt_synthia_label(tmp_path: Path) -> None:
    make_synthia(tmp_path, n=1)
    path = tmp_path / "GT" / "LABELS" / "0000000.png"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(UserError, match=r"0000000.png: corrupt PNG"):
        open_dataset(f"synthia:{tmp_path}")[0]


def test_rgb_label_for_labelid_kind(tmp_path: Path) -> None:
    make_gta5(tmp_path, n=1)
    write_png(tmp_path / "labels" / "00001.png", pattern_image(0, SIZE))
    with pytest.raises(UserError, match=r"00001.png: label image has mode RGB"):
        open_dataset(f"gta5:{tmp_path}")[0]


# ------------------------------------------------------------------------------ fingerprint, subset


def test_fingerprint_stable_and_sensitive(tmp_path: Path) -> None:
    make_folder(tmp_path, n=3)
    spec = f"folder:{tmp_path}"
    first = open_dataset(spec).fingerprint()
    assert len(first) == 16 and first == open_dataset(spec).fingerprint()
    assert open_dataset(spec).subset([2, 1, 0]).fingerprint() == first  # order-independent

    write_png(tmp_path / "images" / "train" / "img_9.png", pattern_image(9, SIZE))
    write_png(tmp_path / "labels" / "train" / "img_9.png", np.zeros(SIZE))
    added = open_dataset(spec).fingerprint()
    assert added != first

    write_png(tmp_path / "images" / "train" / "img_9.png", pattern_image(9, (16, 16)))
    resized = open_dataset(spec).fingerprint()
    assert resized not in (first, added)

    for sub in ("images", "labels"):
        (tmp_path / sub / "train" / "img_9.png").unlink()
    assert open_dataset(spec).fingerprint() == first


def test_fingerprint_depends_on_kind_and_split(tmp_path: Path) -> None:
    make_cityscapes(tmp_path, split="train")
    make_cityscapes(tmp_path, split="val")
    train = open_dataset(f"cityscapes:{tmp_path}", split="train")
    val = open_dataset(f"cityscapes:{tmp_path}", split="val")
    assert train.fingerprint() != val.fingerprint()


def test_subset_and_pickle(tmp_path: Path) -> None:
    ds = open_dataset(f"gta5:{make_gta5(tmp_path, n=4)}")
    sub = ds.subset([3, 1])
    assert len(sub) == 2 and len(ds) == 4
    assert [name for _, _, name in sub.items] == ["00004", "00002"]
    np.testing.assert_array_equal(sub[0][0], ds[3][0])
    assert (sub.kind, sub.root, sub.split, sub.taxonomy) == (
        ds.kind,
        ds.root,
        ds.split,
        ds.taxonomy,
    )
    assert sub.fingerprint() != ds.fingerprint()
    clone = pickle.loads(pickle.dumps(sub))
    np.testing.assert_array_equal(clone[1][1], sub[1][1])
