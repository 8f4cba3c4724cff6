"""Decode one image file (PNG, JPEG, other PIL formats, DICOM) into a fixed-size uint8 array.

Every image leaves here as ``(size, size, channels)`` uint8, whatever came in: 8 or 16 bit,
grey, RGB, RGBA, palette, EXIF-rotated. Problems with one image raise :class:`ImageError`, whose
message says what is wrong (the caller adds which file), so a caller can collect them all.
"""

from __future__ import annotations

import io
from pathlib import PurePath

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

MIN_SIZE = 8  # smallest side, in pixels, accepted for a source image or a prepared size
RESAMPLE = Image.Resampling.BILINEAR
DICOM_EXTENSIONS = (".dcm", ".dicom")
# PIL modes with more than 8 bits per sample: stretched to 0..255 instead of clipped.
_WIDE_MODES = {"I", "F", "I;16", "I;16L", "I;16B", "I;16N"}


class ImageError(ValueError):
    """One image that cannot be used; the message says why, not where."""


def stretch(array: np.ndarray) -> np.ndarray:
    """Map an array's own min..max linearly onto 0..255 (uint8).

    Used for 16-bit PNG and DICOM pixels: the bits actually used (10, 12, 14 or 16) are not
    recorded reliably in the file, so the image's own range is the only safe scale.
    """
    array = np.asarray(array, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    if high <= low:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - low) * (255.0 / (high - low))).astype(np.uint8)


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


def _open_pil(data: bytes, size: int, channels: int) -> tuple[Image.Image, tuple[int, int]]:
    try:
        image = Image.open(io.BytesIO(data))
        full_size = image.size
        # JPEG only: decode straight at 1/2, 1/4 or 1/8 scale when the target is that much
        # smaller (never below the target); a large speed-up for big scans.
        image.draft("L" if channels == 1 else "RGB", (size, size))
        image.load()  # decodes now, so truncation shows here
        ImageOps.exif_transpose(image, in_place=True)
    except UnidentifiedImageError:
        raise  # an OSError too, but it means "try DICOM", not "corrupt"
    except Image.DecompressionBombError as err:
        raise ImageError(f"too many pixels ({err})") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        raise ImageError(f"corrupt or truncated image ({err})") from err
    return image, full_size


def open_image(data: bytes, name: str, size: int,
               channels: int) -> tuple[Image.Image, tuple[int, int]]:
    """A loaded PIL image from file bytes and its stored (width, height) before any draft
    scaling; DICOM goes through :mod:`lungxray.dicom`."""
    if not data:
        raise ImageError("empty file (0 bytes)")
    from lungxray import dicom

    if PurePath(name).suffix.lower() in DICOM_EXTENSIONS:
        image = dicom.read(data)
        return image, image.size
    try:
        return _open_pil(data, size, channels)
    except UnidentifiedImageError:
        # Not a format PIL knows: DICOM files often carry no extension.
        image = dicom.read(data)
        return image, image.size


def decode(data: bytes, name: str, size: int, channels: int, keep_aspect: bool = False,
           min_size: int = MIN_SIZE) -> np.ndarray:
    """Decode file bytes into a ``(size, size, channels)`` uint8 array.

    ``name`` is only used for its extension; images whose smaller side is below ``min_size``
    are refused, since upscaling them would invent detail.
    """
    image, (width, height) = open_image(data, name, size, channels)
    if min(width, height) < min_size:
        raise ImageError(f"{width}x{height} px, below the minimum of {min_size} px")
    try:
        image = fit(to_mode(image, channels), size, keep_aspect)
    except (OSError, ValueError) as err:  # e.g. LAB or CMYK-with-alpha: PIL cannot convert
        raise ImageError(f"cannot convert {image.mode} image to "
                         f"{'grey' if channels == 1 else 'RGB'} ({err})") from err
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
