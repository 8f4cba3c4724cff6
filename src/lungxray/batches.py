"""The batches training reads: (float32 pixels, one-hot labels[, sample weights]) gathered from a
prepared split (memory-mapped or not), shuffled with a seed, optionally blended by MixUp/CutMix,
and the balanced class or site x class weights that go with them. A tf.data pipeline on
TensorFlow, a PyDataset on JAX.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight, compute_sample_weight

from lungxray import data

if TYPE_CHECKING:
    import tensorflow as tf


def gather_batch(split: data.Split, num_classes: int, index: np.ndarray,
                 weights: np.ndarray | None = None) -> tuple[np.ndarray, ...]:
    """One batch of (float32 pixels, one-hot labels[, sample weights]); one-hot so label
    smoothing works."""
    index = np.sort(index)  # in-order reads are much faster on a memory map
    onehot = np.eye(num_classes, dtype=np.float32)[split.labels[index]]
    batch = (split.images[index].astype(np.float32), onehot)
    return batch if weights is None else (*batch, weights[index])


def with_mixing(dataset: tf.data.Dataset | SplitBatches, mixup: float, cutmix: float,
                seed: int) -> tf.data.Dataset | SplitBatches:
    """Training batches blended by Keras' MixUp (Beta ``mixup`` alpha) and/or CutMix
    (``cutmix`` factor), images and one-hot labels alike (a sample weight stays its row's);
    unchanged when both are 0."""
    mixers = []
    if mixup > 0:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed))
    if cutmix > 0:
        mixers.append(keras.layers.CutMix(factor=min(1.0, cutmix), seed=seed))
    if not mixers:
        return dataset

    def mix(images, labels, *weights):
        batch = {"images": images, "labels": labels}
        for mixer in mixers:
            batch = mixer(batch, training=True)
        return batch["images"], batch["labels"], *weights

    if isinstance(dataset, SplitBatches):
        return MixedBatches(dataset, mix)
    import tensorflow as tf

    return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_dataset(split: data.Split, num_classes: int, batch_size: int, shuffle: bool = False,
                 seed: int = 42, weights: np.ndarray | None = None
                 ) -> tf.data.Dataset | SplitBatches:
    """Batches gathered from the (possibly memory-mapped) arrays in parallel, so a dataset larger
    than memory streams: a tf.data pipeline on TensorFlow, a PyDataset on JAX. ``weights``
    (one per image) come with each batch as Keras' sample weights."""
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
    if keras.backend.backend() != "tensorflow":
        return SplitBatches(split, num_classes, batch_size, shuffle, seed, weights)
    import tensorflow as tf

    dataset = tf.data.Dataset.range(len(split))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    shapes = [(None, *split.images.shape[1:]), (None, num_classes)]
    if weights is not None:
        shapes.append((None,))
    dataset = dataset.batch(batch_size).map(
        lambda index: tf.numpy_function(lambda i: gather_batch(split, num_classes, i, weights),
                                        [index], [tf.float32] * len(shapes)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.map(lambda *batch: tuple(
        tf.ensure_shape(part, shape) for part, shape in zip(batch, shapes, strict=True)))
    return dataset.prefetch(tf.data.AUTOTUNE)


class SplitBatches(keras.utils.PyDataset):
    """``make_dataset``'s batches for JAX, which cannot read tf.data: gathered by worker threads,
    from a fresh seeded order of the images each epoch when shuffled."""

    def __init__(self, split: data.Split, num_classes: int, batch_size: int, shuffle: bool,
                 seed: int, weights: np.ndarray | None = None):
        super().__init__(workers=min(8, os.cpu_count() or 1))
        self.split, self.num_classes, self.batch_size = split, num_classes, batch_size
        self.weights = weights
        self.shuffle, self.rng = shuffle, np.random.default_rng(seed)
        self.order = np.arange(len(split))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return gather_batch(self.split, self.num_classes, batch, self.weights)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


class MixedBatches(keras.utils.PyDataset):
    """A :class:`SplitBatches` whose batches go through ``mix`` (:func:`with_mixing`, JAX), in
    one thread: the mixing layers' seed generators are not safe to share between threads."""

    def __init__(self, batches: SplitBatches, mix: Callable):
        super().__init__()
        self.batches, self.mix = batches, mix

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, ...]:
        return tuple(np.asarray(part) for part in self.mix(*self.batches[index]))

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights so the minority class (often 'normal') is not ignored."""
    classes = np.arange(num_classes)
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    lookup = dict(zip(present.tolist(), weights.tolist(), strict=True))
    return {int(c): float(lookup.get(c, 1.0)) for c in classes}


def balanced_weights(labels: np.ndarray, sites: np.ndarray | None, by_class: bool
                     ) -> np.ndarray | None:
    """One weight per image so that every site (``by_class``: every site x class group) carries
    the same total weight, the mean weight 1; None without sites (class weights then do the
    class balancing, :func:`class_weights`)."""
    if sites is None:
        return None
    groups = np.asarray(sites, dtype=str)
    if by_class:
        groups = np.char.add(np.char.add(groups, "\x1f"), np.asarray(labels).astype(str))
    return compute_sample_weight("balanced", groups).astype(np.float32)
