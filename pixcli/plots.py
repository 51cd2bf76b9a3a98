"""Scatter plots of 2-D embeddings with Pillow (no matplotlib).

A picture is made of panels (:func:`scatter_panel`: a title and points coloured by class)
and one legend (:func:`legend_image`: a colour swatch and name per class), put side by side
by :func:`side_by_side`. Only the palette colours, black and white appear: points and
swatches are drawn without antialiasing and text with a one-bit font mode, so the colours
in a PNG say exactly which classes it shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pixcli.artifacts import atomic_write

RGB = tuple[int, int, int]
WHITE: RGB = (255, 255, 255)
BLACK: RGB = (0, 0, 0)
MARGIN = 12
LINE = 18  # height of a line of text


@cache
def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's default font (FreeType at 13 px when available, else its bitmap font)."""
    try:
        return ImageFont.load_default(size=13)
    except (TypeError, ImportError):  # Pillow < 10.1, or no FreeType
        return ImageFont.load_default()


def _canvas(width: int, height: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no antialiasing: text is pure black
    return image, draw


def _to_pixels(points: np.ndarray, box: int) -> np.ndarray:
    """Map ``(N, 2)`` points into ``[0, box)`` keeping the aspect ratio, centred."""
    if points.size == 0:
        return np.zeros((0, 2), dtype=np.int64)
    low, high = points.min(axis=0), points.max(axis=0)
    span = float(max(high - low)) or 1.0
    scaled = (points - low) / span * (box - 1)
    scaled += ((box - 1) - scaled.max(axis=0)) / 2  # centre the shorter axis
    return np.rint(scaled).astype(np.int64)


def scatter_panel(
    points: np.ndarray,
    labels: np.ndarray,
    palette: Sequence[RGB],
    title: Sequence[str],
    size: int = 560,
    radius: int = 2,
) -> Image.Image:
    """Points ``(N, 2)`` as dots coloured ``palette[label]`` in a framed square of ``size``
    pixels, under the ``title`` lines. Dots are drawn in a fixed shuffled order, so that no
    class is painted over all the others."""
    top = MARGIN + LINE * len(title)
    image, draw = _canvas(size + 2 * MARGIN, top + size + MARGIN)
    for i, line in enumerate(title):
        draw.text((MARGIN, MARGIN // 2 + LINE * i), line, fill=BLACK, font=_font())
    draw.rectangle([MARGIN - 1, top - 1, MARGIN + size, top + size], outline=BLACK)
    pad = radius + 2
    xy = _to_pixels(np.asarray(points, dtype=np.float64), size - 2 * pad) + pad
    xy[:, 0] += MARGIN
    xy[:, 1] += top
    for i in np.random.default_rng(0).permutation(len(labels)).tolist():
        x, y = int(xy[i, 0]), int(xy[i, 1])
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=palette[labels[i]])
    return image


def legend_image(entries: Sequence[tuple[str, RGB]]) -> Image.Image:
    """A column of colour swatches with their names."""
    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_w = max((int(probe.textlength(name, font=font)) for name, _ in entries), default=0)
    image, draw = _canvas(text_w + LINE + 2 * MARGIN, LINE * len(entries) + 2 * MARGIN)
    for i, (name, colour) in enumerate(entries):
        y = MARGIN + LINE * i
        draw.rectangle([MARGIN, y + 3, MARGIN + 11, y + 14], fill=colour)
        draw.text((MARGIN + LINE, y + 2), name, fill=BLACK, font=font)
    return image


def side_by_side(images: Sequence[Image.Image]) -> Image.Image:
    """Images pasted left to right on white, top-aligned."""
    width = sum(im.width for im in images)
    height = max(im.height for im in images)
    out = Image.new("RGB", (width, height), WHITE)
    x = 0
    for im in images:
        out.paste(im, (x, 0))
        x += im.width
    return out


def save_png(path: Path, image: Image.Image) -> None:
    """Write ``image`` as a PNG, atomically."""
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
