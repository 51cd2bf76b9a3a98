"""The built-in benchmark: procedurally drawn street scenes in two domains.

A *synthetic* source domain (flat saturated colours, clean edges, a high camera) is written
in the GTA5 layout and a *real* target domain (other hues, textures, shading, shadows, sensor
noise and blur, a lower camera with an ego-vehicle hood) in the Cityscapes layout::

    OUT/source/images/00001.png          OUT/source/labels/00001.png        (labelIds)
    OUT/target/leftImg8bit/{train,val}/{city}/{city}_{seq:06d}_000019_leftImg8bit.png
    OUT/target/gtFine/{train,val}/{city}/{city}_{seq:06d}_000019_gtFine_labelIds.png
    OUT/benchmark.json

Both domains share the scene grammar (road to a vanishing point, sidewalks, facades, trees,
poles with signs and lights, persons, cars), so shape and layout cues transfer while colour
and texture cues do not. Every image has its own random stream derived from
``(seed, domain, index)``: files are byte-identical for a seed. The domains' settings (and
the second style, ``--style dusk``, and the label-limited ``--style varied``, whose target
images each draw one of five scene types) live in :mod:`pixcli.data.benchmark_styles`; this
module draws, renders and writes the scenes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pixcli.data.benchmark_styles import (
    BUILDING,
    CAR,
    LIGHT,
    PERSON,
    POLE,
    RGB,
    ROAD,
    SIDEWALK,
    SIGN,
    SKY,
    STYLES,
    TERRAIN,
    VEGETATION,
    Appearance,
    Domain,
    Geometry,
    Range,
)  # fmt: skip
from pixcli.data.taxonomy import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    IGNORE_INDEX,
    TRAINID_TO_LABELID,
    lookup_table,
)
from pixcli.errors import UserError

EGO_VEHICLE_LABELID = 1
FORMAT = "pixcli-benchmark"
TARGET_CITIES = {"train": ("aachen", "bremen"), "val": ("frankfurt", "munster")}

Points = list[tuple[float, float]]

# Colours that are the same in both domains (lit lamps, skin, tyres, lane paint).
LAMPS: tuple[RGB, ...] = ((230, 40, 30), (240, 180, 30), (40, 220, 90))
SKIN, TYRE, LANE_PAINT = (200, 160, 130), (25, 25, 25), (225, 225, 215)
# Car outlines relative to (bottom centre, width, height): the cabin and its window.
CABIN = ((-0.42, 0.58), (-0.3, 1.0), (0.3, 1.0), (0.42, 0.58))
WINDOW = ((-0.36, 0.62), (-0.27, 0.93), (0.27, 0.93), (0.36, 0.62))


@dataclass
class BenchmarkConfig:
    """How many images of which size; ``seed`` fixes every pixel."""

    seed: int = 0
    width: int = 256
    height: int = 128
    n_source: int = 400
    n_target_train: int = 300
    n_target_val: int = 100
    style: str = "street"  # a key of STYLES: which source and target domains


def _rng_for(seed: int, domain: int, index: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, domain, index]))


def _uniform(rng: np.random.Generator, r: Range) -> float:
    return float(rng.uniform(r[0], r[1]))


def _count(rng: np.random.Generator, r: tuple[int, int]) -> int:
    return int(rng.integers(r[0], r[1] + 1))


class _Scene:
    """A label map and an instance map drawn together with the painter's algorithm."""

    def __init__(self, width: int, height: int, look: Appearance, rng: np.random.Generator):
        self.w, self.h, self.look, self.rng = width, height, look, rng
        self.label = Image.new("L", (width, height), SKY)
        self.inst = Image.new("L", (width, height), 0)
        self._draw = (ImageDraw.Draw(self.label), ImageDraw.Draw(self.inst))
        self.colours: list[np.ndarray] = []
        self.instance(SKY)

    def instance(self, cls: int, colour: RGB | np.ndarray | None = None) -> int:
        """A new object of class ``cls`` with its own colour; returns its instance id."""
        if colour is None:
            choices = self.look.colours[cls]
            colour = choices[int(self.rng.integers(len(choices)))]
        jitter = self.rng.normal(0.0, self.look.jitter, 3)
        self.colours.append(np.asarray(colour, dtype=np.float32) + jitter)
        return min(len(self.colours) - 1, 255)

    def paint(self, kind: str, xy: list, cls: int, inst: int) -> None:
        """Draw a ``polygon``, ``ellipse`` or ``rectangle`` of class ``cls``."""
        for draw, value in zip(self._draw, (cls, inst), strict=True):
            getattr(draw, kind)(xy, fill=value)


