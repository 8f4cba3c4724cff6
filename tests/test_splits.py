"""Splits on labels and hashes alone: duplicates and patients grouped transitively, whole groups
carved together, stratified and seeded, and the duplicate reports counting what they say."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import splits
from lungxray.errors import DataError


def test_a_duplicate_across_two_patients_joins_them_in_one_group():
    hashes = np.array(["h1", "h2", "h3", "h2", "h4"])
    patients = np.array(["A", "A", "B", "C", "D"])
    groups = splits.group_ids(hashes, patients)
    # A's h2 is duplicated in C's image: A and C are one group; B and D stay apart.
    assert groups[0] == groups[1] == groups[3]
    assert len({groups[0], groups[2], groups[4]}) == 3
    np.testing.assert_array_equal(splits.group_ids(hashes), [0, 1, 2, 1, 3])


def test_carving_moves_whole_groups_stratified_and_seeded():
    labels = np.array([0, 1] * 50)
    groups = np.arange(100)
    groups[10] = groups[12]  # two copies: they must leave or stay together
    forced = np.zeros(100, bool)
    forced[0] = True  # has a copy elsewhere: never carved
    mask = splits.carve(labels, groups, 0.2, seed=4, forced=forced)
    assert mask.sum() in (20, 21) and not mask[0] and mask[10] == mask[12]
    assert abs(labels[mask].mean() - 0.5) <= 0.05  # both classes in their share
    np.testing.assert_array_equal(mask, splits.carve(labels, groups, 0.2, seed=4, forced=forced))
    assert not np.array_equal(mask, splits.carve(labels, groups, 0.2, seed=5, forced=forced))


def test_carving_refuses_what_cannot_be_stratified_or_grouped():
    with pytest.raises(DataError, match=r"class counts \{0: 5, 1: 1\} need at least two"):
        splits.carve(np.array([0] * 5 + [1]), np.arange(6), 0.3, seed=0, name="test")
    with pytest.raises(DataError, match=r"by patient: only 3 patient group\(s\) can move, need "
                                        r"at least 10"):
        splits.carve(np.array([0, 1] * 6), np.arange(12) // 4, 0.1, seed=0, by_patient=True)


def test_duplicate_reports_count_copies_conflicts_and_shared_patients():
    within = splits.within_split_duplicates(np.array(["a", "b", "a", "a", "c"]),
                                            np.array([0, 1, 1, 0, 0]),
                                            origins=["f0", "f1", "f2", "f3", "f4"])
    assert within["count"] == 2 and within["groups"] == 1 and within["label_conflicts"] == 1
    assert within["examples"] == [[0, 2]] and within["files"] == [["f0", "f2"]]
    cross = splits.cross_split_duplicates({"train": np.array(["a", "b"]),
                                           "test": np.array(["b", "b", "c"])})
    assert cross == {"train/test": {"count": 2, "examples": [[1, 0]]}}
    groups = splits.cross_split_groups({"train": np.array(["p1", "p2"]),
                                        "val": np.array(["p2", "p3"])})
    assert groups == {"train/val": {"count": 1, "examples": ["p2"]}}
    kept = splits.stratified_indices(np.array([0] * 8 + [1] * 2), 5, seed=0)
    assert len(kept) == 5 and list(kept) == sorted(kept)
