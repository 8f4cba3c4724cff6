"""Robustness to acquisition shift: a fixed, seeded suite of image corruptions and the AUC under it.

The corruptions follow MedMNIST-C's categories (Di Salvo et al., 2024) for chest X-rays:
exposure (brightness, contrast, gamma), detector noise, focus (blur), storage (JPEG, pixelation,
lower resolution) and positioning (zoom-out with a black frame, crop, small rotation), each at
three severities scaled to the image size so that 28 px and 224 px images see the same shift.
Inverted polarity (a MONOCHROME1 file read as MONOCHROME2) is reported on its own and left out
of the summary: it is a reader bug (``lungxray.dicom`` already inverts MONOCHROME1), not a
shift a model should be selected to tolerate, and its near-zero AUC would swamp the mean.

Everything is NumPy or per-image Pillow on uint8 batches (N, H, W, C), deterministic for a seed,
and processed a chunk at a time so at most ``chunk`` corrupted copies exist at once.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter

from lungxray import metrics
from lungxray.errors import ConfigError, DataError
from lungxray.schema import DEFAULTS

SEVERITIES = (1, 2, 3)
# Per corruption, the parameter at severity 1, 2, 3 (units in each function's docstring).
LEVELS: dict[str, tuple[float, float, float]] = {
    "brightness": (0.10, 0.20, 0.30),  # fraction of 255 added or removed
    "contrast": (0.75, 0.50, 0.30),  # factor on the distance to the image mean
    "gamma": (1.30, 1.70, 2.20),  # exponent, or its inverse
    "gaussian_noise": (0.03, 0.06, 0.10),  # std as a fraction of 255
    "blur": (0.5, 1.0, 1.5),  # Gaussian radius in pixels of a 28 px image
    "jpeg": (30, 15, 8),  # JPEG quality
    "pixelate": (0.75, 0.50, 0.35),  # fraction of the side kept (nearest-neighbour up)
    "low_resolution": (0.75, 0.50, 0.35),  # fraction of the side kept (bilinear up)
    "zoom_out": (0.90, 0.80, 0.70),  # fraction of the side the image keeps in a black frame
    "crop": (0.90, 0.80, 0.70),  # fraction of the side kept, centred, scaled back up
    "rotation": (5.0, 10.0, 15.0),  # degrees, either direction
    "invert": (1.0, 1.0, 1.0),  # no severity: 255 - x
}
CORRUPTIONS = tuple(LEVELS)
SANITY_ONLY = frozenset({"invert"})  # reported, never in the mean or the worst case
DEFAULT_SAMPLES = DEFAULTS.robustness_samples  # images per split; the run parameter's default
DEFAULT_CHUNK = 512
CLEAN = "clean"
REFERENCE_SIDE = 28  # the pixel parameters above are for this side; scaled for others
TTA_VIEWS = ("identity", "shift_left", "shift_right", "shift_up", "shift_down", "zoom_in")


# --------------------------------------------------------------------------- corruptions


def _per_image(images: np.ndarray, op: Callable[[Image.Image, int], Image.Image]) -> np.ndarray:
    """Apply a Pillow operation to each image ("L" for one channel, "RGB" for three)."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        grey = img.shape[-1] == 1
        pil = Image.fromarray(img[..., 0] if grey else img)
        res = np.asarray(op(pil, i))
        out[i] = res[..., None] if grey else res
    return out


