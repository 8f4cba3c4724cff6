"""Cached backbone features for the frozen-phase search, and the head that reads them.

A frozen pretrained backbone maps an image to the same pooled feature vector in every epoch of
every trial, so the search computes it once per (model, image size, channels, weights, split
content) and trains only the head on the stored vectors. The extractor is the classifier of
``models.build_classifier`` without augmentation, cut at its ``pool`` layer: resizing,
grey-to-RGB and ``preprocess_input`` included, so the vectors are exactly what the head of the
full model sees. :func:`build_head` rebuilds that head (same layer names), so its weights load
into the full classifier by name.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from lungxray import data, download, models, safeio

if TYPE_CHECKING:
    import tensorflow as tf

FEATURE_LAYER = "pool"
HEAD_LAYERS = ("head_dense", "probs")  # the trainable head layers of models.build_classifier
# Bump when the extractor changes meaning (e.g. a different cut point): old entries then miss.
FORMAT = "lungxray-features/1"
CHUNK_BYTES = 256 << 20  # float32 pixels fed to the extractor at once


def weights_identity(weights: str | None) -> str:
    """What the backbone's weights are: 'imagenet', or the sha256 of a weights file. Without
    weights (random initialisation) there is no stable identity, hence nothing to cache."""
    if weights is None:
        raise ValueError("features are only cached for pretrained weights (got weights=None)")
    if weights == "imagenet":
        return "imagenet"
    return "sha256:" + download.file_sha256(Path(weights))


def build_extractor(model_name: str, image_size: int, channels: int,
                    weights: str | None) -> keras.Model:
    """Raw pixels in, pooled backbone features out (the classifier up to ``pool``)."""
    # num_classes only shapes the discarded output layer.
    classifier = models.build_classifier(model_name, image_size, channels, 2, weights,
                                         augment=0)
    return keras.Model(classifier.input, classifier.get_layer(FEATURE_LAYER).output,
                       name=f"features_{model_name}")


def cache_key(model_name: str, image_size: int, channels: int, weights_id: str,
              split_digest: str) -> str:
    """A short stable hash of everything the features of one split depend on."""
    key = {"format": FORMAT, "keras": keras.__version__, "model": model_name,
           "image_size": image_size, "channels": channels, "weights": weights_id,
           "split_sha256": split_digest}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


@dataclass
class FeatureSplit:
    """Features of one split and where they came from."""

    features: np.ndarray  # (N, D) float32
    key: str
    path: Path
    computed: bool  # False: read from the cache
    seconds: float


def extract(extractor: keras.Model, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Features of uint8 images, read a chunk at a time (the images may be memory-mapped and
    larger than memory; only one chunk is ever held as float32)."""
    per_image = int(np.prod(images.shape[1:])) * 4
    rows = max(batch_size, CHUNK_BYTES // per_image // batch_size * batch_size)
    parts = [extractor.predict(np.asarray(images[start:start + rows], dtype=np.float32),
                               batch_size=batch_size, verbose=0)
             for start in range(0, len(images), rows)]
    return np.concatenate(parts).astype(np.float32)


def _save(path: Path, array: np.ndarray, meta: dict) -> None:
    safeio.replace_atomically(path, lambda out: np.save(out, array))
    safeio.write_text_atomic(path.with_suffix(".json"), json.dumps(meta, indent=2))


def cached_features(model_name: str, image_size: int, channels: int, weights: str,
                    splits: dict[str, tuple[data.Split, str]], cache_dir: Path,
                    batch_size: int = 64) -> dict[str, FeatureSplit]:
    """Features of each ``{name: (split, split_sha256)}``, read from ``cache_dir`` when present,
    else computed (the extractor is only built when something is missing) and stored as
    ``<cache_dir>/<key>.npy`` with a ``<key>.json`` describing it."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    weights_id = weights_identity(weights)
    result: dict[str, FeatureSplit] = {}
    extractor = None
    for name, (split, digest) in splits.items():
        key = cache_key(model_name, image_size, channels, weights_id, digest)
        path = cache_dir / f"{key}.npy"
        started = time.time()
        if path.is_file():
            features = np.load(path, allow_pickle=False)
            if len(features) == len(split):
                result[name] = FeatureSplit(features, key, path, False,
                                            round(time.time() - started, 3))
                continue
        if extractor is None:
            extractor = build_extractor(model_name, image_size, channels, weights)
        features = extract(extractor, split.images, batch_size)
        _save(path, features, {
            "model_name": model_name, "image_size": image_size, "channels": channels,
            "weights": weights_id, "split": name, "split_sha256": digest, "n": len(split),
            "dim": int(features.shape[1]), "keras": keras.__version__, "format": FORMAT})
        result[name] = FeatureSplit(features, key, path, True, round(time.time() - started, 3))
    return result


def build_head(feature_dim: int, num_classes: int, dense_units: int = 0,
               dropout: float = 0.2) -> keras.Model:
    """Pooled features in, class probabilities out: the head of ``models.build_classifier``
    with the same layer names, so :func:`copy_head` can move its weights."""
    inputs = keras.Input((feature_dim,), name="features")
    return keras.Model(inputs, models.add_head(inputs, num_classes, dense_units, dropout),
                       name="head")


def head_weights(model: keras.Model) -> dict[str, list[np.ndarray]]:
    """The trainable head layers' weights, by layer name (a head or a full classifier)."""
    names = {layer.name for layer in model.layers}
    return {name: model.get_layer(name).get_weights() for name in HEAD_LAYERS if name in names}


def copy_head(weights: dict[str, list[np.ndarray]], model: keras.Model) -> None:
    """Load head weights into ``model`` (a head or a full classifier with the same head)."""
    names = {layer.name for layer in model.layers}
    expected = {name for name in HEAD_LAYERS if name in names}
    if expected != set(weights):
        raise ValueError(f"head layers differ: model has {sorted(expected)}, "
                         f"weights are for {sorted(weights)}")
    for name, values in weights.items():
        model.get_layer(name).set_weights(values)


def feature_dataset(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    batch_size: int, shuffle: bool = False, seed: int = 42) -> tf.data.Dataset:
    """Batches of (features, one-hot labels), shuffled like ``batches.make_dataset`` (same
    seed and buffer), so a head sees its examples in the same order as in the full model."""
    import tensorflow as tf  # tuning runs on TensorFlow only; train also imports this module

    onehot = keras.utils.to_categorical(labels, num_classes).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((features.astype(np.float32), onehot))
    if shuffle:
        dataset = dataset.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)
