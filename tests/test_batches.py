"""The batches training reads: one-hot labels, the tf.data and PyDataset paths giving the same
batches, seeded shuffling, MixUp/CutMix blending and the balanced class and site weights."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import data
from lungxray.batches import (
    MixedBatches,
    SplitBatches,
    balanced_weights,
    class_weights,
    gather_batch,
    make_dataset,
    with_mixing,
)


def _split(n: int = 10) -> data.Split:
    """``n`` 4x4 one-channel images, image i filled with i, labels alternating 0/1."""
    images = np.repeat(np.arange(n, dtype=np.uint8), 16).reshape(n, 4, 4, 1)
    return data.Split(images, np.arange(n) % 2)


def test_a_gathered_batch_is_float_pixels_and_one_hot_labels_in_index_order():
    images, labels = gather_batch(_split(), 3, np.array([7, 2, 4]))
    assert images.dtype == np.float32 and images.shape == (3, 4, 4, 1)
    assert images[:, 0, 0, 0].tolist() == [2.0, 4.0, 7.0]  # sorted: in-order memory-map reads
    assert labels.dtype == np.float32 and labels.tolist() == [[1, 0, 0], [1, 0, 0], [0, 1, 0]]


def test_tf_batches_cover_the_split_once_per_epoch_in_a_seeded_order():
    split = _split(10)
    ordered = [x[:, 0, 0, 0].tolist() for x, _ in make_dataset(split, 2, 4).as_numpy_iterator()]
    assert ordered == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]

    def epochs(seed: int) -> list[list[float]]:
        dataset = make_dataset(split, 2, 4, shuffle=True, seed=seed)
        return [np.concatenate([x[:, 0, 0, 0] for x, _ in dataset.as_numpy_iterator()]).tolist()
                for _ in range(2)]

    first, second = epochs(seed=3)
    assert sorted(first) == sorted(second) == list(range(10))
    assert first != second  # reshuffled each epoch
    assert epochs(seed=3) == [first, second]  # the same seed, the same order
    assert epochs(seed=4)[0] != first


def test_split_batches_shuffle_deterministically_per_seed():
    split = _split(10)
    orders = [SplitBatches(split, 2, 4, shuffle=True, seed=seed).order.tolist()
              for seed in (0, 0, 1)]
    assert orders[0] == orders[1] != orders[2]
    assert len(SplitBatches(split, 2, 4, shuffle=True, seed=0)) == 3
    assert SplitBatches(split, 2, 4, shuffle=False, seed=0).order.tolist() == list(range(10))


def test_split_batches_match_the_tf_pipeline_and_reshuffle_each_epoch(small_dataset):
    split = data.load_split(small_dataset, "train")
    ordered = SplitBatches(split, 2, batch_size=32, shuffle=False, seed=0)
    tf_batches = list(make_dataset(split, 2, batch_size=32).as_numpy_iterator())
    assert len(ordered) == len(tf_batches) == -(-len(split) // 32)
    for (x, y), (tx, ty) in zip((ordered[i] for i in range(len(ordered))), tf_batches,
                                strict=True):
        np.testing.assert_array_equal(x, tx)
        np.testing.assert_array_equal(y, ty)

    shuffled = SplitBatches(split, 2, batch_size=32, shuffle=True, seed=0)
    first = shuffled.order.copy()
    assert sorted(first) == list(range(len(split))) and not np.array_equal(first, ordered.order)
    labels = np.concatenate([shuffled[i][1].argmax(1) for i in range(len(shuffled))])
    assert np.bincount(labels).tolist() == np.bincount(split.labels).tolist()
    shuffled.on_epoch_end()
    assert sorted(shuffled.order) == list(range(len(split)))
    assert not np.array_equal(shuffled.order, first)


def test_mixup_and_cutmix_blend_training_batches():
    import tensorflow as tf

    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (16, 32, 32, 1)).astype("float32")
    labels = np.eye(2, dtype="float32")[np.r_[np.zeros(8, int), np.ones(8, int)]]
    batches = tf.data.Dataset.from_tensor_slices((images, labels)).shuffle(16, seed=0).batch(16)
    assert with_mixing(batches, 0.0, 0.0, seed=0) is batches
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0)):
        mixed_images, mixed_labels = next(iter(with_mixing(batches, mixup, cutmix, 0)))
        mixed_labels = mixed_labels.numpy()
        np.testing.assert_allclose(mixed_labels.sum(axis=1), 1.0, rtol=1e-5)
        # Some labels are no longer one-hot: two images were blended, and so were their labels.
        assert ((mixed_labels > 1e-3) & (mixed_labels < 1 - 1e-3)).any()
        assert mixed_images.shape == images.shape
        low, high = float(tf.reduce_min(mixed_images)), float(tf.reduce_max(mixed_images))
        assert 0.0 <= low <= high <= 255
    # The PyDataset path (JAX's) blends its batches the same way, as NumPy arrays.
    split = data.Split(images.astype("uint8"), np.r_[np.zeros(8, int), np.ones(8, int)])
    plain = SplitBatches(split, 2, batch_size=16, shuffle=True, seed=0)
    mixed = with_mixing(plain, 0.4, 0.0, seed=0)
    assert isinstance(mixed, MixedBatches) and len(mixed) == len(plain) == 1
    batch_images, batch_labels = mixed[0]
    assert isinstance(batch_labels, np.ndarray) and batch_images.shape == images.shape
    np.testing.assert_allclose(batch_labels.sum(axis=1), 1.0, rtol=1e-5)
    assert ((batch_labels > 1e-3) & (batch_labels < 1 - 1e-3)).any()


def test_class_weights_are_balanced():
    labels = np.array([0] * 10 + [1] * 30)
    weights = class_weights(labels, 2)
    assert weights[0] * 10 == pytest.approx(weights[1] * 30)
    assert weights[0] == pytest.approx(40 / (2 * 10))


def test_a_class_absent_from_training_gets_weight_one():
    weights = class_weights(np.array([0, 0, 2, 2, 2, 2]), 3)
    assert weights[1] == 1.0 and weights[0] == pytest.approx(6 / (2 * 2))
    assert sorted(weights) == [0, 1, 2]


def test_site_weights_give_every_site_and_class_group_the_same_total():
    sites = np.array(["big"] * 80 + ["small"] * 20)
    labels = np.r_[np.zeros(20, int), np.ones(60, int), np.zeros(10, int), np.ones(10, int)]
    for by_class, groups in ((False, [sites == "big", sites == "small"]),
                             (True, [(sites == s) & (labels == c)
                                     for s in ("big", "small") for c in (0, 1)])):
        weights = balanced_weights(labels, sites, by_class)
        assert weights.dtype == np.float32 and weights.shape == (100,)
        assert weights.mean() == pytest.approx(1.0)
        totals = [weights[group].sum() for group in groups]
        assert totals == pytest.approx([100 / len(groups)] * len(groups))
    # One site, by class: the image weights Keras' class weights would give.
    one = balanced_weights(labels[:80], sites[:80], by_class=True)
    by_label = class_weights(labels[:80], 2)
    assert one == pytest.approx([by_label[c] for c in labels[:80]])
    assert balanced_weights(labels, None, by_class=True) is None


def test_sample_weights_travel_with_their_images_on_both_paths():
    split = _split(10)
    weights = np.arange(10, dtype=np.float32) / 10
    images, _, batch_weights = gather_batch(split, 2, np.array([7, 2, 4]), weights)
    assert batch_weights.tolist() == pytest.approx([0.2, 0.4, 0.7])
    for batches in (list(make_dataset(split, 2, 4, shuffle=True, seed=1,
                                      weights=weights).as_numpy_iterator()),
                    list(SplitBatches(split, 2, 4, shuffle=True, seed=1, weights=weights))):
        for x, _, w in batches:
            np.testing.assert_allclose(w, x[:, 0, 0, 0] / 10, rtol=1e-6)
    mixed = with_mixing(make_dataset(split, 2, 4, weights=weights), 0.4, 0.0, seed=0)
    assert [len(batch) for batch in mixed.as_numpy_iterator()] == [3, 3, 3]
