"""A small PNG codec that keeps 16 bits per sample (numpy + zlib only).

Pillow reads 16-bit RGB PNGs as 8-bit RGB (or zeros), which silently destroys SYNTHIA's
labels (class id in the first channel of a 16-bit three-channel PNG). :func:`read_png`
decodes non-interlaced PNGs of bit depth 8 or 16 and colour type gray, gray+alpha, RGB or
RGBA into a numpy array of ``uint8`` or ``uint16``; :func:`write_png` writes them (it is
used by the tests and by anything that must produce SYNTHIA-style labels).

PNG filters (spec section 9) predict each byte from the byte ``bpp`` to the left (a), the
byte above (b) and the byte above-left (c). Sub and Up are vectorised row by row; Average
and Paeth depend on the just-decoded left neighbour, so images using them are decoded along
anti-diagonals (a wavefront): every pixel of one diagonal depends only on the two previous
diagonals, so each step is a handful of numpy operations over at most ``height`` pixels.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pixcli.errors import UserError

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> samples per pixel (palette images, type 3, are not supported)
_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


def _paeth(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """The Paeth predictor on int16 arrays."""
    p = a + b - c
    pa, pb, pc = np.abs(p - a), np.abs(p - b), np.abs(p - c)
    return np.where((pa <= pb) & (pa <= pc), a, np.where(pb <= pc, b, c))


def _predict(ftype: np.ndarray, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Prediction of filter types ``ftype`` (broadcast against a, b, c: int16 arrays)."""
    zero = np.zeros_like(a)
    return np.choose(ftype, (zero, a, b, (a + b) >> 1, _paeth(a, b, c)))


