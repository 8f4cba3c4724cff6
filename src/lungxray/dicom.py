"""DICOM pixels as a display-ready 8-bit PIL image, through pydicom.

The rescale (modality LUT) and the VOI LUT or window the file asks for are applied with
pydicom's own functions, then the result is mapped onto 0..255; MONOCHROME1 (white = low
values) is inverted so every image comes out with MONOCHROME2's "bright = dense" convention.

The header is checked before the pixel data is touched: Rows x Columns x frames x bytes per
pixel must fit the limits, and a Deflated file may not inflate beyond ``max_image_bytes``
(pydicom inflates the whole data set at once, so its size is counted first, a chunk at a time).
"""

from __future__ import annotations

import io
import warnings
import zlib

import numpy as np
from PIL import Image

from lungxray.errors import quote
from lungxray.limits import DEFAULT, Limits
from lungxray.pixels import ImageError, Probed, check_pixels, describe, stretch

EXTENSIONS = (".dcm", ".dicom")  # names read as DICOM whatever PIL thinks; others as a fallback
_HEADER_SLACK = 16 << 20  # bytes a data set may hold beside its pixels (overlays, private tags)
_INFLATE_STEP = 1 << 20
# pydicom warns about every odd value it reads (and still reads it); a file it cannot use is
# reported as that file's one-line problem, so its warnings would only add lines to the log.
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")


def _inflated_size(data: bytes, offset: int, limit: int) -> int:
    """Bytes the raw deflate stream from ``offset`` inflates to, counted a MiB at a time and
    stopped once above ``limit``: memory stays at one step, whatever the stream declares."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, data[offset:]
    while pending and total <= limit:
        total += len(inflater.decompress(pending, _INFLATE_STEP))
        pending = inflater.unconsumed_tail
    return total


def _check_deflated(data: bytes, limits: Limits) -> None:
    """A Deflated Explicit VR file may not inflate beyond what its pixels may take."""
    import pydicom
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # noqa: BLE001 - not a file with a meta group: dcmread says why
        return
    if meta.get("TransferSyntaxUID") != pydicom.uid.DeflatedExplicitVRLittleEndian:
        return
    limit = limits.max_image_bytes + _HEADER_SLACK
    try:
        size = _inflated_size(data, fp.tell(), limit)
    except zlib.error as err:
        raise ImageError(f"corrupt Deflated DICOM ({describe(err)})") from err
    if size > limit:
        raise ImageError(f"Deflated DICOM inflates to more than {limit:,} bytes "
                         f"(max_image_bytes + {_HEADER_SLACK >> 20} MiB)")


def _number(ds, keyword: str, default: int) -> int:
    """An integer header value; junk such as NumberOfFrames = "x" is this file's error."""
    try:
        value = ds.get(keyword, default)
        return default if value in (None, "") else int(value)
    except Exception as err:  # noqa: BLE001 - pydicom converts lazily and may raise anything
        raise ImageError(f"DICOM {keyword} is not a number ({describe(err)})") from err


def _read_dataset(data: bytes, limits: Limits):
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_deflated(data, limits)
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as err:
        raise ImageError("not an image: neither a format PIL can read nor DICOM") from err
    except Exception as err:  # noqa: BLE001 - ValueError, RecursionError (deep sequences), ...
        raise ImageError(f"corrupt DICOM file ({describe(err)})") from err


def probe(data: bytes, limits: Limits = DEFAULT) -> Probed:
    """Read a DICOM file's header and check its declared size; ``load`` decodes the pixels."""
    ds = _read_dataset(data, limits)
    try:
        has_pixels = "PixelData" in ds
    except Exception as err:  # noqa: BLE001
        raise ImageError(f"corrupt DICOM file ({describe(err)})") from err
    if not has_pixels:
        raise ImageError("DICOM file without pixel data")
    rows, columns = _number(ds, "Rows", 0), _number(ds, "Columns", 0)
    frames = _number(ds, "NumberOfFrames", 1) or 1
    samples, bits = _number(ds, "SamplesPerPixel", 1), _number(ds, "BitsAllocated", 16)
    if frames > 1:
        raise ImageError(f"multi-frame DICOM ({frames} frames) is not supported")
    if not (1 <= samples <= 4 and 1 <= bits <= 64):
        raise ImageError(f"DICOM with {samples} samples of {bits} bits is not supported")
    per_pixel = samples * -(-bits // 8)
    check_pixels(columns, rows, limits, frames, per_pixel)
    # The decoded array, the float blocks of the LUTs and the 8-bit result.
    cost = len(data) + rows * columns * max(per_pixel, 2) * 3
    return Probed(columns, rows, cost, lambda: _pixels(ds))


def _pixels(ds) -> Image.Image:
    """The checked data set's pixels as an 8-bit PIL image."""
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    try:
        pixels = ds.pixel_array
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
        grey = int(ds.get("SamplesPerPixel", 1)) == 1
    except Exception as err:  # noqa: BLE001 - every pixel decoder failure is this file's
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", syntax or "unknown transfer syntax")
        raise ImageError(f"cannot decode DICOM pixel data ({quote(name)}): "
                         f"{describe(err)}") from err
    if pixels.ndim == 3 and pixels.shape[-1] == 3:  # RGB (pydicom already converted YBR)
        rgb = pixels if pixels.dtype == np.uint8 else stretch(pixels)
        return Image.fromarray(rgb, mode="RGB")
    if pixels.ndim != 2:
        raise ImageError(f"unsupported DICOM pixel array shape {pixels.shape}")

    def display(block: np.ndarray) -> np.ndarray:
        # Rescale then window, a block of rows at a time: pydicom returns float64 arrays.
        return apply_voi_lut(apply_modality_lut(block, ds), ds) if grey else block

    # After the window, the image's own range is the window's range whenever some pixels fall
    # outside it (collimation, air), which is the norm for radiographs.
    try:
        grey_pixels = stretch(pixels, display)
    except Exception as err:  # noqa: BLE001 - a malformed LUT raises anything
        raise ImageError(f"cannot apply the DICOM rescale or window ({describe(err)})") from err
    if photometric == "MONOCHROME1":
        np.subtract(255, grey_pixels, out=grey_pixels)
    return Image.fromarray(grey_pixels, mode="L")
