"""Decode one image file (PNG, JPEG, other PIL formats, DICOM) into a fixed-size uint8 array.

Every image leaves here as ``(size, size, channels)`` uint8, whatever came in: 8 or 16 bit,
grey, RGB, RGBA, palette, EXIF-rotated. Problems with one image raise :class:`ImageError`, whose
message says what is wrong (the caller adds which file), so a caller can collect them all.

Decoding runs in two steps: :func:`probe` reads only the header and checks the declared size
against the :class:`~lungxray.limits.Limits` (pixels, decoded bytes), then the pixels are
decoded while a :class:`Budget` holds the estimated memory, so that workers together stay
within ``max_decode_bytes`` whatever the files declare.
"""

from __future__ import annotations

import io
import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from lungxray import dicom
from lungxray.errors import quote
from lungxray.limits import DEFAULT, Limits
from lungxray.pixels import ImageError, Probed, check_pixels, describe, stretch

MIN_SIZE = 8  # smallest side, in pixels, accepted for a source image or a prepared size
RESAMPLE = Image.Resampling.BILINEAR
# PIL modes with more than 8 bits per sample: stretched to 0..255 instead of clipped.
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}
# Copies of the decoded pixels alive at once while converting (decoded, array, 8 bit, resized).
_COPIES = 4
# max_image_pixels is checked right after the header (and is lower), so PIL's own warning for
# large images only adds lines to the log.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow warns about damaged metadata it skips (TIFF tags, EXIF); a file it cannot use becomes
# that file's one-line problem, so the warnings would only add lines to the log.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")


class Budget:
    """Bytes that decodes running at the same time may hold; a decode waits until its
    estimate fits. One image above the whole budget still runs, alone."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0
        self._free = threading.Condition()

    @contextmanager
    def hold(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, min(nbytes, self.total))
        with self._free:
            while self.used and self.used + nbytes > self.total:
                self._free.wait()
            self.used += nbytes
        try:
            yield
        finally:
            with self._free:
                self.used -= nbytes
                self._free.notify_all()


def to_mode(image: Image.Image, channels: int) -> Image.Image:
    """Convert to ``L`` (channels=1) or ``RGB`` (3), handling wide, alpha and palette modes."""
    if image.mode in _WIDE_MODES:
        image = Image.fromarray(stretch(np.asarray(image)), mode="L")
    elif image.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in image.info:
        # Transparent pixels become black (the usual X-ray background) instead of keeping
        # whatever colour happens to sit under a zero alpha.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def fit(image: Image.Image, size: int, keep_aspect: bool = False) -> Image.Image:
    """Resize to ``size``×``size``; with ``keep_aspect`` scale the long side and pad with black."""
    if keep_aspect:
        if image.size == (size, size):
            return image
        return ImageOps.pad(image, (size, size), method=RESAMPLE, color=0)
    return image if image.size == (size, size) else image.resize((size, size), RESAMPLE)


def _bytes_per_pixel(image: Image.Image) -> int:
    """Bytes per decoded pixel of a PIL mode (``I``/``F`` 4 per band, ``I;16`` 2)."""
    per_band = 4 if image.mode in ("I", "F") else 2 if image.mode.startswith("I;16") else 1
    return max(1, len(image.getbands())) * per_band


def _probe_pil(data: bytes, size: int, channels: int, limits: Limits) -> Probed:
    """Header of a PIL-readable image, checked; decoding waits for ``load``."""
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        per_pixel = _bytes_per_pixel(image)
    except UnidentifiedImageError:
        raise  # an OSError too, but it means "try DICOM", not "corrupt"
    except Image.DecompressionBombError as err:
        raise ImageError(f"too many pixels ({quote(err)})") from err
    except Exception as err:  # noqa: BLE001 - a plugin may raise anything on a hostile header
        raise ImageError(f"corrupt or truncated image ({describe(err)})") from err
    check_pixels(width, height, limits, bytes_per_pixel=per_pixel)

    def load() -> Image.Image:
        try:
            # JPEG only: decode straight at 1/2, 1/4 or 1/8 scale when the target is that much
            # smaller (never below the target); a large speed-up for big scans.
            image.draft("L" if channels == 1 else "RGB", (size, size))
            image.load()  # decodes now, so truncation shows here
            ImageOps.exif_transpose(image, in_place=True)
        except Image.DecompressionBombError as err:
            raise ImageError(f"too many pixels ({quote(err)})") from err
        except Exception as err:  # noqa: BLE001 - NotImplementedError, OSError, ... all "bad file"
            raise ImageError(f"corrupt or truncated image ({describe(err)})") from err
        return image

    return Probed(width, height, width * height * per_pixel * _COPIES + len(data), load)


def probe(data: bytes, name: str, size: int, channels: int,
          limits: Limits = DEFAULT) -> Probed:
    """Read and check an image's header (PIL formats or DICOM) without decoding its pixels."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    if PurePath(name).suffix.lower() in dicom.EXTENSIONS:
        return dicom.probe(data, limits)
    try:
        return _probe_pil(data, size, channels, limits)
    except UnidentifiedImageError:
        # Not a format PIL knows: DICOM files often carry no extension.
        return dicom.probe(data, limits)


