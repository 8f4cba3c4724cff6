"""Read image sources, make leakage-free seeded splits and write a prepared dataset.

A prepared dataset is a directory with one ``<split>.npz`` per split (``images`` uint8
``(N, H, W, C)``, ``labels`` int64 ``(N,)``) and a ``manifest.json`` that records where the data
came from and how it was split, so any later step can be reproduced or audited.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from sklearn.model_selection import train_test_split

SPLITS = ("train", "val", "test")
MANIFEST = "manifest.json"
FORMAT = "lungxray-dataset/1"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
DEFAULT_FOLDER_SIZE = 224
# MedMNIST .npz files carry no class names; these are the official ones from its INFO table.
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}


class DataError(ValueError):
    """Input data that cannot be used, with a message naming what and where."""


@dataclass
class Split:
    """Images (N, H, W, C) uint8 and integer labels (N,) of one split."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: np.ndarray) -> Split:
        return Split(self.images[index], self.labels[index])


@dataclass
class Source:
    """A loaded raw source: its splits, class names and a fingerprint of the raw bytes."""

    splits: dict[str, Split]
    class_names: list[str]
    sha256: str
    flat: bool = False  # a folder without split folders: all images in one set


# ---------------------------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------------------------


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _to_nhwc(images: np.ndarray, where: str) -> np.ndarray:
    if images.ndim == 3:
        images = images[..., np.newaxis]
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{where}: expected images shaped (N, H, W) or (N, H, W, 1|3), "
                        f"got {images.shape}")
    if images.dtype != np.uint8:
        raise DataError(f"{where}: expected uint8 pixels, got {images.dtype}")
    return images


