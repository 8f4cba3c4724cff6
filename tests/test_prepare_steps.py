"""The steps one source and several sites share (lungxray.prepare_steps): pass 2 copies rows
out chunk by chunk under the split hash that integrity checks, the plan carves val and test
from train without splitting a group of identical images, and the checks refuse what cannot be
prepared. End-to-end preparation: test_prepare.py and test_site_prepare.py."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import data, integrity, pools, prepare_steps, sources
from lungxray.errors import DataError
from lungxray.limits import Limits
from lungxray.pools import Pool, Settings

SIZE = 8


def _pool(tmp_path, name: str, labels: list[int], hashes: list[str] | None = None) -> Pool:
    """A pool of random 8 px images on disk, every row usable."""
    images = np.random.default_rng(len(labels)).integers(
        0, 256, (len(labels), SIZE, SIZE, 1), dtype=np.uint8)
    np.save(tmp_path / f"{name}.npy", images)
    n = len(labels)
    return Pool(tmp_path / f"{name}.npy", np.array(labels, np.int64),
                np.array(hashes or [f"{name}{i}" for i in range(n)], dtype=object),
                np.full(n, "", dtype=object), [f"{name}/{i}.png" for i in range(n)],
                np.ones(n, bool))


def test_write_split_copies_the_parts_in_order_in_chunks_under_the_integrity_hash(
        tmp_path, monkeypatch):
    monkeypatch.setattr(pools, "CHUNK_BYTES", 3 * SIZE * SIZE)  # 3 rows per chunk
    first, second = _pool(tmp_path, "a", [0, 1] * 4), _pool(tmp_path, "b", [1, 0, 1])
    rows_a, rows_b = np.array([6, 0, 3, 5, 1]), np.array([2, 0])
    labels = np.concatenate([first.labels[rows_a], second.labels[rows_b]])
    histograms = np.zeros((2, 256), np.int64)
    sha = prepare_steps.write_split([(first.images(), rows_a), (second.images(), rows_b)],
                                    labels, tmp_path / "out.npy",
                                    Settings(SIZE, 1, False, 8, 1), histograms)
    written = np.load(tmp_path / "out.npy")
    expected = np.concatenate([first.images()[rows_a], second.images()[rows_b]])
    np.testing.assert_array_equal(written, expected)
    assert sha == integrity.split_sha256(data.Split(written, labels))
    for label in (0, 1):
        np.testing.assert_array_equal(
            histograms[label], np.bincount(expected[labels == label].reshape(-1), minlength=256))


def test_plan_carves_val_and_test_from_train_keeping_identical_images_together(tmp_path):
    labels = [0, 1] * 30
    hashes = [f"h{i}" for i in range(60)]
    hashes[1] = hashes[3] = hashes[5] = "copy"  # one image three times: one group
    train = _pool(tmp_path, "train", labels, hashes)
    fractions = {"val": 0.2, "test": 0.2}
    plan, carved, shift_info = prepare_steps.plan_splits({"train": train}, True, fractions,
                                                         seed=7, max_per_split=0,
                                                         by_patient=False)
    assert list(plan) == ["train", "val", "test"] and shift_info is None
    assert carved == {"test": "train", "val": "train"}
    rows = {name: r for name, (pool, r) in plan.items()}
    assert sorted(np.concatenate(list(rows.values())).tolist()) == list(range(60))
    for name in ("val", "test"):  # a fifth of train as given, counted in distinct images
        assert len(set(train.hashes[rows[name]])) == 12, name
    holding_copy = [name for name, r in rows.items() if {1, 3, 5} & set(r.tolist())]
    assert len(holding_copy) == 1 and {1, 3, 5} <= set(rows[holding_copy[0]].tolist())
    again, _, _ = prepare_steps.plan_splits({"train": train}, True, fractions, 7, 0, False)
    assert all(np.array_equal(again[name][1], rows[name]) for name in rows)
    capped, _, _ = prepare_steps.plan_splits({"train": train}, True, fractions, 7, 10, False)
    assert [len(r) for _, r in capped.values()] == [10, 10, 10]


def test_the_checks_refuse_what_cannot_be_prepared(tmp_path):
    limits = Limits(max_image_size=512)
    with pytest.raises(DataError, match=r"^src: image size 4 px is below the minimum of 8 px"):
        prepare_steps.check_image_size("src", 4, limits)
    with pytest.raises(DataError, match=r"image size 1024 px is above the limit of 512 px"):
        prepare_steps.check_image_size("src", 1024, limits)
    prepare_steps.check_image_size("src", 512, limits)
    one_class = _pool(tmp_path, "train", [1, 1, 1])
    with pytest.raises(DataError, match=r"only one class \['pneumonia'\] has training images"):
        prepare_steps.check_classes("src", one_class, ["normal", "pneumonia"])
    given = {"train": _pool(tmp_path, "train", [0, 1, 0, 1]), "val": _pool(tmp_path, "val", [0])}
    with pytest.raises(DataError, match=r"split 'val' has no images of class\(es\) \['b'\]"):
        prepare_steps.check_coverage("src", given, ["a", "b"])
    root = tmp_path / "folder"
    (root / "a").mkdir(parents=True)
    folder = sources.Source(kind="folder", root=root, class_names=["a"], splits={})
    with pytest.raises(DataError, match=r"lies inside the source folder src; choose an output"):
        prepare_steps.check_outside_source("src", folder, root / "prepared")
    prepare_steps.check_outside_source("src", folder, tmp_path / "prepared")
