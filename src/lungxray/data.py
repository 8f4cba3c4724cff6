"""The prepared-dataset format: the files a prepared dataset holds, and reading them back.

A prepared dataset is a directory with, per split, ``<split>_images.npy`` (uint8
``(N, H, W, C)``, loaded memory-mapped) and ``<split>_labels.npy`` (int64 ``(N,)``); a
``manifest.json`` that records where the data came from and how it was split, so any later step
can be reproduced or audited; ``files.csv`` (which source file became which row); and the data
report ``data_report.html`` / ``data_report.md``. :func:`lungxray.prepare.preprocess` writes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungxray import artifacts, shift
from lungxray import splits as splitting
from lungxray.errors import DataError, quote_repr
from lungxray.safeio import load_json_object
from lungxray.sites import HOLDOUT_PREFIX, NAME_PATTERN
from lungxray.sources import SPLITS

__all__ = ["FILES_INDEX", "FORMAT", "MANIFEST", "OUTPUT_SPLITS", "SPLITS", "DataError", "Split",
           "images_file", "is_array_file", "is_prepared", "labels_file", "load_split",
           "load_split_files", "manifest_metadata", "read_manifest", "stratified_sample"]

# Splits a prepared dataset may hold: the source's own, plus the carved shift proxy.
OUTPUT_SPLITS = (*SPLITS, shift.SPLIT)
MANIFEST = artifacts.MANIFEST_FILE
FORMAT = "lungxray-dataset/2"
_FORMAT_NAME, _, _FORMAT_VERSION = FORMAT.rpartition("/")
FILES_INDEX = artifacts.FILES_INDEX
# A held-out site's split is named after it (lungxray.sites): test_site_<name>.
_ARRAY_FILE = re.compile(rf"^(?:{'|'.join(OUTPUT_SPLITS)}|{HOLDOUT_PREFIX}{NAME_PATTERN})"
                         rf"_(?:images|labels)\.npy$")


@dataclass
class Split:
    """Images (N, H, W, C) uint8 and integer labels (N,) of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        """The rows at ``index``, as a new Split."""
        return Split(self.images[index], self.labels[index])


def concatenate(parts: list[Split]) -> Split:
    """The rows of ``parts``, one after the other (one part: itself, no copy)."""
    if len(parts) == 1:
        return parts[0]
    return Split(np.concatenate([p.images for p in parts]),
                 np.concatenate([p.labels for p in parts]))


def stratified_sample(split: Split, limit: int, seed: int) -> Split:
    """At most ``limit`` samples, keeping class proportions (for quick local runs)."""
    if limit <= 0 or len(split) <= limit:
        return split
    return split.subset(splitting.stratified_indices(split.labels, limit, seed))


def images_file(split: str) -> str:
    """File name of a split's images in a prepared dataset."""
    return f"{split}_images.npy"


def labels_file(split: str) -> str:
    """File name of a split's labels in a prepared dataset."""
    return f"{split}_labels.npy"


def is_array_file(name: str) -> bool:
    """True when ``name`` is the images or labels file of a split a prepared dataset may hold."""
    return bool(_ARRAY_FILE.match(name))


def is_prepared(path: str | Path) -> bool:
    """True when ``path`` holds a manifest of a prepared dataset this version can read."""
    manifest = Path(path) / MANIFEST
    try:
        return load_json_object(manifest, "manifest").get("format") == FORMAT
    except (OSError, ValueError):
        return False


def _older_format(value: object) -> bool:
    """True for a format an earlier lungxray wrote (``lungxray-dataset/1``)."""
    if not isinstance(value, str):
        return False
    name, _, version = value.rpartition("/")
    return name == _FORMAT_NAME and version.isdigit() and int(version) < int(_FORMAT_VERSION)


def read_manifest(data_dir: Path) -> dict:
    """The manifest of a prepared dataset; a clear DataError when it is missing, unreadable or
    of another format."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: not a prepared dataset (no {MANIFEST}); "
                        f"run `lungxray preprocess` first")
    try:
        manifest = load_json_object(path, "manifest")
    except OSError as err:
        raise DataError(f"{path}: cannot read the manifest ({err})") from err
    found = manifest.get("format")
    if _older_format(found):
        raise DataError(f"{path}: prepared in the older format {found!r}, which this version "
                        f"no longer reads; re-run `lungxray preprocess` on its source (into a "
                        f"new or empty output folder) to prepare it as {FORMAT}")
    if found != FORMAT:
        raise DataError(f"{path}: unknown format {quote_repr(found, 60)}, expected {FORMAT}")
    return manifest


def load_split_files(data_dir: Path, split: str) -> Split:
    """The arrays of one split, images memory-mapped (read-only): nothing is read until used."""
    data_dir = Path(data_dir)
    images = np.load(data_dir / images_file(split), mmap_mode="r", allow_pickle=False)
    labels = np.load(data_dir / labels_file(split), allow_pickle=False)
    return Split(images, labels)


def load_split(data_dir: Path, split: str) -> Split:
    """Load one split of a prepared dataset (images memory-mapped)."""
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}: has no '{split}' split "
                        f"(available: {', '.join(manifest['splits'])})")
    return load_split_files(data_dir, split)


def manifest_metadata(manifest: dict) -> dict:
    """Flat key facts of a manifest (for artifact metadata shown in the Kubeflow UI)."""
    meta = {"class_names": manifest["class_names"], "image_size": manifest["image_size"],
            "channels": manifest["channels"], "seed": manifest["seed"],
            "source_sha256": manifest["source_sha256"],
            "n_skipped": len(manifest.get("skipped", []))}
    meta.update({f"n_{name}": split["n"] for name, split in manifest["splits"].items()})
    if manifest.get("sites"):
        meta["sites"] = list(manifest["sites"])
        meta["holdout_site"] = manifest.get("holdout_site")
    return meta
