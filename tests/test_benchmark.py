"""The built-in benchmark: layout, label ids, determinism, class balance and the domain gap."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pixcli.data.benchmark import BenchmarkConfig, make_benchmark, make_sample, pick_domain
from pixcli.data.benchmark_styles import STYLES
from pixcli.data.taxonomy import CITYSCAPES_CLASSES, CITYSCAPES_LABELID_TO_TRAINID
from pixcli.errors import UserError

TINY = BenchmarkConfig(seed=1, width=64, height=32, n_source=5, n_target_train=4, n_target_val=3)
# Default image size, few images: enough to see every class and the domain statistics.
SMALL = BenchmarkConfig(seed=0, n_source=12, n_target_train=12, n_target_val=4)
IGNORE_LABELIDS = {0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30}
_TRAINID = np.full(256, 255, dtype=np.uint8)
_TRAINID[list(CITYSCAPES_LABELID_TO_TRAINID)] = list(CITYSCAPES_LABELID_TO_TRAINID.values())
CITYSCAPES_NAME = re.compile(r"^(?P<city>[a-z]+)_\d{6}_\d{6}_leftImg8bit\.png$")


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("small")
    return out, make_benchmark(out, SMALL)


def _pngs(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _label_path(image: Path, target: Path) -> Path:
    split, city = image.parent.parent.name, image.parent.name
    name = image.name.replace("_leftImg8bit.png", "_gtFine_labelIds.png")
    return target / "gtFine" / split / city / name


def _domain_pairs(root: Path) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(RGB image, trainId label) arrays per domain."""
    lut = np.full(256, 255, dtype=np.uint8)
    lut[list(CITYSCAPES_LABELID_TO_TRAINID)] = list(CITYSCAPES_LABELID_TO_TRAINID.values())

    def load(image: Path, label: Path) -> tuple[np.ndarray, np.ndarray]:
        return np.asarray(Image.open(image)), lut[np.asarray(Image.open(label))]

    source = sorted((root / "source/images").glob("*.png"))
    target = sorted((root / "target/leftImg8bit").rglob("*.png"))
    return {
        "source": [load(p, root / "source/labels" / p.name) for p in source],
        "target": [load(p, _label_path(p, root / "target")) for p in target],
    }


def test_layout_is_gta5_and_cityscapes(tmp_path: Path):
    meta = make_benchmark(tmp_path, TINY)
    images = sorted(p.name for p in (tmp_path / "source/images").iterdir())
    assert images == [f"{i:05d}.png" for i in range(1, TINY.n_source + 1)]
    assert sorted(p.name for p in (tmp_path / "source/labels").iterdir()) == images
    target = tmp_path / "target"
    for split, n in (("train", TINY.n_target_train), ("val", TINY.n_target_val)):
        files = sorted((target / "leftImg8bit" / split).rglob("*"))
        files = [p for p in files if p.is_file()]
        assert len(files) == n
        cities = {p.parent.name for p in files}
        assert len(cities) == 2
        for p in files:
            match = CITYSCAPES_NAME.match(p.name)
            assert match and match["city"] == p.parent.name
            assert _label_path(p, target).is_file()
    assert {p.name for p in target.iterdir()} == {"leftImg8bit", "gtFine"}
    assert meta["specs"] == {
        "source": f"gta5:{tmp_path / 'source'}",
        "target": f"cityscapes:{tmp_path / 'target'}",
    }
    assert json.loads((tmp_path / "benchmark.json").read_text()) == meta
    assert meta["complete"] and meta["config"]["width"] == 64


