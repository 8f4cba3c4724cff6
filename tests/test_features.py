"""Feature cache: the cached features are what the full model's head sees, and the cache is
keyed by everything they depend on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungxray import data, features, integrity, models


def save_weights(name: str, size: int, path):
    spec = models.get_spec(name)
    models.build_backbone(spec, spec.input_size(size), None).save_weights(path)
    return str(path)


@pytest.mark.parametrize("name, size, channels", [
    ("VGG16", 32, 1),             # caffe preprocessing, grey -> RGB
    ("MobileNetV3Small", 32, 3),  # BatchNorm in inference mode, built-in preprocessing
    ("MobileNetV2", 28, 1),       # resized up to its 32 px minimum inside the model
])
def test_head_on_extracted_features_equals_the_full_classifier(name, size, channels, tmp_path):
    weights = save_weights(name, size, tmp_path / f"{name}.weights.h5")
    classifier = models.build_classifier(name, size, channels, 2, weights, dropout=0.3,
                                         dense_units=16, augment=1.0, seed=0)
    images = np.random.default_rng(0).integers(0, 256, (6, size, size, channels), np.uint8)
    extractor = features.build_extractor(name, size, channels, weights)
    extracted = features.extract(extractor, images, batch_size=4)
    head = features.build_head(extracted.shape[1], 2, dense_units=16, dropout=0.3)
    features.copy_head(features.head_weights(classifier), head)
    # Inference: augmentation and dropout are off, as when the frozen backbone is searched.
    expected = classifier.predict(images.astype(np.float32), verbose=0)
    np.testing.assert_allclose(head.predict(extracted, verbose=0), expected, atol=1e-5)


def test_copy_head_refuses_a_different_head():
    with_dense = features.build_head(8, 2, dense_units=4)
    without = features.build_head(8, 2, dense_units=0)
    with pytest.raises(ValueError, match="head layers differ"):
        features.copy_head(features.head_weights(with_dense), without)


def test_cache_key_depends_on_every_input():
    base = ("VGG16", 32, 1, "imagenet", "a" * 64)
    keys = {features.cache_key(*base)}
    for i, other in enumerate(["VGG19", 64, 3, "sha256:00", "b" * 64]):
        keys.add(features.cache_key(*base[:i], other, *base[i + 1:]))
    assert len(keys) == 6


def test_weights_identity_is_the_file_content(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.write_bytes(b"weights")
    b.write_bytes(b"weights")
    assert features.weights_identity(str(a)) == features.weights_identity(str(b))
    b.write_bytes(b"other weights")
    assert features.weights_identity(str(a)) != features.weights_identity(str(b))
    assert features.weights_identity("imagenet") == "imagenet"
    with pytest.raises(ValueError, match="pretrained"):
        features.weights_identity(None)


def test_features_are_computed_once_then_read_from_the_cache(tmp_path, monkeypatch):
    weights = save_weights("MobileNetV3Small", 32, tmp_path / "m.weights.h5")
    rng = np.random.default_rng(1)
    train = data.Split(rng.integers(0, 256, (10, 32, 32, 1), np.uint8), np.arange(10) % 2)
    val = data.Split(rng.integers(0, 256, (4, 32, 32, 1), np.uint8), np.arange(4) % 2)
    splits = {name: (split, integrity.split_sha256(split))
              for name, split in (("train", train), ("val", val))}
    cache = tmp_path / "cache"

    first = features.cached_features("MobileNetV3Small", 32, 1, weights, splits, cache)
    assert all(f.computed for f in first.values())
    assert first["train"].features.shape == (10, 576) and first["val"].features.shape == (4, 576)
    meta = json.loads(first["train"].path.with_suffix(".json").read_text())
    assert meta["split_sha256"] == splits["train"][1] and meta["n"] == 10
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [f"{f.key}.npy" for f in first.values()] + [f"{f.key}.json" for f in first.values()])

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although the features were cached")

    monkeypatch.setattr(features, "build_extractor", no_backbone)
    again = features.cached_features("MobileNetV3Small", 32, 1, weights, splits, cache)
    assert not any(f.computed for f in again.values())
    np.testing.assert_array_equal(again["train"].features, first["train"].features)

    # Other images (here: a subset of train) are another key, so they are computed.
    subset = train.subset(np.arange(6))
    with pytest.raises(AssertionError, match="backbone ran"):
        features.cached_features("MobileNetV3Small", 32, 1, weights,
                                 {"train": (subset, integrity.split_sha256(subset))}, cache)