@dataclass
class _Ground:
    """The ground plane: lines through the vanishing point ``(xv, yh)``."""

    xv: float
    yh: float
    w: int
    h: int

    def x(self, u: float, y: float) -> float:
        """Column of the ground line that meets the bottom row at ``xv + u * w``, at row y."""
        return self.xv + u * self.w * (y - self.yh) / (self.h - self.yh)

    def depth(self, y: float) -> float:
        """Perspective scale of an object standing at row y: 0 at the horizon, 1 at the bottom."""
        return max(0.0, (y - self.yh) / (self.h - self.yh))

    def strip(self, u0: float, u1: float) -> list[tuple[float, float]]:
        """The ground polygon between two lines, from the horizon to below the bottom row."""
        y = self.h + 1
        return [(self.xv, self.yh), (self.x(u0, y), y), (self.x(u1, y), y)]


def _draw_buildings(s: _Scene, g: _Ground, geo: Geometry) -> None:
    """Facades on both sides, rising from the vanishing point towards the image edges."""
    for side in (-1, 1):
        slope = _uniform(s.rng, geo.facade)
        a = 0.0
        while a < s.w:
            b = a + s.rng.uniform(0.08, 0.3) * s.w
            k = slope * s.rng.uniform(0.6, 1.4)
            base = s.rng.uniform(0.02, 0.1) * s.h
            tops = [g.yh - base - k * a, g.yh - base - k * b]
            if s.rng.random() < 0.2:  # a gap: sky shows through
                a = b
                continue
            xy = [(g.xv + side * a, tops[0]), (g.xv + side * b, tops[1])]
            xy += [(g.xv + side * b, s.h), (g.xv + side * a, s.h)]
            s.paint("polygon", xy, BUILDING, s.instance(BUILDING))
            a = b


def _draw_ground(s: _Scene, g: _Ground, geo: Geometry) -> tuple[float, float]:
    """Sidewalks (or grass verges) and the road with lane markings; returns the kerb lines."""
    centre = s.rng.uniform(-0.08, 0.08)
    half = _uniform(s.rng, geo.road)
    kerbs = (centre - half, centre + half)
    for side, kerb in zip((-1, 1), kerbs, strict=True):
        outer = kerb + side * _uniform(s.rng, geo.sidewalk)
        s.paint("polygon", g.strip(kerb, outer), SIDEWALK, s.instance(SIDEWALK))
        if s.rng.random() < geo.terrain:
            verge = outer - side * s.rng.uniform(0.3, 0.7) * abs(outer - kerb)
            s.paint("polygon", g.strip(verge, outer), TERRAIN, s.instance(TERRAIN))
    s.paint("polygon", g.strip(*kerbs), ROAD, s.instance(ROAD))
    paint = s.instance(ROAD, LANE_PAINT)
    rows = np.linspace(g.yh + 2, s.h, 7)
    for y0, y1 in zip(rows[0::2], rows[1::2], strict=False):
        x1, du = g.x(centre, y1), 0.012 * g.depth(y1) * s.w
        s.paint("polygon", [(g.x(centre, y0), y0), (x1 - du, y1), (x1 + du, y1)], ROAD, paint)
    return kerbs


