"""Grad-CAM overlays for ``lungxray predict --gradcam``: each image's heatmap drawn on the image,
at a bounded resolution.

An overlay keeps the image's own size up to :data:`MAX_SIDE` pixels on its long side; a larger
image is reduced first (a JPEG decoded at 1/2, 1/4 or 1/8 scale by libjpeg, any image then
shrunk with Pillow), so the arrays built here are at most ``MAX_SIDE``² pixels, uint8 and
float32, whatever the source's size: a 6300² PNG costs what a 1024² one does, apart from
decoding it once (bounded by the data step's limits). Only Pillow, numpy and matplotlib's
colour map are used here; the heatmaps come from :mod:`lungxray.gradcam`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lungxray import images as imaging
from lungxray.errors import DataError, safe_name
from lungxray.pools import Unusable, read_file

MAX_SIDE = 1024  # long side of an overlay, in pixels; larger images are reduced to it
OVERLAY_ALPHA = 0.4  # heatmap weight, as in the evaluation report's Grad-CAM grid


def overlay_name(origin: str) -> str:
    """``sub/a.dcm`` -> ``sub/a.dcm.png``; ``train_images[3]`` -> ``train_images_3.png``.
    The original suffix stays, so ``a.png`` and ``a.jpg`` do not collide."""
    return origin.replace("[", "_").replace("]", "") + ".png"


def bounded(image: Image.Image, channels: int) -> np.ndarray:
    """``image`` grey (channels=1) or RGB, its long side reduced to :data:`MAX_SIDE` at most,
    as uint8 (H, W[, 3])."""
    image = imaging.to_mode(image, channels)
    if max(image.size) > MAX_SIDE:
        image.thumbnail((MAX_SIDE, MAX_SIDE), imaging.RESAMPLE, reducing_gap=2.0)
    return np.asarray(image, dtype=np.uint8)


def source_image(path: Path | None, raw: np.ndarray | None, settings: Any) -> np.ndarray:
    """The image an overlay is drawn on: an ``.npz`` row (``raw``) or the file at ``path``,
    decoded within ``settings.limits`` (JPEG at reduced scale when far larger than
    :data:`MAX_SIDE`), as :func:`bounded` returns it."""
    if raw is not None:
        picture = Image.fromarray(raw[..., 0] if raw.shape[-1] == 1 else raw)
    else:
        try:
            data = read_file(path, settings.limits.max_file_bytes)
        except Unusable as err:  # changed since it was decoded for the prediction
            raise DataError(f"{safe_name(str(path))}: {err}") from None
        picture, _ = imaging.open_image(data, path.name, MAX_SIDE, settings.channels,
                                        settings.limits)
    return bounded(picture, settings.channels)


def _content_box(width: int, height: int, size: int, keep_aspect: bool) -> tuple[int, ...]:
    """Where the image lies in the model input: all of it, or the unpadded part (as PIL's
    ``ImageOps.pad`` places it)."""
    if not keep_aspect or width == height:
        return 0, 0, size, size
    if width > height:
        inner = round(height / width * size)
        top = round((size - inner) * 0.5)
        return 0, top, size, top + inner
    inner = round(width / height * size)
    left = round((size - inner) * 0.5)
    return left, 0, left + inner, size


def overlay(image: np.ndarray, heatmap: np.ndarray, keep_aspect: bool) -> np.ndarray:
    """The heatmap (model size, 0..1) stretched onto ``image`` (uint8, at most
    :data:`MAX_SIDE` on a side, as :func:`bounded` gives it) under a jet colour map, as an RGB
    uint8 array of the image's size; computed in uint8 and float32."""
    import matplotlib

    height, width = image.shape[:2]
    size = heatmap.shape[0]
    cam = Image.fromarray(np.asarray(heatmap, dtype=np.float32))  # 2-D float32: mode "F"
    cam = cam.crop(_content_box(width, height, size, keep_aspect))
    cam = np.clip(np.asarray(cam.resize((width, height), Image.Resampling.BILINEAR)), 0, 1)
    colours = matplotlib.colormaps["jet"](cam, bytes=True)[..., :3]  # uint8 RGB
    base = image if image.ndim == 3 else image[..., None]  # grey broadcasts over RGB
    blended = (np.float32(1 - OVERLAY_ALPHA) * base + np.float32(OVERLAY_ALPHA) * colours)
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_overlays(members: list[Any], pixels: np.ndarray, classes: np.ndarray,
                   entries: list[Any], raws: list[np.ndarray | None], settings: Any,
                   folder: Path) -> list[str]:
    """Grad-CAM of each image's decided class, averaged over ensemble members, drawn on the
    image (an ``Entry`` of lungxray.predict: ``origin`` and ``path``) at its own resolution up
    to :data:`MAX_SIDE`, into ``folder``; returns the overlay paths relative to its parent
    (the output): ``gradcam/<name>.png``."""
    from lungxray import gradcam

    maps = np.mean([gradcam.gradcam(m, pixels, classes) for m in members], axis=0,
                   dtype=np.float32)
    names = []
    for entry, raw, heatmap in zip(entries, raws, maps, strict=True):
        name = overlay_name(entry.origin)
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        picture = overlay(source_image(entry.path, raw, settings), heatmap,
                          settings.keep_aspect)
        Image.fromarray(picture).save(target)
        names.append(target.relative_to(folder.parent).as_posix())
    return names
