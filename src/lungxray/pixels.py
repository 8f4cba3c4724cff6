"""What every image decoder shares: the error, the probed header, size check and 8-bit stretch.

:mod:`lungxray.dicom` builds on this module alone; :mod:`lungxray.images` (PIL formats) builds on
it and calls :func:`lungxray.dicom.probe` for DICOM files, so imports go one way.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from lungxray.errors import QUOTE_LIMIT, DataError
from lungxray.limits import Limits

# Elements converted to float64 at once by stretch: 8 MiB, never a full-image float copy.
_BLOCK_ELEMENTS = 1 << 20


class ImageError(DataError):
    """One image that cannot be used; the message says why, not where."""


@dataclass
class Probed:
    """An image whose header was read and checked; ``load`` decodes its pixels."""

    width: int
    height: int
    cost: int  # estimated bytes while decoding and converting
    load: Callable[[], Image.Image]


def describe(err: BaseException) -> str:
    """``str(err)`` on one line and cut, with the kind when it says more than a plain
    OSError/ValueError: the "why" of an ImageError raised for a decoder's exception."""
    text = " ".join(str(err).split())  # one line
    if len(text) > QUOTE_LIMIT:
        text = f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"
    if type(err) in (OSError, ValueError, SyntaxError):
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


def check_pixels(width: int, height: int, limits: Limits, frames: int = 1,
                 bytes_per_pixel: int = 1) -> None:
    """Refuse an image whose declared size is over the limits, before decoding it."""
    if width <= 0 or height <= 0:
        raise ImageError(f"declares an empty image ({width}x{height} px)")
    if width * height > limits.max_image_pixels:
        raise ImageError(f"{width}x{height} = {width * height:,} pixels, above the limit of "
                         f"{limits.max_image_pixels:,} (max_image_pixels)")
    decoded = width * height * frames * bytes_per_pixel
    if decoded > limits.max_image_bytes:
        raise ImageError(f"{width}x{height} px x {frames} frame(s) x {bytes_per_pixel} bytes = "
                         f"{decoded:,} decoded bytes, above the limit of "
                         f"{limits.max_image_bytes:,} (max_image_bytes)")


def _row_blocks(array: np.ndarray) -> Iterator[slice]:
    """Slices along the first axis of about _BLOCK_ELEMENTS elements each."""
    per_row = max(1, math.prod(array.shape[1:]))
    step = max(1, _BLOCK_ELEMENTS // per_row)
    for start in range(0, len(array), step):
        yield slice(start, start + step)


def _finite_range(block: np.ndarray) -> tuple[float, float] | None:
    if block.dtype.kind == "f":
        block = block[np.isfinite(block)]
    return (float(block.min()), float(block.max())) if block.size else None


def stretch(array: np.ndarray,
            transform: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
    """Map an array's own min..max linearly onto 0..255 (uint8), after ``transform`` (applied
    per block, e.g. a DICOM rescale and window).

    Used for 16-bit PNG and DICOM pixels: the bits actually used (10, 12, 14 or 16) are not
    recorded reliably in the file, so the image's own range is the only safe scale. Works a
    block of rows at a time, so no float64 copy of the whole image is ever made; NaN and
    infinities (float pixel data) count as the range's ends.
    """
    array = np.asarray(array)
    if array.ndim == 0:
        array = array.reshape(1)
    convert = transform or (lambda block: block)
    ranges = [r for s in _row_blocks(array)
              if (r := _finite_range(np.asarray(convert(array[s])))) is not None]
    out = np.zeros(array.shape, dtype=np.uint8)
    if not ranges:
        return out
    low, high = min(r[0] for r in ranges), max(r[1] for r in ranges)
    if high <= low:
        return out
    scale = 255.0 / (high - low)
    for s in _row_blocks(array):
        block = np.array(convert(array[s]), dtype=np.float64)  # one block-sized copy, reused
        np.nan_to_num(block, copy=False, nan=low, posinf=high, neginf=low)
        np.subtract(block, low, out=block)
        np.multiply(block, scale, out=block)
        np.clip(np.round(block, out=block), 0, 255, out=block)
        out[s] = block
    return out