def _draw_tree(s: _Scene, g: _Ground, x: float, y: float, geo: Geometry) -> None:
    """A trunk and an elliptic crown (both vegetation) standing at (x, y)."""
    d = g.depth(y)
    r = s.rng.uniform(0.2, 0.35) * s.h * d + 1
    trunk_h = s.rng.uniform(0.2, 0.35) * s.h * d
    inst = s.instance(VEGETATION)
    tw = max(1.0, 0.15 * r)
    s.paint("rectangle", [x - tw / 2, y - trunk_h - r, x + tw / 2, y], VEGETATION, inst)
    cy = y - trunk_h - r
    s.paint("ellipse", [x - r, cy - 1.2 * r, x + r, cy + 0.8 * r], VEGETATION, inst)


def _draw_pole(s: _Scene, g: _Ground, x: float, y: float, geo: Geometry) -> None:
    """A pole carrying a traffic sign, a traffic light (with a lit lamp) or nothing."""
    d = g.depth(y)
    top = y - s.rng.uniform(0.45, 0.7) * s.h * d
    pw = max(2.5, 0.025 * s.w * d)
    s.paint("rectangle", [x - pw / 2, top, x + pw / 2, y], POLE, s.instance(POLE))
    kind = s.rng.random()
    if kind < 0.45:
        r = max(3.0, 0.08 * s.h * d)
        shape = "ellipse" if s.rng.random() < 0.5 else "rectangle"
        s.paint(shape, [x - r, top, x + r, top + 2 * r], SIGN, s.instance(SIGN))
    elif kind < 0.85:
        lw, lh = max(3.0, 0.05 * s.h * d), max(7.0, 0.16 * s.h * d)
        s.paint("rectangle", [x - lw, top, x + lw, top + lh], LIGHT, s.instance(LIGHT))
        lamp = s.instance(LIGHT, LAMPS[int(s.rng.integers(len(LAMPS)))])
        xy = [x - 0.6 * lw, top + 0.1 * lh, x + 0.6 * lw, top + 0.35 * lh]
        s.paint("ellipse", xy, LIGHT, lamp)


def _draw_person(s: _Scene, g: _Ground, x: float, y: float, geo: Geometry) -> None:
    """Legs, torso and head; height proportional to the perspective depth."""
    hgt = geo.person_size * s.h * g.depth(y) * s.rng.uniform(0.8, 1.1)
    if hgt < 6:
        return
    w = 0.3 * hgt
    legs, body = s.instance(PERSON), s.instance(PERSON)
    s.paint("rectangle", [x - w / 2, y - 0.5 * hgt, x + w / 2, y], PERSON, legs)
    s.paint("rectangle", [x - w / 2, y - 0.85 * hgt, x + w / 2, y - 0.45 * hgt], PERSON, body)
    head = s.instance(PERSON, SKIN)
    s.paint("ellipse", [x - w / 3, y - hgt, x + w / 3, y - 0.82 * hgt], PERSON, head)


def _outline(x: float, y: float, w: float, h: float, points: Points) -> Points:
    """Points given relative to an object's bottom centre (x, y) and its size (w, h)."""
    return [(x + a * w, y - b * h) for a, b in points]


def _draw_car(s: _Scene, g: _Ground, x: float, y: float, geo: Geometry) -> None:
    """Body, cabin with dark windows and two wheels, seen from behind."""
    hgt = geo.car_size * s.h * g.depth(y) * s.rng.uniform(0.85, 1.15)
    if hgt < 3:
        return
    w = hgt * s.rng.uniform(1.5, 1.9)
    body = s.instance(CAR)
    s.paint("rectangle", [x - w / 2, y - 0.6 * hgt, x + w / 2, y - 0.12 * hgt], CAR, body)
    s.paint("polygon", _outline(x, y, w, hgt, CABIN), CAR, body)
    glass = s.instance(CAR, s.colours[body] * 0.35 + 20)
    s.paint("polygon", _outline(x, y, w, hgt, WINDOW), CAR, glass)
    tyre = s.instance(CAR, TYRE)
    for cx in (x - 0.35 * w, x + 0.35 * w):
        s.paint("rectangle", [cx - 0.1 * w, y - 0.2 * hgt, cx + 0.1 * w, y], CAR, tyre)