def load_npz(path: Path, class_names: list[str] | None = None) -> Source:
    """Load a MedMNIST-style ``.npz`` (``<split>_images`` / ``<split>_labels`` keys)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    with archive:
        keys = set(archive.files)
        splits: dict[str, Split] = {}
        for name in SPLITS:
            image_key, label_key = f"{name}_images", f"{name}_labels"
            if (image_key in keys) != (label_key in keys):
                raise DataError(f"{path}: has {image_key if image_key in keys else label_key} "
                                f"but not its pair")
            if image_key not in keys:
                continue
            try:
                images = _to_nhwc(archive[image_key], f"{path}:{image_key}")
                labels = np.asarray(archive[label_key]).reshape(-1)
            except DataError:
                raise
            except ValueError as err:  # e.g. pickled object arrays, refused on purpose
                raise DataError(f"{path}: cannot read {image_key}/{label_key}: {err}") from err
            if len(labels) != len(images):
                raise DataError(f"{path}: {image_key} has {len(images)} images but {label_key} "
                                f"has {len(labels)} labels")
            if not np.issubdtype(labels.dtype, np.integer):
                raise DataError(f"{path}:{label_key}: labels must be integers, got {labels.dtype}")
            splits[name] = Split(images, labels.astype(np.int64))
    if "train" not in splits and "test" not in splits:
        raise DataError(f"{path}: no train_images/train_labels or test_images/test_labels keys "
                        f"(found: {', '.join(sorted(keys)) or 'nothing'})")
    n_classes = int(max(split.labels.max() for split in splits.values() if len(split)) + 1)
    if class_names is None:
        stem = path.name.split(".")[0].split("_")[0].lower()
        class_names = MEDMNIST_CLASS_NAMES.get(stem, [str(i) for i in range(n_classes)])
    if n_classes > len(class_names):
        raise DataError(f"{path}: labels go up to {n_classes - 1} but only {len(class_names)} "
                        f"class names are known ({class_names})")
    return Source(splits, list(class_names), file_sha256(path))


def _load_image(path: Path, size: int, channels: int) -> np.ndarray:
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (size, size):
                image = image.resize((size, size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise DataError(f"{path}: not a readable image ({err})") from err
    return array.reshape(size, size, channels)


def _class_dirs(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(p for p in class_dir.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        classes[class_dir.name] = files
    return classes


def load_folder(root: Path, image_size: int, channels: int = 1) -> Source:
    """Load ``<root>/[train|val|test/]<CLASS>/*.png|jpg`` into memory at ``image_size``."""
    split_dirs = {name: root / name for name in SPLITS if (root / name).is_dir()}
    layout = {name: _class_dirs(d) for name, d in split_dirs.items()} or {"train": _class_dirs(root)}
    class_names = sorted({name for classes in layout.values() for name in classes})
    if not class_names:
        raise DataError(f"{root}: no class folders found (expected <root>/[train|val|test/]<CLASS>/)")
    for split, classes in layout.items():
        if sorted(classes) != class_names:
            missing = sorted(set(class_names) - set(classes))
            raise DataError(f"{root}: split '{split}' lacks class folders {missing}")
    digest = hashlib.sha256()
    splits = {}
    for split, classes in layout.items():
        images, labels = [], []
        for label, name in enumerate(class_names):
            for path in classes[name]:
                images.append(_load_image(path, image_size, channels))
                labels.append(label)
                digest.update(str(path.relative_to(root)).encode())
                digest.update(file_sha256(path).encode())
        if not images:
            raise DataError(f"{root}: split '{split}' holds no .png/.jpg images")
        splits[split] = Split(np.stack(images), np.asarray(labels, dtype=np.int64))
    return Source(splits, class_names, digest.hexdigest(), flat=not split_dirs)


def load_source(source: str, image_size: int | None = None, channels: int | None = None,
                class_names: list[str] | None = None, cache_dir: Path | None = None) -> Source:
    """Load a ``.npz`` file, an image folder, either of them on ``gs://``, or the name of a
    published dataset (``pneumoniamnist`` or ``pneumoniamnist_<64|128|224>``, downloaded with
    checksum verification and cached)."""
    if source.startswith("gs://"):
        from lungxray import storage  # google-cloud-storage only loads for gs:// sources

        path = storage.fetch(source, cache_dir)
    elif re.fullmatch(r"pneumoniamnist(_\d+)?", source) and not Path(source).exists():
        from lungxray import download

        size = int(source.rpartition("_")[2]) if "_" in source else 28
        path = download.fetch_pneumoniamnist(size, cache_dir)
    else:
        path = Path(source)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_file():
        if path.suffix != ".npz":
            raise DataError(f"{source}: a file source must be a MedMNIST-style .npz")
        loaded = load_npz(path, class_names)
        return _reshape(loaded, image_size, channels, source)
    loaded = load_folder(path, image_size or DEFAULT_FOLDER_SIZE, channels or 1)
    if class_names is not None and class_names != loaded.class_names:
        raise DataError(f"{source}: class folders {loaded.class_names} differ from the expected "
                        f"{class_names}")
    return loaded


def _resize_all(images: np.ndarray, size: int) -> np.ndarray:
    out = np.empty((len(images), size, size, images.shape[-1]), dtype=np.uint8)
    for i, image in enumerate(images):
        pil = Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image)
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).reshape(
            size, size, -1)
    return out


def _reshape(loaded: Source, image_size: int | None, channels: int | None, where: str) -> Source:
    """Bring npz images to the requested size and channel count."""
    for name, split in loaded.splits.items():
        images = split.images
        if channels == 3 and images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        elif channels == 1 and images.shape[-1] == 3:
            weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R 601 luma, as PIL
            images = np.round(images @ weights)[..., np.newaxis].astype(np.uint8)
        if image_size and images.shape[1:3] != (image_size, image_size):
            if image_size < 8:
                raise DataError(f"{where}: image size {image_size} is too small")
            images = _resize_all(images, image_size)
        loaded.splits[name] = Split(images, split.labels)
    return loaded


# ---------------------------------------------------------------------------------------------
# Splitting
# ---------------------------------------------------------------------------------------------


def image_hashes(images: np.ndarray) -> np.ndarray:
    """Content hash per image, to find exact duplicates."""
    return np.array([hashlib.sha1(image.tobytes()).hexdigest() for image in images])


def carve(split: Split, fraction: float, seed: int,
          keep: set[str] | frozenset[str] = frozenset()) -> tuple[Split, Split]:
    """Stratified, seeded split of ``split`` into (rest, carved).

    Exact duplicates are grouped first so that all copies of an image land on the same side;
    images whose hash is in ``keep`` (they also sit in another split) never go to the carved
    side, so a carved split shares no image with any other split.
    """
    hashes = image_hashes(split.images)
    unique, first, group = np.unique(hashes, return_index=True, return_inverse=True)
    candidates = np.flatnonzero(~np.isin(unique, list(keep)))
    group_labels = split.labels[first][candidates]
    counts = Counter(group_labels.tolist())
    if len(counts) < 2 or min(counts.values()) < 2:
        raise DataError(f"cannot carve a stratified split: class counts {dict(counts)} need at "
                        f"least two distinct images per class")
    n_carved = int(round(fraction * len(split)))
    _, carved_groups = train_test_split(candidates, test_size=n_carved, random_state=seed,
                                        stratify=group_labels)
    carved_mask = np.isin(group, carved_groups)
    return split.subset(np.flatnonzero(~carved_mask)), split.subset(np.flatnonzero(carved_mask))


def stratified_sample(split: Split, limit: int, seed: int) -> Split:
    """At most ``limit`` samples, keeping class proportions (for quick local runs)."""
    if limit <= 0 or len(split) <= limit:
        return split
    keep, _ = train_test_split(np.arange(len(split)), train_size=limit, random_state=seed,
                               stratify=split.labels)
    return split.subset(np.sort(keep))


def cross_split_duplicates(splits: dict[str, Split], examples: int = 5) -> dict:
    """Images that appear pixel-identical in two splits, per pair of splits."""
    hashes = {name: image_hashes(split.images) for name, split in splits.items()}
    report = {}
    names = list(splits)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(hashes[a], hashes[b])
            pairs = [[int(np.flatnonzero(hashes[a] == h)[0]), int(np.flatnonzero(hashes[b] == h)[0])]
                     for h in shared[:examples]]
            report[f"{a}/{b}"] = {"count": int(sum(np.isin(hashes[b], shared))),
                                  "examples": pairs}
    return report


def split_digest(split: Split) -> str:
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(split.images).tobytes())
    digest.update(np.ascontiguousarray(split.labels).tobytes())
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# Writing and reading prepared datasets
# ---------------------------------------------------------------------------------------------


def preprocess(source: str, output: Path, image_size: int | None = None, seed: int = 42,
               val_fraction: float = 0.1, test_fraction: float = 0.1,
               max_per_split: int = 0, channels: int | None = None,
               class_names: list[str] | None = None, carve_missing: bool = True,
               cache_dir: Path | None = None) -> dict:
    """Prepare ``source`` into ``output`` and return the manifest.

    Missing val/test splits are carved from train (stratified, seeded, duplicate-grouped)
    unless ``carve_missing`` is False (evaluation of an external set uses the splits as given).
    """
    loaded = load_source(source, image_size, channels, class_names, cache_dir)
    splits = dict(loaded.splits)
    carved = {}
    if not carve_missing and loaded.flat:
        splits = {"test": splits.pop("train")}  # an external set is evaluated as a whole
    if carve_missing:
        if "train" not in splits:
            raise DataError(f"{source}: has no train split to train on or carve from")
        for name, fraction in (("test", test_fraction), ("val", val_fraction)):
            if name not in splits:
                elsewhere = {h for other, split in splits.items() if other != "train"
                             for h in image_hashes(split.images)}
                splits["train"], splits[name] = carve(splits["train"], fraction, seed, elsewhere)
                carved[name] = "train"
    splits = {name: stratified_sample(splits[name], max_per_split, seed)
              for name in SPLITS if name in splits}
    for name, split in splits.items():
        if len(split) == 0:
            raise DataError(f"{source}: split '{name}' is empty")
    first = next(iter(splits.values()))
    manifest = {
        "format": FORMAT,
        "source": source,
        "source_sha256": loaded.sha256,
        "class_names": loaded.class_names,
        "image_size": int(first.images.shape[1]),
        "channels": int(first.images.shape[-1]),
        "seed": seed,
        "val_fraction": val_fraction,
        "test_fraction": test_fraction,
        "max_per_split": max_per_split,
        "carved": carved,
        "splits": {
            name: {
                "n": len(split),
                "counts": {cls: int((split.labels == i).sum())
                           for i, cls in enumerate(loaded.class_names)},
                "sha256": split_digest(split),
            }
            for name, split in splits.items()
        },
        "cross_split_duplicates": cross_split_duplicates(splits),
    }
    _write_atomically(output, splits, manifest)
    return manifest


def _write_atomically(output: Path, splits: dict[str, Split], manifest: dict) -> None:
    """Write everything into a temp dir beside ``output`` and rename it into place last,
    so a failure never leaves a directory that looks like a valid dataset."""
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.exists() and any(output.iterdir()):
        if not (output / MANIFEST).exists():
            raise DataError(f"{output}: exists, is not empty and is not a prepared dataset; "
                            f"refusing to overwrite it")
    staging = Path(tempfile.mkdtemp(prefix=".prepare-", dir=output.parent))
    for name, split in splits.items():
        np.savez(staging / f"{name}.npz", images=split.images, labels=split.labels)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if output.exists():
        for child in output.iterdir():
            child.unlink()
        output.rmdir()
    os.replace(staging, output)


def is_prepared(path: str | Path) -> bool:
    manifest = Path(path) / MANIFEST
    return manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT


def read_manifest(data_dir: Path) -> dict:
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise DataError(f"{data_dir}: not a prepared dataset (no {MANIFEST}); "
                        f"run `lungxray preprocess` first")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path}: unknown format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def load_split(data_dir: Path, split: str) -> Split:
    """Load one split of a prepared dataset."""
    manifest = read_manifest(data_dir)
    if split not in manifest["splits"]:
        raise DataError(f"{data_dir}: has no '{split}' split "
                        f"(available: {', '.join(manifest['splits'])})")
    with np.load(Path(data_dir) / f"{split}.npz", allow_pickle=False) as archive:
        return Split(archive["images"], archive["labels"])


def manifest_metadata(manifest: dict) -> dict:
    """Flat key facts of a manifest (for artifact metadata shown in the Kubeflow UI)."""
    meta = {"class_names": manifest["class_names"], "image_size": manifest["image_size"],
            "channels": manifest["channels"], "seed": manifest["seed"],
            "source_sha256": manifest["source_sha256"]}
    meta.update({f"n_{name}": split["n"] for name, split in manifest["splits"].items()})
    return meta


def describe_manifest(manifest: dict) -> str:
    """A Markdown summary: counts per split and class, carved splits, duplicates across splits."""
    classes = manifest["class_names"]
    lines = [f"# Dataset from `{manifest['source']}`", "",
             f"{manifest['image_size']}×{manifest['image_size']} px, "
             f"{manifest['channels']} channel(s), seed {manifest['seed']}, "
             f"source sha256 `{manifest['source_sha256'][:16]}…`", "",
             "| split | n | " + " | ".join(classes) + " |",
             "|---|---:|" + "---:|" * len(classes)]
    for name, split in manifest["splits"].items():
        carved = f" (carved from {manifest['carved'][name]})" if name in manifest["carved"] else ""
        counts = " | ".join(str(split["counts"][c]) for c in classes)
        lines.append(f"| {name}{carved} | {split['n']} | {counts} |")
    lines += ["", "Images shared between splits (pixel-identical):", ""]
    lines += [f"- {pair}: {info['count']}" for pair, info in
              manifest["cross_split_duplicates"].items()]
    return "\n".join(lines) + "\n"
