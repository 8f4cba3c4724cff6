"""The shifted test split: whole image-statistics clusters held out of train (lungxray.shift),
one region or one of K folds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lungxray import integrity, prepare, shift
from lungxray.errors import DataError


def _two_machines(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Grey 28 px images from two 'machines': most dim and low-contrast, a fifth bright and
    contrasty; both classes on both."""
    rng = np.random.default_rng(seed)
    bright = np.arange(n) % 5 == 0
    base = np.where(bright, 170, 80)[:, None, None]
    spread = np.where(bright, 50, 15)[:, None, None]
    images = np.clip(base + spread * rng.standard_normal((n, 28, 28)), 0, 255)
    labels = rng.integers(0, 2, n)
    return images.astype(np.uint8)[..., None], labels, bright


def _features(images: np.ndarray, seed: int = 0) -> np.ndarray:
    return shift.shift_features(*shift.image_statistics(images), seed)


def test_held_out_images_are_whole_clusters_of_one_machine_with_both_classes():
    images, labels, bright = _two_machines()
    mask, info = shift.carve_shifted(_features(images), labels, np.arange(len(labels)), 0.15, 0)
    # The held-out region lies on one side of the image-statistics space: all from one
    # machine, none from the other, with every class present.
    assert mask.sum() == info["n"] and 0.05 * len(labels) < mask.sum() < 0.3 * len(labels)
    assert bright[mask].all() or not bright[mask].any()
    assert set(labels[mask].tolist()) == {0, 1}
    assert info["features"] == shift.FEATURE_NAMES
    assert abs(info["mean_shift_sd"]["mean"]) > 1.0  # systematically brighter or darker


def test_carving_is_seeded_and_keeps_groups_and_blocked_images():
    images, labels, _ = _two_machines()
    features = _features(images)
    groups = np.arange(len(labels)) // 2  # pairs of images (a patient, a duplicate) move together
    first, _ = shift.carve_shifted(features, labels, groups, 0.15, 3)
    again, _ = shift.carve_shifted(features, labels, groups, 0.15, 3)
    np.testing.assert_array_equal(first, again)
    for g in np.unique(groups):
        assert len(set(first[groups == g].tolist())) == 1
    blocked = first.copy()  # pretend every image it took has a copy in val: none may move
    mask, _ = shift.carve_shifted(features, labels, groups, 0.15, 3, blocked=blocked)
    assert not (mask & blocked).any()


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1])
def test_a_fraction_outside_0_1_is_refused(fraction):
    images, labels, _ = _two_machines(60)
    with pytest.raises(DataError, match="shifted_test_fraction"):
        shift.carve_shifted(_features(images), labels, np.arange(60), fraction, 0)


def test_one_class_everywhere_but_one_cluster_cannot_be_held_out():
    images, labels, bright = _two_machines(200)
    labels = bright.astype(int)  # class == machine: any region lacks one class
    with pytest.raises(DataError, match="holds every class"):
        shift.carve_shifted(_features(images), labels, np.arange(200), 0.1, 0, n_clusters=4)


def test_preprocess_writes_a_checked_shifted_split_beside_a_random_test(tmp_path, shared_npz):
    output = tmp_path / "prepared"
    manifest = prepare.preprocess(str(shared_npz), output, seed=0, max_per_split=400,
                                  shifted_test_fraction=0.1)
    assert list(manifest["splits"]) == ["train", "val", "test", "test_shifted"]
    assert manifest["carved"]["test_shifted"] == "train"
    assert manifest["shift"]["n"] >= manifest["splits"]["test_shifted"]["n"] > 0
    # Checksummed like every split: a tampered shifted split is refused like any other.
    shifted = integrity.load_checked_split(output, "test_shifted", manifest)
    assert set(np.unique(shifted.labels).tolist()) == {0, 1}
    train_split = integrity.load_checked_split(output, "train", manifest)
    cross = manifest["cross_split_duplicates"]
    assert cross["train/test_shifted"]["count"] == 0 and cross["test/test_shifted"]["count"] == 0
    # Held-out images differ systematically from those left to train on.
    biggest = max(abs(v) for v in manifest["shift"]["mean_shift_sd"].values())
    assert biggest > 0.5
    assert abs(shifted.images.mean() - train_split.images.mean()) > 5
    report = (output / "data_report.md").read_text()
    assert "test_shifted (carved from train)" in report and "shift (SD)" in report
    assert "Shifted test split" in (output / "data_report.html").read_text()
    assert json.loads((output / "manifest.json").read_text())["shifted_test_fraction"] == 0.1