def _signs(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.choice(np.array([-1.0, 1.0]), size=n)


def _resize(img: Image.Image, side: tuple[int, int], resample: int) -> Image.Image:
    return img.resize(side, resample=resample)


def corrupt(images: np.ndarray, name: str, severity: int, seed: int = 0) -> np.ndarray:
    """``images`` (N, H, W, C) uint8 with corruption ``name`` at ``severity`` (1..3); a new
    array of the same shape. Random parts (noise, directions) depend only on ``seed``,
    ``name`` and ``severity``, so the same call gives the same images."""
    if name not in LEVELS:
        raise ConfigError(f"unknown corruption {name!r}; known: {', '.join(CORRUPTIONS)}")
    if severity not in SEVERITIES:
        raise ConfigError(f"corruption severity must be one of {SEVERITIES}, got {severity}")
    x = np.asarray(images)
    if x.ndim != 4 or x.dtype != np.uint8 or x.shape[-1] not in (1, 3):
        raise DataError(f"corrupt needs uint8 images (N, H, W, 1|3), got {x.dtype} {x.shape}")
    level = LEVELS[name][severity - 1]
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name), severity])
    n, h, w = x.shape[:3]
    scale = min(h, w) / REFERENCE_SIDE
    f = x.astype(np.float32)
    if name == "brightness":
        out = f + (_signs(rng, n) * level * 255.0)[:, None, None, None]
    elif name == "contrast":
        mean = f.mean(axis=(1, 2, 3), keepdims=True)
        out = mean + level * (f - mean)
    elif name == "gamma":
        exponent = np.where(_signs(rng, n) > 0, level, 1.0 / level)[:, None, None, None]
        out = 255.0 * (f / 255.0) ** exponent
    elif name == "gaussian_noise":
        out = f + rng.normal(0.0, level * 255.0, size=f.shape).astype(np.float32)
    elif name == "invert":
        return (255 - x).astype(np.uint8)
    else:
        return _geometric(x, name, level, scale, rng)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _geometric(x: np.ndarray, name: str, level: float, scale: float,
               rng: np.random.Generator) -> np.ndarray:
    """The per-image Pillow corruptions (blur, storage, positioning)."""
    h, w = x.shape[1:3]
    if name == "blur":
        radius = level * scale
        return _per_image(x, lambda im, i: im.filter(ImageFilter.GaussianBlur(radius)))
    if name == "jpeg":
        def jpeg(im: Image.Image, i: int) -> Image.Image:
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=int(level))
            buf.seek(0)
            return Image.open(buf).convert(im.mode)
        return _per_image(x, jpeg)
    small = (max(1, round(w * level)), max(1, round(h * level)))
    if name in ("pixelate", "low_resolution"):
        up = Image.Resampling.NEAREST if name == "pixelate" else Image.Resampling.BILINEAR
        return _per_image(x, lambda im, i: _resize(_resize(im, small, Image.Resampling.BOX),
                                                   (w, h), up))
    if name == "zoom_out":
        def frame(im: Image.Image, i: int) -> Image.Image:
            canvas = Image.new(im.mode, (w, h), 0)
            canvas.paste(_resize(im, small, Image.Resampling.BILINEAR),
                         ((w - small[0]) // 2, (h - small[1]) // 2))
            return canvas
        return _per_image(x, frame)
    if name == "crop":
        left, top = (w - small[0]) // 2, (h - small[1]) // 2
        box = (left, top, left + small[0], top + small[1])
        return _per_image(x, lambda im, i: im.resize((w, h), Image.Resampling.BILINEAR, box=box))
    # rotation: a patient not quite square to the detector; the uncovered corners are black.
    angles = _signs(rng, len(x)) * level
    return _per_image(x, lambda im, i: im.rotate(float(angles[i]), Image.Resampling.BILINEAR,
                                                 fillcolor=0))


# --------------------------------------------------------------------------- test-time views


def tta_views(images: np.ndarray) -> list[np.ndarray]:
    """The test-time augmentation views of a batch: the images, 1/16-side shifts in four
    directions (edges replicated) and a 8% central zoom. No flip: a chest X-ray's left and
    right are not interchangeable (heart, situs)."""
    x = np.asarray(images)
    h, w = x.shape[1:3]
    d = max(1, round(min(h, w) / 16))
    pad = np.pad(x, ((0, 0), (d, d), (d, d), (0, 0)), mode="edge")
    shifts = [pad[:, d:d + h, 2 * d:2 * d + w], pad[:, d:d + h, 0:w],
              pad[:, 2 * d:2 * d + h, d:d + w], pad[:, 0:h, d:d + w]]
    zoom = corrupt_crop(x, 1 / 1.08)
    return [x, *shifts, zoom]


def corrupt_crop(images: np.ndarray, keep: float) -> np.ndarray:
    """The central ``keep`` fraction of each image scaled back to full size."""
    return _geometric(np.asarray(images), "crop", keep, 1.0, np.random.default_rng(0))


def predict_tta(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Mean probabilities over :func:`tta_views`, a chunk of images at a time."""
    parts = []
    for first in range(0, len(images), chunk):
        views = tta_views(np.asarray(images[first:first + chunk]))
        parts.append(np.mean([predict(v) for v in views], axis=0))
    return np.concatenate(parts)


# --------------------------------------------------------------------------- evaluation


def sample_rows(labels: np.ndarray, samples: int, seed: int = 0) -> np.ndarray:
    """Sorted row indices of a stratified, seeded subset of at most ``samples`` rows (all rows
    when ``samples`` is 0 or at least the split's size)."""
    n = len(labels)
    if samples <= 0 or samples >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    keep = []
    for cls in np.unique(labels):
        rows = np.flatnonzero(labels == cls)
        take = max(1, round(samples * len(rows) / n))
        keep.append(rng.choice(rows, size=min(take, len(rows)), replace=False))
    return np.sort(np.concatenate(keep))


def corrupted_predictions(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                          labels: np.ndarray, class_names: list[str], *,
                          samples: int = DEFAULT_SAMPLES, seed: int = 0,
                          corruptions: tuple[str, ...] = CORRUPTIONS,
                          chunk: int = DEFAULT_CHUNK) -> pd.DataFrame:
    """Probabilities of the clean and every corrupted copy of a stratified subset: one row per
    (image, corruption, severity) with ``row`` (index in the split), ``y_true``, ``corruption``
    (``clean`` for the originals, severity 0), ``severity`` and ``prob_<class>``."""
    if samples < 0:
        raise ConfigError(f"robustness samples must be >= 0 (0 = every image), got {samples}")
    rows = sample_rows(np.asarray(labels), samples, seed)
    frames = []
    variants = [(CLEAN, 0)] + [(c, s) for c in corruptions for s in SEVERITIES]
    for name, severity in variants:
        probs = []
        for first in range(0, len(rows), chunk):
            # Only one chunk of one variant is ever in memory (a memory-mapped split stays put).
            batch = np.asarray(images[rows[first:first + chunk]])
            if name != CLEAN:
                batch = corrupt(batch, name, severity, seed)
            probs.append(predict(batch))
        p = np.concatenate(probs)
        frame = pd.DataFrame({"row": rows, "y_true": np.asarray(labels)[rows],
                              "corruption": name, "severity": severity})
        for i, cls in enumerate(class_names):
            frame[f"prob_{cls}"] = p[:, i]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def summarize(predictions: pd.DataFrame, class_names: list[str]) -> dict[str, Any]:
    """AUC of the clean subset and of every corruption x severity, from
    :func:`corrupted_predictions`' table (a single model's or an ensemble's mean)."""
    cols = [f"prob_{c}" for c in class_names]
    auc: dict[str, dict[str, float | None]] = {}
    clean = None
    for (name, severity), group in predictions.groupby(["corruption", "severity"], sort=False):
        value = metrics.roc_auc(group["y_true"].to_numpy(), group[cols].to_numpy())
        if name == CLEAN:
            clean = value
        else:
            auc.setdefault(str(name), {})[str(int(severity))] = value
    counted = [(f"{c}@{s}", v) for c, levels in auc.items() if c not in SANITY_ONLY
               for s, v in levels.items() if v is not None]
    mean = float(np.mean([v for _, v in counted])) if counted else None
    worst = min(counted, key=lambda kv: kv[1]) if counted else (None, None)
    return {
        "n": int((predictions["corruption"] == CLEAN).sum()),
        "severities": list(SEVERITIES),
        "clean_auc": clean,
        "auc": auc,
        "mean_by_corruption": {c: _mean(levels.values()) for c, levels in auc.items()},
        "mean_corrupted_auc": mean,
        "worst_corrupted_auc": worst[1],
        "worst_corruption": worst[0],
        "drop": None if clean is None or mean is None else clean - mean,
        "excluded_from_summary": sorted(SANITY_ONLY & set(auc)),
        "suite": "MedMNIST-C categories (Di Salvo et al., 2024), lungxray.robustness",
    }


def _mean(values: Any) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def evaluate_robustness(predict: Callable[[np.ndarray], np.ndarray], images: np.ndarray,
                        labels: np.ndarray, class_names: list[str], *,
                        samples: int = DEFAULT_SAMPLES, seed: int = 0,
                        chunk: int = DEFAULT_CHUNK) -> tuple[dict[str, Any], pd.DataFrame]:
    """(summary with ``seconds`` and ``samples`` added, the per-image predictions table)."""
    start = time.perf_counter()
    table = corrupted_predictions(predict, images, labels, class_names, samples=samples,
                                  seed=seed, chunk=chunk)
    summary = summarize(table, class_names)
    summary.update({"samples": int(samples), "seed": int(seed),
                    "seconds": round(time.perf_counter() - start, 2),
                    "images_predicted": len(table)})
    return summary, table