def open_image(data: bytes, name: str, size: int, channels: int,
               limits: Limits = DEFAULT) -> tuple[Image.Image, tuple[int, int]]:
    """A loaded PIL image from file bytes and its stored (width, height) before any draft
    scaling; DICOM goes through :mod:`lungxray.dicom`."""
    probed = probe(data, name, size, channels, limits)
    return probed.load(), (probed.width, probed.height)


_NO_BUDGET = Budget(1 << 62)


def decode(data: bytes, name: str, size: int, channels: int, keep_aspect: bool = False,
           min_size: int = MIN_SIZE, limits: Limits = DEFAULT,
           budget: Budget | None = None) -> np.ndarray:
    """Decode file bytes into a ``(size, size, channels)`` uint8 array.

    ``name`` is only used for its extension; images whose smaller side is below ``min_size``
    are refused, since upscaling them would invent detail. Whatever a decoder raises on this
    file (NotImplementedError, RecursionError, MemoryError, ...) becomes an ImageError: one bad
    file never stops the others.
    """
    try:
        return _decode(data, name, size, channels, keep_aspect, min_size, limits,
                       budget or _NO_BUDGET)
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder failure is this file's problem
        raise ImageError(f"cannot decode ({describe(err)})") from err


def _decode(data: bytes, name: str, size: int, channels: int, keep_aspect: bool,
            min_size: int, limits: Limits, budget: Budget) -> np.ndarray:
    probed = probe(data, name, size, channels, limits)
    width, height = probed.width, probed.height
    if min(width, height) < min_size:
        raise ImageError(f"{width}x{height} px, below the minimum of {min_size} px")
    with budget.hold(probed.cost):
        image = probed.load()
        try:
            image = fit(to_mode(image, channels), size, keep_aspect)
        except (OSError, ValueError) as err:  # e.g. LAB or CMYK-with-alpha: PIL cannot convert
            raise ImageError(f"cannot convert {image.mode} image to "
                             f"{'grey' if channels == 1 else 'RGB'} ({describe(err)})") from err
        return np.asarray(image, dtype=np.uint8).reshape(size, size, channels)


def convert_array(images: np.ndarray, size: int, channels: int,
                  keep_aspect: bool = False) -> np.ndarray:
    """Bring a chunk of ``(N, H, W, 1|3)`` uint8 images to ``(N, size, size, channels)``."""
    if images.shape[1:] == (size, size, channels):
        return images
    if images.shape[1:3] == (size, size) and images.shape[-1] == 1 and channels == 3:
        return np.repeat(images, 3, axis=-1)
    out = np.empty((len(images), size, size, channels), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        # Grey→RGB through PIL too, so npz and folder sources give identical pixels.
        out[i] = np.asarray(fit(to_mode(pil, channels), size, keep_aspect)).reshape(
            size, size, channels)
    return out
