"""DICOM pixels as a display-ready 8-bit PIL image, through pydicom.

The rescale (modality LUT) and the VOI LUT or window the file asks for are applied with
pydicom's own functions, then the result is mapped onto 0..255; MONOCHROME1 (white = low
values) is inverted so every image comes out with MONOCHROME2's "bright = dense" convention.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from lungxray.images import ImageError, stretch


def read(data: bytes) -> Image.Image:
    """Decode a DICOM file's bytes into an ``L`` (or ``RGB``) PIL image."""
    import pydicom  # only when a file is DICOM (or nothing PIL can read)
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as err:
        raise ImageError("not an image: neither a format PIL can read nor DICOM") from err
    except (OSError, ValueError, EOFError, KeyError, TypeError) as err:
        raise ImageError(f"corrupt DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise ImageError("DICOM file without pixel data")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported")
    try:
        pixels = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        if int(ds.get("SamplesPerPixel", 1)) == 1:
            pixels = apply_voi_lut(apply_modality_lut(pixels, ds), ds)
    except (ValueError, AttributeError, KeyError, NotImplementedError, RuntimeError,
            TypeError) as err:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax or "unknown transfer syntax")
        raise ImageError(f"cannot decode DICOM pixel data ({name}): {err}") from err
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB (pydicom already converted YBR)
        rgb = pixels if pixels.dtype == np.uint8 else stretch(pixels)
        return Image.fromarray(rgb, mode="RGB")
    if pixels.ndim != 2:
        raise ImageError(f"unsupported DICOM pixel array shape {pixels.shape}")
    # After the window, the image's own range is the window's range whenever some pixels fall
    # outside it (collimation, air), which is the norm for radiographs.
    grey = stretch(pixels)
    if photometric == "MONOCHROME1":
        grey = 255 - grey
    return Image.fromarray(grey, mode="L")