def test_without_the_option_there_is_no_shifted_split(small_dataset):
    manifest = integrity.read_manifest(small_dataset)
    assert "test_shifted" not in manifest["splits"] and manifest["shift"] is None


def test_fractions_that_leave_no_train_are_refused(tmp_path, shared_npz):
    with pytest.raises(DataError, match="shifted_test_fraction must be below 1"):
        prepare.preprocess(str(shared_npz), tmp_path / "out", val_fraction=0.4,
                           test_fraction=0.4, shifted_test_fraction=0.3)
    assert not (tmp_path / "out").exists()


def test_folds_hold_every_image_out_once_and_keep_groups_and_blocked_images():
    images, labels, _ = _two_machines(400)
    features = _features(images)
    groups = np.arange(len(labels)) // 2
    blocked = np.zeros(len(labels), bool)
    blocked[:10] = True  # copies in val: never held out
    masks = [shift.fold_mask(features, labels, groups, (i, 3), 5, blocked)[0]
             for i in (1, 2, 3)]
    # Every image but the blocked ones in exactly one fold, each fold with both classes.
    np.testing.assert_array_equal(np.sum(masks, axis=0), ~blocked)
    for mask in masks:
        assert set(labels[mask].tolist()) == {0, 1}
        assert all(len(set(mask[groups == g].tolist())) == 1 for g in np.unique(groups))
    _, info = shift.fold_mask(features, labels, groups, (2, 3), 5, blocked)
    assert info["fold"] == 2 and info["folds"] == 3 and info["n"] == masks[1].sum()
    assert sum(info["fold_sizes"]) == (~blocked).sum()
    np.testing.assert_array_equal(
        shift.fold_mask(features, labels, groups, (2, 3), 5, blocked)[0], masks[1])


@pytest.mark.parametrize("fold", [(0, 4), (5, 4), (1, 1), (1, 11)])
def test_a_fold_outside_its_range_is_refused(fold):
    images, labels, _ = _two_machines(60)
    with pytest.raises(DataError, match="shift fold must be I/K"):
        shift.fold_mask(_features(images), labels, np.arange(60), fold, 0)


def test_preprocessing_each_fold_holds_every_training_image_out_once(tmp_path, shared_npz):
    source = tmp_path / "real.npz"
    with np.load(shared_npz) as npz:  # 600 real training images, val/test carved from them
        labels = npz["train_labels"].ravel()
        rows = np.r_[np.flatnonzero(labels == 0)[:200], np.flatnonzero(labels == 1)[:400]]
        np.savez(source, train_images=npz["train_images"][rows],
                 train_labels=npz["train_labels"][rows])
    held, trained = [], []
    for i in (1, 2):
        manifest = prepare.preprocess(str(source), tmp_path / f"fold{i}", seed=0,
                                      shift_fold=(i, 2))
        assert manifest["shift"]["fold"] == i and manifest["shift"]["folds"] == 2
        index = pd.read_csv(tmp_path / f"fold{i}" / "files.csv")
        held.append(set(index.loc[index["split"] == "test_shifted", "file"]))
        trained.append(set(index.loc[index["split"] != "test_shifted", "file"]))
    assert not held[0] & held[1]  # no image held out twice
    assert held[0] | held[1] == trained[0] | held[0]  # every image held out once
    assert held[1] <= trained[0] and held[0] <= trained[1]


def test_a_bad_fold_on_the_command_line_is_one_line_and_writes_nothing(tmp_path, capsys):
    from lungxray import cli

    for text, message in (("x", "expected I/K"), ("3/2", "shift fold must be I/K")):
        argv = ["preprocess", "--source", "unused.npz", "--output", str(tmp_path / "o"),
                "--shift-fold", text]
        try:
            code = cli.main(argv)
        except SystemExit as exit_info:  # argparse's own refusal
            code = exit_info.code
        assert code != 0
        err = capsys.readouterr().err
        assert message in err.strip().splitlines()[-1], err
    assert not (tmp_path / "o").exists()
