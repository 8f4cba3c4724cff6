"""Shift folds: the training pool cut into image-statistics folds per site, each fold a real
prepared dataset, the recipe trained on each and its out-of-fold predictions one more split."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest

from lungxray import artifacts, crossfold, integrity, prepare, selection, shift, site_metrics
from lungxray.errors import ConfigError, DataError


def _check_partition(pool: crossfold.Pool, manifest: dict, k: int) -> None:
    assert len(pool.labels) == sum(manifest["splits"][s]["n"] for s in crossfold.POOL_SPLITS
                                   if s in manifest["splits"])
    assert sorted(set(pool.fold.tolist())) == list(range(k))
    for i in range(k):  # every fold holds every class
        assert set(pool.labels[pool.fold == i].tolist()) == {0, 1}


def test_the_pool_is_cut_into_folds_that_are_real_datasets(carved, tmp_path):
    manifest = integrity.read_manifest(carved)
    pool = crossfold.pool_folds(carved, manifest, 3, 0)
    _check_partition(pool, manifest, 3)
    again = crossfold.pool_folds(carved, manifest, 3, 0)
    assert np.array_equal(pool.fold, again.fold)  # seeded: every model gets the same folds
    # Copies of one image never straddle two folds.
    files = pd.read_csv(carved / "files.csv")
    sha = {(r.split, r.index): r.sha1 for r in files.itertuples()}
    by_sha: dict[str, set[int]] = {}
    for source, row, fold in zip(pool.source, pool.row, pool.fold, strict=True):
        by_sha.setdefault(sha[(source, row)], set()).add(int(fold))
    assert all(len(folds) == 1 for folds in by_sha.values())
    out = tmp_path / "fold2"
    crossfold.write_fold(carved, manifest, pool, 1, out)
    fold = integrity.read_manifest(out)
    assert list(fold["splits"]) == ["train", "val", shift.SPLIT]
    held = np.flatnonzero(pool.fold == 1)
    for name in fold["splits"]:  # every split matches the sha256 its manifest records
        integrity.load_checked_split(out, name, fold)
    ts = integrity.load_checked_split(out, shift.SPLIT, fold)
    assert np.array_equal(ts.images, pool.images(held))
    assert fold["splits"]["train"]["n"] == len(pool.labels) - len(held)
    assert fold["splits"]["val"] == manifest["splits"]["val"]


def test_each_site_is_folded_on_its_own(shared_npz, shared_nih, tmp_path):
    data = tmp_path / "two"
    manifest = prepare.preprocess(str(shared_npz), data, image_size=16, seed=3,
                                  max_per_split=300, sites=[("nih", str(shared_nih))])
    pool = crossfold.pool_folds(data, manifest, 2, 3)
    _check_partition(pool, manifest, 2)
    for site in ("pneumoniamnist", "nih"):  # both sites in both folds
        assert set(pool.fold[pool.sites == site].tolist()) == {0, 1}
    crossfold.write_fold(data, manifest, pool, 0, tmp_path / "fold1")
    fold = integrity.read_manifest(tmp_path / "fold1")
    # Rows site after site, as preprocess writes them: the per-site rows read back.
    rows = site_metrics.site_rows(fold, shift.SPLIT, "fold")
    assert rows.tolist() == pool.sites[pool.fold == 0].tolist()
    assert fold["splits"]["train"]["sites"]["nih"]["n"] == int(
        ((pool.sites == "nih") & (pool.fold == 1)).sum())


def test_crossfold_writes_out_of_fold_predictions_as_a_split(carved, pick, tmp_path):
    evaluation = tmp_path / "eval"
    result = crossfold.crossfold(carved, pick, 2, evaluation, epochs=1)
    manifest = integrity.read_manifest(carved)
    pool = crossfold.pool_folds(carved, manifest, 2, manifest["seed"])
    split_dir = evaluation / crossfold.SPLIT
    preds = pd.read_csv(split_dir / artifacts.PREDICTIONS_FILE)
    assert preds["y_true"].tolist() == pool.labels.tolist() and result["n"] == len(pool.labels)
    block = result[crossfold.FOLDS_KEY]
    assert [f["n"] for f in block["per_fold"]] == [int((pool.fold == i).sum()) for i in (0, 1)]
    assert [f["train_images"] for f in block["per_fold"]] == [
        len(pool.labels) - f["n"] for f in block["per_fold"]]
    assert block["worst_fold_roc_auc"] == min(f["roc_auc"] for f in block["per_fold"])
    assert set(block["rules"]) == set(artifacts.THRESHOLD_RULES)
    youden = block["rules"]["youden"]
    assert youden["worst"] == min(youden["balanced_accuracy"])
    # The recipe of the pick: its network, seed and threshold rule.
    assert result["model_name"] == "SmallCNN" and result["threshold_method"] == "platt"
    folds_csv = pd.read_csv(split_dir / "folds.csv")
    assert folds_csv["fold"].tolist() == (pool.fold + 1).tolist()
    # A split like any other: a trial with it loads, with its AUC as a column to rank on.
    trial = tmp_path / "trial"
    (trial / "eval").mkdir(parents=True)
    shutil.copytree(pick, trial / "model")
    shutil.copytree(split_dir, trial / "eval" / crossfold.SPLIT)
    table = selection.build_table([selection.load_trial(trial)])
    assert table.loc[0, "shift_folds_roc_auc"] == result["roc_auc"]


@pytest.mark.parametrize("folds", [1, 11, -2, True])
def test_bad_fold_counts_are_refused_before_anything_is_written(carved, pick, tmp_path, folds):
    with pytest.raises(ConfigError, match="shift_folds must be 0"):
        crossfold.crossfold(carved, pick, folds, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_no_folds_an_ensemble_or_a_foreign_output_write_nothing(carved, pick, tmp_path):
    assert crossfold.crossfold(carved, pick, 0, tmp_path / "out") is None
    assert not (tmp_path / "out").exists()
    ensemble = tmp_path / "ensemble"
    shutil.copytree(pick, ensemble)
    info = json.loads((ensemble / artifacts.INFO_FILE).read_text())
    (ensemble / artifacts.INFO_FILE).write_text(json.dumps({**info, "ensemble": True}))
    with pytest.raises(ConfigError, match="an ensemble"):
        crossfold.crossfold(carved, ensemble, 2, tmp_path / "out")
    foreign = tmp_path / "mine" / crossfold.SPLIT
    foreign.mkdir(parents=True)
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        crossfold.crossfold(carved, pick, 2, tmp_path / "mine")
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]


def test_a_site_too_small_to_fold_is_named(shared_npz, shared_nih, tmp_path):
    data = tmp_path / "small"
    prepare.preprocess(str(shared_npz), data, image_size=16, seed=3, max_per_split=60,
                       sites=[("nih", str(shared_nih))])
    with pytest.raises(DataError, match=r"^site 'nih': cannot cut 2 shift folds from \d+ "):
        crossfold.pool_folds(data, integrity.read_manifest(data), 2, 3)



@pytest.mark.parametrize("damage, message", [
    (lambda t: t.iloc[:-3], "files.csv lists"),
    (lambda t: t.drop(columns="sha1"), r"lacks column\(s\) \['sha1'\]"),
    (None, "not a regular file"),
])
def test_a_damaged_files_index_is_refused_before_any_training(carved, pick, tmp_path, damage,
                                                                 message):
    data = tmp_path / "data"
    shutil.copytree(carved, data)
    index = data / "files.csv"
    if damage is None:  # a FIFO in its place: refused, never read (nothing would ever write it)
        index.unlink()
        os.mkfifo(index)
    else:
        damage(pd.read_csv(index)).to_csv(index, index=False)
    with pytest.raises(DataError, match=message):
        crossfold.crossfold(data, pick, 2, tmp_path / "out")
    assert not (tmp_path / "out").exists()