def _shift(x: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """``x`` moved down by ``rows`` and right by ``cols``, zero-filled (int16)."""
    out = np.zeros(x.shape, dtype=np.int16)
    out[rows:, cols:] = x[: x.shape[0] - rows, : x.shape[1] - cols]
    return out


def _filter(data: np.ndarray, ftypes: np.ndarray, bpp: int) -> np.ndarray:
    """Apply per-row filters to raw scanline bytes (h, rowbytes) -> filtered uint8 bytes."""
    x = data.astype(np.int16)
    pred = _predict(ftypes[:, None], _shift(x, 0, bpp), _shift(x, 1, 0), _shift(x, 1, bpp))
    return ((x - pred) & 0xFF).astype(np.uint8)


def _unfilter_rows(filtered: np.ndarray, ftypes: np.ndarray, bpp: int) -> np.ndarray:
    """Undo filters None/Sub/Up one row at a time (each row fully vectorised)."""
    out = np.empty_like(filtered)
    prev = np.zeros(filtered.shape[1], dtype=np.uint8)
    for r, ftype in enumerate(ftypes):
        row = filtered[r]
        if ftype == 1:
            row = row.reshape(-1, bpp).cumsum(axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:
            row = row + prev
        out[r] = prev = row
    return out


def _unfilter_wavefront(filtered: np.ndarray, ftypes: np.ndarray, bpp: int) -> np.ndarray:
    """Undo any mix of filters along anti-diagonals of pixels.

    ``skew[d + 2, r + 1]`` holds pixel (r, c = d - r); row 0 and diagonals 0, 1 are zero
    padding, as is every position with c outside the image, so the left (d-1, r), upper
    (d-1, r-1) and upper-left (d-2, r-1) neighbours are plain slices.
    """
    h, rowbytes = filtered.shape
    w = rowbytes // bpp
    pixels = filtered.reshape(h, w, bpp).astype(np.int16)
    rows, cols = np.indices((h, w))
    skew = np.zeros((h + w + 1, h + 1, bpp), dtype=np.int16)
    raw = np.zeros_like(skew)
    raw[rows + cols + 2, rows + 1] = pixels
    types = ftypes.astype(np.intp)[:, None]
    for d in range(h + w - 1):
        lo, hi = max(0, d - w + 1), min(h, d + 1)  # rows present on this diagonal
        a = skew[d + 1, lo + 1 : hi + 1]
        b = skew[d + 1, lo:hi]
        c = skew[d, lo:hi]
        pred = _predict(types[lo:hi], a, b, c)
        skew[d + 2, lo + 1 : hi + 1] = (raw[d + 2, lo + 1 : hi + 1] + pred) & 0xFF
    return skew[rows + cols + 2, rows + 1].astype(np.uint8).reshape(h, rowbytes)


def _unfilter(filtered: np.ndarray, ftypes: np.ndarray, bpp: int) -> np.ndarray:
    """Undo PNG filtering; the fast row path when no Average/Paeth row is present."""
    if ftypes.size and int(ftypes.max()) <= 2:
        return _unfilter_rows(filtered, ftypes, bpp)
    return _unfilter_wavefront(filtered, ftypes, bpp)


def _chunks(data: bytes, path: Path) -> list[tuple[bytes, bytes]]:
    """Split a PNG file into (type, payload) chunks, checking signature and CRCs."""
    if not data.startswith(PNG_SIGNATURE):
        raise UserError(f"{path}: not a PNG file")
    chunks, pos = [], len(PNG_SIGNATURE)
    while pos + 12 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        if pos + 12 + length > len(data):
            break
        kind, payload = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + payload) != crc:
            raise UserError(f"{path}: corrupt PNG (bad {kind.decode('latin-1')} chunk)")
        chunks.append((kind, payload))
        if kind == b"IEND":
            return chunks
        pos += 12 + length
    raise UserError(f"{path}: corrupt PNG (truncated, no IEND chunk)")


def read_png(path: Path) -> np.ndarray:
    """Decode a PNG keeping its bit depth: (H, W) for gray, (H, W, C) otherwise.

    Returns ``uint16`` for 16-bit files and ``uint8`` for 8-bit files. Raises
    :class:`UserError` for corrupt files and for formats outside the supported set
    (palette, bit depths below 8, interlacing).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror})") from exc
    chunks = _chunks(data, path)
    if not chunks or chunks[0][0] != b"IHDR" or len(chunks[0][1]) != 13:
        raise UserError(f"{path}: corrupt PNG (no IHDR chunk)")
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    if colour not in _CHANNELS or depth not in (8, 16) or interlace:
        raise UserError(
            f"{path}: unsupported PNG format (colour type {colour}, bit depth {depth}, "
            f"interlace {interlace}); expected 8/16-bit gray, RGB or RGBA, not interlaced"
        )
    channels, sample_bytes = _CHANNELS[colour], depth // 8
    rowbytes = w * channels * sample_bytes
    try:
        raw = zlib.decompress(b"".join(p for k, p in chunks if k == b"IDAT"))
    except zlib.error as exc:
        raise UserError(f"{path}: corrupt PNG image data ({exc})") from exc
    if len(raw) != h * (rowbytes + 1):
        raise UserError(f"{path}: corrupt PNG (image data has the wrong length)")
    lines = np.frombuffer(raw, dtype=np.uint8).reshape(h, rowbytes + 1)
    ftypes = lines[:, 0]
    if ftypes.size and int(ftypes.max()) > 4:
        raise UserError(f"{path}: corrupt PNG (unknown filter type {int(ftypes.max())})")
    pixels = _unfilter(lines[:, 1:], ftypes, channels * sample_bytes)
    dtype = np.dtype(">u2") if depth == 16 else np.dtype(np.uint8)
    out = pixels.view(dtype).reshape(h, w, channels).astype(dtype.newbyteorder("="))
    return out[:, :, 0] if channels == 1 else out


def _chunk(kind: bytes, payload: bytes) -> bytes:
    """One length-type-payload-CRC chunk."""
    crc = zlib.crc32(kind + payload)
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def encode_png(array: np.ndarray, filters: int | Sequence[int] = 0) -> bytes:
    """Encode a ``uint8``/``uint16`` array of shape (H, W) or (H, W, C), C in 1..4, as PNG.

    ``filters`` is the filter type (0-4) of every row, or a sequence cycled over rows.
    """
    array = np.asarray(array)
    if array.dtype not in (np.uint8, np.uint16):
        raise ValueError(f"encode_png: dtype {array.dtype} is not uint8 or uint16")
    if array.ndim == 2:
        array = array[:, :, None]
    h, w, channels = array.shape
    colour = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    depth = 8 * array.dtype.itemsize
    data = array.astype(array.dtype.newbyteorder(">")).view(np.uint8).reshape(h, -1)
    pattern = [filters] if isinstance(filters, int) else list(filters)
    ftypes = np.resize(np.asarray(pattern, dtype=np.intp), h)
    filtered = _filter(data, ftypes, channels * array.dtype.itemsize)
    lines = np.concatenate([ftypes.astype(np.uint8)[:, None], filtered], axis=1)
    header = struct.pack(">IIBBBBB", w, h, depth, colour, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(lines.tobytes(), 6))
        + _chunk(b"IEND", b"")
    )


def write_png(path: Path, array: np.ndarray, filters: int | Sequence[int] = 0) -> None:
    """Write ``array`` as a PNG keeping 16-bit samples (see :func:`encode_png`)."""
    Path(path).write_bytes(encode_png(array, filters))