def test_images_are_rgb_and_labels_are_valid_labelids(tmp_path: Path):
    make_benchmark(tmp_path, TINY)
    valid = set(CITYSCAPES_LABELID_TO_TRAINID) | IGNORE_LABELIDS
    labels = sorted(tmp_path.rglob("labels/*.png")) + sorted(tmp_path.rglob("*_labelIds.png"))
    assert len(labels) == TINY.n_source + TINY.n_target_train + TINY.n_target_val
    for path in labels:
        label = Image.open(path)
        assert label.mode == "L" and label.size == (TINY.width, TINY.height)
        assert set(np.unique(np.asarray(label)).tolist()) <= valid, path
    for path in sorted(tmp_path.rglob("images/*.png")) + sorted(
        tmp_path.rglob("*_leftImg8bit.png")
    ):
        image = Image.open(path)
        assert image.mode == "RGB" and image.size == (TINY.width, TINY.height)


def test_same_seed_gives_identical_bytes_other_seed_differs(tmp_path: Path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    make_benchmark(a, TINY)
    make_benchmark(b, TINY)
    make_benchmark(c, BenchmarkConfig(**{**TINY.__dict__, "seed": TINY.seed + 1}))
    files_a = _pngs(a)
    assert files_a == _pngs(b)
    files_c = _pngs(c)
    assert files_a.keys() == files_c.keys()
    assert sum(files_a[k] != files_c[k] for k in files_a) == len(files_a)


def test_progress_and_rewrite_of_a_previous_benchmark(tmp_path: Path):
    calls: list[tuple[int, int]] = []
    make_benchmark(tmp_path, TINY, progress=lambda done, total: calls.append((done, total)))
    total = TINY.n_source + TINY.n_target_train + TINY.n_target_val
    assert calls == [(i, total) for i in range(1, total + 1)]
    smaller = BenchmarkConfig(**{**TINY.__dict__, "n_source": 2, "n_target_val": 1})
    make_benchmark(tmp_path, smaller)  # a previous benchmark: overwritten, stale files gone
    assert len(list((tmp_path / "source/images").iterdir())) == 2
    assert len(list((tmp_path / "target/leftImg8bit/val").rglob("*.png"))) == 1


def test_refuses_a_foreign_directory(tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        make_benchmark(tmp_path, TINY)
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        make_benchmark(tmp_path / "file", TINY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "notes.txt"]


def test_classes_and_imbalance(small: tuple[Path, dict]):
    _, meta = small
    assert len(meta["classes"]) >= 8
    for name in ("road", "sidewalk", "building", "vegetation", "sky", "pole", "person", "car"):
        assert name in meta["classes"]
    assert set(meta["classes"]) <= set(CITYSCAPES_CLASSES)
    for domain, frac in meta["pixel_fractions"].items():
        large = frac["road"] + frac["sky"] + frac["building"]
        small_things = frac["pole"] + frac["traffic sign"] + frac["person"]
        assert large > 0.5, domain
        assert large > 10 * small_things, domain
        assert all(frac[c] > 0 for c in ("pole", "traffic sign", "traffic light", "person"))


def test_domains_differ_in_colour_texture_and_layout(small: tuple[Path, dict]):
    root, meta = small
    pairs = _domain_pairs(root)
    stats: dict[str, dict[str, np.ndarray]] = {}
    for domain, items in pairs.items():
        images = np.stack([i for i, _ in items]).astype(np.float32)
        labels = np.stack([lab for _, lab in items])
        # texture / noise: mean absolute horizontal difference inside the road
        grad = np.abs(np.diff(images.mean(-1), axis=2))
        road = (labels[:, :, 1:] == 0) & (labels[:, :, :-1] == 0)
        stats[domain] = {
            "colour": np.stack([images[labels == c].mean(0) for c in (0, 2, 8, 10, 13)]),
            "grad": np.array(grad[road].mean()),
            # the target camera sees its ego-vehicle hood (ignore) in the bottom rows
            "hood": np.array((labels[:, -2:] == 255).mean()),
        }
    src, tgt = stats["source"], stats["target"]
    colour_shift = np.linalg.norm(src["colour"] - tgt["colour"], axis=1)
    # road, building, vegetation, sky, car: every class shifts, most of them a lot
    assert (colour_shift > 15).all() and colour_shift.mean() > 30, colour_shift
    assert tgt["grad"] > 2 * src["grad"]
    assert src["hood"] == 0 and tgt["hood"] > 0.5  # another camera
    fractions = meta["pixel_fractions"]
    assert fractions["source"]["road"] > fractions["target_train"]["road"]


def test_dusk_style_is_a_darker_hazier_other_benchmark(tmp_path: Path):
    street, dusk = tmp_path / "street", tmp_path / "dusk"
    make_benchmark(street, TINY)
    make_benchmark(dusk, BenchmarkConfig(**{**TINY.__dict__, "style": "dusk"}))
    assert json.loads((dusk / "benchmark.json").read_text())["config"]["style"] == "dusk"

    def target_pixels(root: Path) -> np.ndarray:
        files = sorted((root / "target/leftImg8bit").rglob("*.png"))
        return np.stack([np.asarray(Image.open(p), dtype=np.float32) for p in files])

    a, b = target_pixels(street), target_pixels(dusk)
    assert b.mean() < a.mean() - 15  # dusk light
    assert b.std() < a.std()  # haze lowers the contrast
    with pytest.raises(UserError, match="--style noon: expected one of street, dusk, varied$"):
        make_benchmark(tmp_path / "x", BenchmarkConfig(**{**TINY.__dict__, "style": "noon"}))


def test_varied_style_draws_five_scene_types_that_differ_in_layout_and_colour(tmp_path: Path):
    cfg = BenchmarkConfig(seed=0, width=128, height=64, n_source=1, n_target_train=40,
                          n_target_val=10, style="varied")  # fmt: skip
    meta = make_benchmark(tmp_path, cfg)
    types = {"avenue", "downtown", "park", "highway", "night"}
    assert set(meta["scene_types"]["train"]) == types
    assert sum(meta["scene_types"]["train"].values()) == 40
    assert meta["scene_types"]["source"] == {"synthetic": 1}
    # per scene type: class pixel shares and the mean colour of vegetation, from the samples
    _, target = STYLES["varied"]
    share: dict[str, list[np.ndarray]] = {t: [] for t in types}
    green: dict[str, list[np.ndarray]] = {t: [] for t in types}
    for i in range(60):
        image, labels, name = make_sample(cfg, target, 1, i)
        train = _TRAINID[labels]
        share[name].append(np.bincount(train.ravel(), minlength=256)[:19] / train.size)
        green[name].append(image[train == 8].reshape(-1, 3))
    frac = {t: np.mean(v, axis=0) for t, v in share.items()}
    sidewalk, building, vegetation, terrain, sky, person, car = 1, 2, 8, 9, 10, 11, 13
    assert frac["highway"][car] > 2 * frac["park"][car]  # many cars on a wide road
    assert frac["highway"][sky] > 2 * frac["downtown"][sky]  # a low horizon, low facades
    assert frac["downtown"][building] > 2 * frac["highway"][building]
    assert frac["downtown"][person] > 2 * frac["highway"][person]
    assert frac["park"][vegetation] + frac["park"][terrain] > 2 * frac["downtown"][vegetation]
    # the same class in another colour: autumn trees in the park, dark nights
    veg = {t: np.concatenate(v).mean(0) for t, v in green.items()}
    assert veg["park"][0] > veg["avenue"][0] + 30  # red-brown leaves against green
    assert veg["night"].mean() < veg["avenue"].mean() - 20
    assert sidewalk in np.flatnonzero(frac["highway"])


def test_a_single_domain_draws_nothing_from_the_stream():
    street, _ = STYLES["street"]
    rng = np.random.default_rng(3)
    assert pick_domain(street, rng) is street
    assert rng.random() == np.random.default_rng(3).random()  # street's bytes are unchanged
    _, varied = STYLES["varied"]
    picked = {pick_domain(varied, rng).name for _ in range(50)}
    assert picked == {"avenue", "downtown", "park", "highway", "night"}