_DRAW = {"tree": _draw_tree, "pole": _draw_pole, "person": _draw_person, "car": _draw_car}
# Where things stand on the sidewalk, as a range of multiples of a kerb line.
_SPOTS = {"tree": (1.5, 1.9), "pole": (1.05, 1.3), "person": (1.1, 1.6)}


def _spot(s: _Scene, kind: str, geo: Geometry, kerbs: tuple[float, float]) -> float:
    """The ground line an object of ``kind`` stands on; cars drive or park at the kerb."""
    kerb = kerbs[int(s.rng.integers(2))]
    if kind != "car":
        return kerb * s.rng.uniform(*_SPOTS[kind])
    if s.rng.random() < geo.parked:
        return kerb * 0.82
    return s.rng.uniform(0.6 * kerbs[0], 0.6 * kerbs[1])


def _draw_objects(s: _Scene, g: _Ground, geo: Geometry, kerbs: tuple[float, float]) -> None:
    """Trees, poles, persons and cars at random depths, drawn from far to near."""
    counts = {"tree": geo.n_trees, "pole": geo.n_poles, "person": geo.n_persons}
    todo = []
    for kind, count in {**counts, "car": geo.n_cars}.items():
        for depth in s.rng.uniform(0.08, 1.0, _count(s.rng, count)):
            todo.append((g.yh + (s.h - g.yh) * depth, kind, _spot(s, kind, geo, kerbs)))
    for y, kind, u in sorted(todo):
        _DRAW[kind](s, g, g.x(u, y), y, geo)


def _draw_hood(s: _Scene, hood: float) -> None:
    """The ego vehicle's bonnet at the bottom (an ignore region, as in Cityscapes)."""
    top = s.h * (1 - hood * s.rng.uniform(0.8, 1.2))
    inst = s.instance(CAR, (30, 30, 35))
    s.paint("ellipse", [-0.3 * s.w, top, 1.3 * s.w, s.h + 2 * (s.h - top)], IGNORE_INDEX, inst)


def draw_scene(width: int, height: int, domain: Domain, rng: np.random.Generator) -> _Scene:
    """Lay out one street scene of ``domain`` (labels and instances, no pixels yet)."""
    geo = domain.geometry
    s = _Scene(width, height, domain.appearance, rng)
    g = _Ground(width * rng.uniform(0.4, 0.6), height * _uniform(rng, geo.horizon), width, height)
    _draw_buildings(s, g, geo)
    kerbs = _draw_ground(s, g, geo)
    _draw_objects(s, g, geo, kerbs)
    if geo.hood > 0:
        _draw_hood(s, geo.hood)
    return s


def _noise(rng: np.random.Generator, h: int, w: int, cell: float) -> np.ndarray:
    """Smooth value noise in about [-1, 1] with features of ``cell`` pixels."""
    gh, gw = int(h / cell) + 2, int(w / cell) + 2
    coarse = Image.fromarray(rng.uniform(-1, 1, (gh, gw)).astype(np.float32), mode="F")
    return np.asarray(coarse.resize((w, h), Image.BILINEAR), dtype=np.float32)


