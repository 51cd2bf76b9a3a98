"""The built-in benchmark's domains: where things are (``Geometry``) and how they look
(``Appearance``), one ``Domain`` each, and the ``STYLES`` of ``make-benchmark --style``.

``pixcli.data.benchmark`` draws and writes the scenes; this module is only their settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

ROAD, SIDEWALK, BUILDING, POLE, LIGHT, SIGN = 0, 1, 2, 5, 6, 7
VEGETATION, TERRAIN, SKY, PERSON, CAR = 8, 9, 10, 11, 13

RGB = tuple[int, int, int]
Range = tuple[float, float]


@dataclass(frozen=True)
class Geometry:
    """Where things are: camera and object placement (sizes as fractions of the image)."""

    horizon: Range  # horizon row / height
    road: Range  # half width of the road at the bottom row / width
    sidewalk: Range  # sidewalk width at the bottom row / width
    facade: Range  # how fast facades grow from the vanishing point (height per width)
    n_cars: tuple[int, int]
    parked: float  # fraction of cars parked at the kerb
    car_size: float  # car height at the bottom row / height
    n_persons: tuple[int, int]
    person_size: float
    n_poles: tuple[int, int]
    n_trees: tuple[int, int]
    terrain: float  # probability of a grass verge on a side
    hood: float  # ego-vehicle hood height / height (0: none)


@dataclass(frozen=True)
class Appearance:
    """How things look: colours per train id, textures, light, camera."""

    colours: dict[int, tuple[RGB, ...]]  # choices per train id, one per object instance
    jitter: float  # per-instance colour noise (std, 0-255)
    texture: float  # amplitude of the class textures
    windows: tuple[int, float]  # window period (px at 256 wide), brightness change
    shading: float  # strength of the global light gradient
    brightness: Range
    cast: float  # max per-channel gain deviation (colour cast)
    shadows: tuple[int, int]
    noise: float  # sensor noise std
    blur: float  # Gaussian blur radius (px at 256 wide)
    haze: float = 0.0  # blend towards a grey-blue haze, strongest at the horizon (0: none)


@dataclass(frozen=True)
class Domain:
    """One domain: a name, its geometry and its appearance."""

    name: str
    geometry: Geometry
    appearance: Appearance


SYNTHETIC = Domain(
    "synthetic",
    Geometry(
        horizon=(0.38, 0.50), road=(0.45, 0.65), sidewalk=(0.22, 0.34), facade=(0.25, 0.6),
        n_cars=(1, 4), parked=0.2, car_size=0.32, n_persons=(1, 5), person_size=0.55,
        n_poles=(2, 5), n_trees=(1, 4), terrain=0.5, hood=0.0,
    ),
    Appearance(
        colours={
            ROAD: ((85, 80, 95),), SIDEWALK: ((175, 160, 150),),
            BUILDING: ((185, 120, 85), (205, 185, 140), (150, 150, 170), (130, 95, 75)),
            POLE: ((170, 170, 175), (110, 115, 120)), LIGHT: ((40, 40, 35),),
            SIGN: ((235, 225, 40), (40, 90, 220)),
            VEGETATION: ((45, 165, 45), (70, 185, 40)), TERRAIN: ((150, 205, 80),),
            SKY: ((90, 170, 250), (135, 190, 240)),
            PERSON: ((220, 40, 40), (40, 60, 220), (240, 200, 40), (40, 180, 90), (50, 50, 50),
                     (110, 110, 120), (70, 60, 50)),
            CAR: ((210, 30, 30), (30, 80, 210), (240, 210, 30), (235, 235, 235), (30, 160, 60),
                  (40, 40, 45), (150, 150, 150)),
        },
        jitter=12.0, texture=0.15, windows=(12, 50.0), shading=0.1, brightness=(0.75, 1.2),
        cast=0.06, shadows=(0, 0), noise=1.0, blur=0.0,
    ),
)  # fmt: skip

REAL = Domain(
    "real",
    Geometry(
        horizon=(0.30, 0.42), road=(0.35, 0.5), sidewalk=(0.16, 0.28), facade=(0.35, 0.8),
        n_cars=(2, 6), parked=0.6, car_size=0.26, n_persons=(2, 6), person_size=0.5,
        n_poles=(3, 6), n_trees=(2, 6), terrain=0.35, hood=0.08,
    ),
    Appearance(
        colours={
            ROAD: ((105, 100, 102),), SIDEWALK: ((165, 150, 150),),
            BUILDING: ((130, 120, 110), (160, 150, 135), (100, 100, 108), (175, 165, 155),
                       (165, 125, 100)),
            POLE: ((95, 95, 100),), LIGHT: ((55, 55, 40),),
            SIGN: ((30, 75, 165), (200, 45, 45), (220, 185, 45)),
            VEGETATION: ((70, 130, 50), (55, 110, 60)), TERRAIN: ((120, 140, 70),),
            SKY: ((150, 185, 230), (180, 200, 220)),
            PERSON: ((40, 40, 45), (90, 80, 70), (60, 70, 100), (150, 140, 130), (190, 55, 55),
                     (50, 90, 170), (200, 170, 60)),
            CAR: ((60, 60, 65), (150, 150, 155), (210, 210, 210), (30, 40, 70), (100, 30, 30),
                  (160, 40, 40), (40, 70, 150)),
        },
        jitter=8.0, texture=0.4, windows=(8, -40.0), shading=0.3, brightness=(0.8, 1.1),
        cast=0.08, shadows=(0, 1), noise=4.0, blur=0.6,
    ),
)  # fmt: skip


# The second style (issue 17: recipes are checked on a benchmark they were not tuned on): a
# pastel, low-contrast synthetic source and a hazy dusk target with a lower camera, darker
# light, a blue cast and more noise; the same scene grammar and classes.
PASTEL = Domain(
    "pastel",
    dataclasses.replace(
        SYNTHETIC.geometry, horizon=(0.42, 0.55), road=(0.5, 0.7), n_cars=(1, 3),
        n_persons=(0, 4), n_poles=(1, 4), n_trees=(2, 5),
    ),
    dataclasses.replace(
        SYNTHETIC.appearance,
        colours={
            ROAD: ((120, 115, 135),), SIDEWALK: ((205, 190, 185),),
            BUILDING: ((220, 170, 150), (200, 205, 170), (175, 180, 215), (215, 150, 170)),
            POLE: ((200, 200, 210), (150, 150, 165)), LIGHT: ((70, 70, 60),),
            SIGN: ((250, 240, 120), (120, 150, 250)),
            VEGETATION: ((120, 200, 120), (150, 215, 110)), TERRAIN: ((190, 220, 140),),
            SKY: ((170, 210, 250), (200, 220, 245)),
            PERSON: ((240, 130, 130), (130, 140, 240), (250, 220, 130), (130, 210, 160),
                     (120, 120, 130), (180, 170, 190)),
            CAR: ((240, 120, 120), (120, 160, 240), (250, 230, 120), (245, 245, 245),
                  (130, 200, 150), (110, 110, 120)),
        },
        jitter=10.0, texture=0.08, brightness=(0.9, 1.15),
    ),
)  # fmt: skip

DUSK = Domain(
    "dusk",
    dataclasses.replace(
        REAL.geometry, horizon=(0.26, 0.36), car_size=0.3, n_cars=(2, 7), n_persons=(1, 5),
        n_poles=(2, 5), n_trees=(1, 4), terrain=0.5, hood=0.1,
    ),
    dataclasses.replace(
        REAL.appearance,
        colours={
            **REAL.appearance.colours,
            SKY: ((95, 90, 130), (140, 110, 120), (70, 75, 110)),
            VEGETATION: ((45, 80, 50), (60, 75, 45)), TERRAIN: ((95, 100, 60),),
            BUILDING: ((110, 100, 105), (135, 120, 110), (85, 85, 100), (150, 135, 125)),
        },
        texture=0.5, shading=0.45, brightness=(0.5, 0.8), cast=0.12, shadows=(0, 0),
        noise=7.0, blur=0.9, haze=0.35,
    ),
)  # fmt: skip

# The label-limited style (issue 22: semi-supervised training needs a target that a few
# labelled images do not cover): every target image is one of five scene types, drawn at
# random per image, each with its own layout and its own colours for the same classes, so
# that 10 or 20 labelled images show only a few examples of each type and the unlabelled
# images hold the rest. Cars and persons are smaller than the street target's (car height
# 0.2 of the image at the bottom row, not 0.26; persons 0.38, not 0.5). The source is the
# street benchmark's.
_SMALL_THINGS = dataclasses.replace(REAL.geometry, car_size=0.2, person_size=0.38)
AVENUE = Domain("avenue", _SMALL_THINGS, REAL.appearance)
DOWNTOWN = Domain(
    "downtown",
    dataclasses.replace(
        _SMALL_THINGS, road=(0.25, 0.38), sidewalk=(0.2, 0.32), facade=(0.7, 1.2),
        n_cars=(1, 4), n_persons=(4, 10), n_poles=(5, 9), n_trees=(0, 1), terrain=0.0,
    ),
    dataclasses.replace(
        REAL.appearance,
        colours={
            **REAL.appearance.colours,
            ROAD: ((125, 95, 85),), SIDEWALK: ((120, 120, 135),),
            BUILDING: ((150, 70, 55), (120, 60, 50), (185, 170, 150), (90, 80, 75)),
            POLE: ((40, 60, 45),), SKY: ((200, 205, 210),),
        },
        windows=(6, 45.0), shadows=(1, 3),
    ),
)  # fmt: skip
PARK = Domain(
    "park",
    dataclasses.replace(
        _SMALL_THINGS, horizon=(0.4, 0.5), facade=(0.05, 0.2), n_cars=(0, 2), n_persons=(2, 6),
        n_poles=(1, 3), n_trees=(5, 10), terrain=0.95,
    ),
    dataclasses.replace(
        REAL.appearance,
        colours={
            **REAL.appearance.colours,
            VEGETATION: ((170, 120, 40), (150, 70, 30), (120, 140, 40)),
            TERRAIN: ((160, 150, 80), (90, 120, 50)), SIDEWALK: ((185, 165, 130),),
            SKY: ((110, 160, 235),),
        },
        texture=0.6,
    ),
)  # fmt: skip
HIGHWAY = Domain(
    "highway",
    dataclasses.replace(
        _SMALL_THINGS, horizon=(0.45, 0.55), road=(0.6, 0.8), sidewalk=(0.06, 0.12),
        facade=(0.1, 0.3), n_cars=(5, 10), parked=0.0, n_persons=(0, 1), n_poles=(2, 5),
        n_trees=(0, 3),
    ),
    dataclasses.replace(
        REAL.appearance,
        colours={
            **REAL.appearance.colours,
            ROAD: ((60, 60, 66),), SIDEWALK: ((150, 150, 140),), SKY: ((210, 190, 170),),
        },
        brightness=(0.9, 1.25),
    ),
)  # fmt: skip
NIGHT = Domain(
    "night",
    _SMALL_THINGS,
    dataclasses.replace(
        DUSK.appearance, brightness=(0.3, 0.5), cast=0.15, noise=9.0,
        colours={**DUSK.appearance.colours, SKY: ((25, 30, 60), (40, 35, 50))},
    ),
)  # fmt: skip
SCENE_TYPES: tuple[Domain, ...] = (AVENUE, DOWNTOWN, PARK, HIGHWAY, NIGHT)

# --style: (source, target) domains; a tuple of targets draws one per image
STYLES: dict[str, tuple[Domain, Domain | tuple[Domain, ...]]] = {
    "street": (SYNTHETIC, REAL),
    "dusk": (PASTEL, DUSK),
    "varied": (SYNTHETIC, SCENE_TYPES),
}
