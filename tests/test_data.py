"""The prepared-dataset format: which files belong to it, reading a split back (memory-mapped,
its split named when missing), a stratified sample, and formats this version cannot read."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lungxray import data, prepare


def test_a_prepared_split_is_read_back_memory_mapped_and_a_missing_one_is_named(small_dataset):
    manifest = data.read_manifest(small_dataset)
    assert data.is_prepared(small_dataset)
    val = data.load_split(small_dataset, "val")
    assert isinstance(val.images, np.memmap) and val.images.dtype == np.uint8
    assert val.images.shape == (manifest["splits"]["val"]["n"], 32, 32, manifest["channels"])
    assert val.labels.dtype == np.int64 and len(val) == len(val.images)
    with pytest.raises(data.DataError, match=r"has no 'nope' split \(available: train, val, "):
        data.load_split(small_dataset, "nope")
    with pytest.raises(data.DataError, match=r"not a prepared dataset \(no manifest.json\)"):
        data.read_manifest(small_dataset / "train_images.npy")
    meta = data.manifest_metadata(manifest)
    assert meta["n_val"] == len(val) and meta["image_size"] == 32


def test_only_a_splits_own_arrays_belong_to_a_prepared_dataset():
    for name in ("train_images.npy", "val_labels.npy", "test_images.npy"):
        assert data.is_array_file(name)
    for name in ("train_images.npy.bak", "notes.npy", "train.npy", "manifest.json"):
        assert not data.is_array_file(name)
    assert data.images_file("val") == "val_images.npy"
    assert data.labels_file("val") == "val_labels.npy"


def test_a_stratified_sample_keeps_the_class_shares_and_its_seed():
    labels = np.array([0] * 80 + [1] * 20)
    split = data.Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1), labels)
    sample = data.stratified_sample(split, 10, seed=3)
    assert len(sample) == 10 and np.bincount(sample.labels).tolist() == [8, 2]
    np.testing.assert_array_equal(sample.labels, split.labels[sample.images[:, 0, 0, 0]])
    again = data.stratified_sample(split, 10, seed=3)
    np.testing.assert_array_equal(again.images, sample.images)
    assert data.stratified_sample(split, 0, seed=3) is split  # 0: no limit


def test_a_dataset_of_an_older_or_unknown_format_is_refused_in_one_line(tmp_path):
    np.savez(tmp_path / "val.npz", images=np.zeros((3, 8, 8, 1), np.uint8), labels=[0, 1, 0])
    manifest = tmp_path / data.MANIFEST
    manifest.write_text(json.dumps({"format": "lungxray-dataset/1", "splits": {"val": {"n": 3}}}))
    assert not data.is_prepared(tmp_path)
    with pytest.raises(data.DataError, match=r"older format 'lungxray-dataset/1'.*re-run "
                                             r"`lungxray preprocess`") as err:
        data.load_split(tmp_path, "val")
    assert "\n" not in str(err.value)
    manifest.write_text(json.dumps({"format": "something-else/7", "splits": {}}))
    with pytest.raises(data.DataError, match=r"unknown format 'something-else/7', expected "
                                             r"lungxray-dataset/2"):
        data.read_manifest(tmp_path)
    # preprocess will not write over it: it is no prepared dataset this version knows.
    with pytest.raises(data.DataError, match="is not a prepared dataset; refusing"):
        prepare.preprocess(str(tmp_path / "val.npz"), tmp_path)