def _textures(label: np.ndarray, look: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Additive brightness per pixel: class textures (noise, windows, tiles, clouds)."""
    h, w = label.shape
    scale = w / 256
    out = np.zeros((h, w), dtype=np.float32)
    for cls, cell, amp in ((VEGETATION, 2, 45), (TERRAIN, 3, 25), (ROAD, 1.5, 12),
                           (SKY, 24, 30), (BUILDING, 6, 15), (SIDEWALK, 2, 10)):  # fmt: skip
        mask = label == cls
        out[mask] += look.texture * amp * _noise(rng, h, w, max(1.0, cell * scale))[mask]
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(3, round(look.windows[0] * scale))
    windows = (yy % period < period * 0.5) & (xx % period < period * 0.5) & (label == BUILDING)
    out[windows] += look.windows[1]
    tiles = ((yy % period == 0) | (xx % (2 * period) == 0)) & (label == SIDEWALK)
    out[tiles] -= 30 * look.texture
    return out


def _shadows(s: _Scene, n: int, rng: np.random.Generator) -> np.ndarray:
    """A multiplicative light map with ``n`` cast shadows across the ground."""
    layer = Image.new("L", (s.w, s.h), 0)
    draw = ImageDraw.Draw(layer)
    for _ in range(n):
        y0 = rng.uniform(0.4, 0.9) * s.h
        y1 = y0 + rng.uniform(0.05, 0.25) * s.h
        x0, x1 = sorted(rng.uniform(-0.2, 1.2, 2) * s.w)
        skew = rng.uniform(-0.3, 0.3) * s.w
        draw.polygon([(x0, y0), (x1, y0), (x1 + skew, y1), (x0 + skew, y1)], fill=255)
    ground = np.isin(np.asarray(s.label), (ROAD, SIDEWALK, TERRAIN))
    return 1.0 - 0.45 * (np.asarray(layer, dtype=np.float32) / 255) * ground


def render(s: _Scene, look: Appearance, rng: np.random.Generator) -> np.ndarray:
    """Colour a scene in a domain's style; returns an (H, W, 3) uint8 image."""
    label = np.asarray(s.label)
    img = np.stack(s.colours)[np.asarray(s.inst)]
    img += _textures(label, look, rng)[..., None]
    ramp = np.linspace(-0.5, 0.5, s.h, dtype=np.float32)[:, None] * rng.choice((-1, 1))
    side = np.linspace(-0.5, 0.5, s.w, dtype=np.float32)[None, :] * rng.uniform(-1, 1)
    img *= (1 + look.shading * (ramp + side))[..., None]
    img *= _shadows(s, _count(rng, look.shadows), rng)[..., None]
    gain = _uniform(rng, look.brightness) * (1 + rng.uniform(-look.cast, look.cast, 3))
    img = img * gain.astype(np.float32)
    if look.haze > 0:  # thickest at the horizon row, thinning towards the bottom
        rows = np.linspace(1.0, 0.3, s.h, dtype=np.float32)[:, None, None]
        amount = look.haze * rng.uniform(0.6, 1.2) * rows
        img = img * (1 - amount) + np.float32([150, 150, 165]) * amount
    img = np.clip(img, 0, 255).astype(np.uint8)
    if look.blur > 0:
        radius = look.blur * s.w / 256 * rng.uniform(0.7, 1.3)
        img = np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius)))
    if look.noise > 0:
        img = img + rng.normal(0, look.noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def pick_domain(domain: Domain | tuple[Domain, ...], rng: np.random.Generator) -> Domain:
    """``domain`` itself, or one of a tuple of scene types drawn at random (``--style
    varied``); a single domain draws nothing, so its images stay byte-identical."""
    if isinstance(domain, Domain):
        return domain
    return domain[int(rng.integers(len(domain)))]


def make_sample(
    cfg: BenchmarkConfig, domain: Domain | tuple[Domain, ...], domain_index: int, index: int
) -> tuple[np.ndarray, np.ndarray, str]:
    """One image (H, W, 3 uint8), its Cityscapes labelIds (H, W uint8) and its domain's name."""
    rng = _rng_for(cfg.seed, domain_index, index)
    chosen = pick_domain(domain, rng)
    scene = draw_scene(cfg.width, cfg.height, chosen, rng)
    image = render(scene, chosen.appearance, rng)
    return image, _TO_LABELID[np.asarray(scene.label)], chosen.name


# Train id -> labelId for writing (the ego-vehicle hood is drawn as IGNORE_INDEX), and back.
_TO_LABELID = lookup_table({**TRAINID_TO_LABELID, IGNORE_INDEX: EGO_VEHICLE_LABELID}, 256)
_TO_TRAINID = lookup_table(CITYSCAPES_LABELID_TO_TRAINID, 256)


def _jobs(out: Path, cfg: BenchmarkConfig) -> list[tuple[str, int, Path, Path]]:
    """(split, index, image path, label path) for every file of the benchmark."""
    jobs = []
    for i in range(cfg.n_source):
        name = f"{i + 1:05d}.png"
        jobs.append(("source", i, out / "source/images" / name, out / "source/labels" / name))
    for split, n in (("train", cfg.n_target_train), ("val", cfg.n_target_val)):
        cities = TARGET_CITIES[split]
        for i in range(n):
            city, seq = cities[i % len(cities)], i // len(cities)
            stem = f"{city}/{city}_{seq:06d}_000019"
            jobs.append((split, i, out / f"target/leftImg8bit/{split}/{stem}_leftImg8bit.png",
                         out / f"target/gtFine/{split}/{stem}_gtFine_labelIds.png"))  # fmt: skip
    return jobs


def _check_out(out: Path) -> None:
    """Refuse a file, or a non-empty directory that is not a previous benchmark."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        meta = out / "benchmark.json"
        try:
            ok = json.loads(meta.read_text()).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ok = False
        if not ok:
            raise UserError(f"{out}: directory is not empty and is not a pixcli benchmark")


def _remove_stale(out: Path, written: set[Path]) -> None:
    """Delete PNGs of an earlier, larger benchmark in the same directory."""
    for sub in ("source", "target"):
        for path in (out / sub).rglob("*.png"):
            if path not in written:
                path.unlink()


def make_benchmark(
    out: Path, cfg: BenchmarkConfig, progress: Callable[[int, int], None] | None = None
) -> dict:
    """Write the benchmark into ``out`` and return what ``out/benchmark.json`` records.

    ``progress(done, total)`` is called after every image. Raises :class:`UserError` for a
    non-empty ``out`` that is not a previous benchmark (that one is overwritten).
    """
    if min(cfg.width, cfg.height) < 16:
        raise UserError(f"benchmark images must be at least 16x16, not {cfg.width}x{cfg.height}")
    if cfg.style not in STYLES:
        raise UserError(f"--style {cfg.style}: expected one of {', '.join(STYLES)}")
    source_domain, target_domain = STYLES[cfg.style]
    out = Path(out)
    _check_out(out)
    out.mkdir(parents=True, exist_ok=True)
    meta_path = out / "benchmark.json"
    meta: dict = {"format": FORMAT, "version": 1, "complete": False, "config": asdict(cfg)}
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    jobs = _jobs(out, cfg)
    counts = {split: np.zeros(256, dtype=np.int64) for split in ("source", "train", "val")}
    scene_types: dict[str, dict[str, int]] = {}  # images per split and domain (scene type)
    for done, (split, index, image_path, label_path) in enumerate(jobs, 1):
        domain = source_domain if split == "source" else target_domain
        image, labels, name = make_sample(
            cfg, domain, ("source", "train", "val").index(split), index
        )
        scene_types.setdefault(split, {}).setdefault(name, 0)
        scene_types[split][name] += 1
        counts[split] += np.bincount(_TO_TRAINID[labels].ravel(), minlength=256)
        for path, array in ((image_path, image), (label_path, labels)):
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
        if progress is not None:
            progress(done, len(jobs))
    _remove_stale(out, {p for job in jobs for p in job[2:]})
    present = sorted(
        i for i in range(len(CITYSCAPES_CLASSES)) if any(c[i] for c in counts.values())
    )
    fractions = {
        name: {CITYSCAPES_CLASSES[i]: round(float(c[i] / max(1, c.sum())), 6) for i in present}
        for name, c in (("source", counts["source"]), ("target_train", counts["train"]),
                        ("target_val", counts["val"]))
    }  # fmt: skip
    meta.update(
        complete=True,
        classes=[CITYSCAPES_CLASSES[i] for i in present],
        train_ids=present,
        pixel_fractions=fractions,
        scene_types={k: dict(sorted(v.items())) for k, v in scene_types.items()},
        specs={"source": f"gta5:{out / 'source'}", "target": f"cityscapes:{out / 'target'}"},
    )
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    return meta
