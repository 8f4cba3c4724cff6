"""A prepared dataset is checked before it is trained on or scored: the manifest read within
limits, every split's labels inside ``[0, n_classes)``, its shape as the manifest says and its
sha256 equal to the one ``manifest.json`` recorded. A tampered dataset is refused, never scored.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from lungxray import data, safeio
from lungxray.errors import DataError, quote, quote_repr
from lungxray.limits import DEFAULT, Limits

HASH_CHUNK_BYTES = 256 << 20  # pixels hashed at a time (a memory-mapped split may not fit)


def read_manifest(data_dir: Path, limits: Limits = DEFAULT) -> dict:
    """``data.read_manifest`` after a bounded read of the file (size and depth limited), and
    the fields later steps index checked for type."""
    path = Path(data_dir) / data.MANIFEST
    if path.is_file() or path.is_symlink():
        safeio.load_json_object(path, "manifest", limits, DataError)
    manifest = data.read_manifest(data_dir)
    names = manifest.get("class_names")
    if (not isinstance(names, list) or not 2 <= len(names) <= limits.max_classes
            or not all(isinstance(n, str) for n in names)):
        raise DataError(f"{quote(str(path))}: class_names must be a list of 2 to "
                        f"{limits.max_classes} names")
    for key in ("image_size", "channels"):
        if not isinstance(manifest.get(key), int) or isinstance(manifest.get(key), bool):
            raise DataError(f"{quote(str(path))}: {key} must be an integer")
    if manifest["channels"] not in (1, 3) or not 1 <= manifest["image_size"] <= (
            limits.max_image_size):
        raise DataError(f"{quote(str(path))}: image_size {manifest['image_size']} or channels "
                        f"{manifest['channels']} out of range")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not all(isinstance(s, dict) for s in splits.values()):
        raise DataError(f"{quote(str(path))}: splits must map split names to their records")
    return manifest


def split_sha256(split: data.Split) -> str:
    """sha256 of a split's pixels then labels, as ``manifest.json`` records it (the recipe
    :func:`lungxray.prepare_steps.write_split` writes with), a chunk at a time so memory stays
    small; also the identity of train subsets the manifest does not describe (the feature
    cache's key)."""
    digest = hashlib.sha256()
    per_image = max(1, int(np.prod(split.images.shape[1:])))
    rows = max(1, HASH_CHUNK_BYTES // per_image)
    for start in range(0, len(split), rows):
        digest.update(np.ascontiguousarray(split.images[start:start + rows]).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


def check_split(manifest: dict, name: str, split: data.Split, where: str) -> None:
    """Refuse a split whose labels, shape or sha256 differ from what the manifest recorded."""
    record = manifest["splits"].get(name)
    if not isinstance(record, dict):
        raise DataError(f"{where}: manifest has no record of split {quote(name, 40)}")
    n_classes = len(manifest["class_names"])
    labels = split.labels
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{where}: split {name!r} labels must be a 1-D integer array, got "
                        f"{labels.dtype} {labels.shape}")
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        bad = np.unique(labels[(labels < 0) | (labels >= n_classes)])
        raise DataError(f"{where}: split {name!r} holds labels {quote_repr(bad[:5].tolist(), 60)}"
                        f" outside [0, {n_classes}); the dataset was changed after preprocess")
    size, channels = manifest["image_size"], manifest["channels"]
    expected = (record.get("n"), size, size, channels)
    if split.images.shape != expected or len(labels) != record.get("n"):
        raise DataError(f"{where}: split {name!r} has images {split.images.shape} and "
                        f"{len(labels)} labels, the manifest says {expected}")
    recorded = record.get("sha256")
    if not isinstance(recorded, str):
        raise DataError(f"{where}: manifest records no sha256 for split {name!r}")
    actual = split_sha256(split)
    if actual != recorded:
        raise DataError(f"{where}: split {name!r} does not match the sha256 its manifest "
                        f"recorded ({actual[:12]}... vs {recorded[:12]}...); the dataset was "
                        f"changed after preprocess: prepare it again")


def load_checked_split(data_dir: Path, name: str, manifest: dict) -> data.Split:
    """``data.load_split`` then :func:`check_split`; a missing or unreadable array is a
    DataError too."""
    try:
        split = data.load_split(data_dir, name)
    except (OSError, ValueError, EOFError) as err:
        if isinstance(err, DataError):
            raise
        raise DataError(f"{quote(str(data_dir))}: cannot read split {name!r}: "
                        f"{quote(' '.join(str(err).split()), 120)}") from None
    check_split(manifest, name, split, quote(str(data_dir)))
    return split
