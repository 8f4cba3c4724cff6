"""lungxray.ensemble on fake trial dirs that follow the train/evaluate file contract: the
ensemble candidate (members' mean, its own validation threshold, when it is skipped) and its model
folder, through :func:`lungxray.report.compare`, the public entry, where files matter."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungxray.report import compare
from tests.trial_helpers import CLASSES, ENS_A, ENS_B, POOR, make_trial, three_trials


@pytest.fixture
def trials(tmp_path: Path) -> list[Path]:
    return three_trials(tmp_path)


def test_ensemble_is_the_members_mean_with_its_own_val_threshold(
    trials: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    ens_val = json.loads((out / "ensemble" / "val" / "metrics.json").read_text())
    ens_test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    # Top 2 on val_roc_auc: VGG16 (GOOD) and ResNet152V2 (MID). Mean on val:
    # [.1, .2, .525, .7, .8, .9] -> perfect split, most conservative threshold 0.7.
    assert ens_val["threshold"] == pytest.approx(0.7)
    assert ens_val["roc_auc"] == pytest.approx(1.0)
    # Mean on test of POOR (VGG16) and GOOD (ResNet152V2): [.1, .525, .525, .7, .8, .9];
    # at 0.7 every sample is right.
    assert ens_test["threshold"] == pytest.approx(0.7)
    assert ens_test["confusion_matrix"] == [[3, 0], [0, 3]]
    preds = pd.read_csv(out / "ensemble" / "test" / "predictions.csv")
    assert preds["prob_pneumonia"].tolist() == pytest.approx([.1, .525, .525, .7, .8, .9])
    assert ens_test["ci"]["roc_auc"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"]["members"] == ["VGG16", "ResNet152V2"]


def test_winning_ensemble_becomes_best_model(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, "A", {"val": ENS_A, "test": ENS_A}),
            make_trial(root, "B", {"val": ENS_B, "test": ENS_B}),
            make_trial(root, "C", {"val": POOR, "test": POOR})]
    out = tmp_path / "report"
    summary = compare(dirs, out)
    assert summary["best_model"] == "Ensemble-top2" and summary["best_is_ensemble"]
    assert summary["select_value"] == pytest.approx(1.0)
    best = out / "best_model"
    spec = json.loads((best / "ensemble.json").read_text())
    assert spec["members"] == ["A", "B"] and spec["kind"] == "mean_probability"
    assert spec["class_names"] == CLASSES and spec["image_size"] == 32
    # Threshold chosen on the ensemble's own val probabilities (both classes perfectly split:
    # negatives up to 0.425, positives from 0.55 -> the highest perfect threshold is 0.55).
    assert spec["threshold"] == pytest.approx(0.55)
    for name in ("A", "B"):
        member = best / "members" / name
        assert (member / "model.keras").read_bytes() == f"fake keras model {name}".encode()
        assert json.loads((member / "model_info.json").read_text())["model_name"] == name
    assert json.loads((best / "model_info.json").read_text()) == spec
    assert (out / "model_card.md").read_text().startswith("# Model card: Ensemble-top2")


def test_ensemble_threshold_can_target_a_sensitivity(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, "A", {"val": ENS_A}), make_trial(root, "B", {"val": ENS_B})]
    summary = compare(dirs, tmp_path / "report", ensemble_k=2, target_sensitivity=0.6)
    # Ensemble val positives score .55, .75, .9: sensitivity 2/3 >= 0.6 first at 0.75.
    assert summary["ensemble"]["threshold"] == pytest.approx(0.75)
    assert summary["ensemble"]["target_sensitivity"] == 0.6
    with pytest.raises(ValueError, match="target_sensitivity"):
        compare(dirs, tmp_path / "r2", target_sensitivity=1.5)
    # Members whose thresholds were chosen for a target sensitivity pass it on.
    extra = {"threshold_method": "sensitivity>=0.6"}
    dirs = [make_trial(root / "t", "A", {"val": ENS_A}, info_extra=extra),
            make_trial(root / "t", "B", {"val": ENS_B}, info_extra=extra)]
    inherited = compare(dirs, tmp_path / "r3")["ensemble"]
    assert inherited["threshold"] == pytest.approx(0.75)
    assert inherited["threshold_method"] == "sensitivity>=0.6"


def test_ensemble_skipped_with_reason(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": ENS_A})
    # Same labels, other order: rows of the two predictions.csv do not describe the same images.
    b = make_trial(root, "B", {"val": ENS_B}, labels={"val": np.array([1, 0, 0, 0, 1, 1])})
    summary = compare([a, b], tmp_path / "report")
    assert "same order" in summary["ensemble"]["skipped"]
    # B on its labels: positive 0.1 loses to all three negatives -> AUC 6/9, below A's 8/9.
    assert [r["model_name"] for r in summary["ranking"]] == ["A", "B"]
    assert not (tmp_path / "report" / "ensemble").exists()
    assert compare([a], tmp_path / "r1")["ensemble"] == {"skipped": "only one model"}
    off = compare([a, b], tmp_path / "r0", ensemble_k=0)["ensemble"]["skipped"]
    assert "ensemble_k=0" in off
    page = (tmp_path / "r0" / "report.html").read_text()
    assert "No ensemble candidate" in page


def test_ensemble_multiclass(tmp_path: Path) -> None:
    classes = ["normal", "bacterial", "viral"]
    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3) * 0.7 + 0.1
    labels = {"val": y, "test": y}
    root = tmp_path / "trials"
    dirs = [make_trial(root, "Good", {"val": eye[y], "test": eye[y]}, classes=classes,
                       labels=labels),
            make_trial(root, "Bad", {"val": eye[(y + 1) % 3], "test": eye[y]}, classes=classes,
                       labels=labels)]
    summary = compare(dirs, tmp_path / "report", select_metric="val_accuracy")
    assert summary["best_model"] == "Good"
    ens = json.loads((tmp_path / "report/ensemble/val/metrics.json").read_text())
    assert ens["threshold"] is None
    # Mean of the right one-hot-ish rows and the shifted ones: true class .45, next class .45,
    # the third .1 -> argmax ties go to the lower index.
    expected = (eye[y] + eye[(y + 1) % 3]) / 2
    pred = expected.argmax(axis=1)
    assert ens["accuracy"] == pytest.approx(np.mean(pred == y))
    assert set(ens["per_class"]) == set(classes)
    assert ens["per_class"]["viral"]["ci"]["recall"] is not None


def test_an_ensemble_of_two_sites_chooses_each_sites_threshold_on_its_mean(tmp_path: Path
                                                                           ) -> None:
    from lungxray import site_metrics

    rng = np.random.default_rng(5)
    sites = np.array(["a"] * 30 + ["b"] * 30, dtype=object)
    labels = np.tile(np.r_[np.zeros(15, int), np.ones(15, int)], 2)
    scores, trials = {}, []
    for name in ("NetA", "NetB"):
        # Site b's scores sit higher: its own cut is not the pooled one.
        score = np.clip(rng.normal(0.3 + 0.3 * labels + 0.25 * (sites == "b"), 0.12), 0, 1)
        scores[name] = score
        trial = make_trial(tmp_path, name, {s: score.tolist() for s in ("val", "test")},
                           labels={s: labels for s in ("val", "test")})
        for split in ("val", "test"):
            preds = trial / "eval" / split / "predictions.csv"
            pd.read_csv(preds).assign(site=sites).to_csv(preds, index=False)
        trials.append(trial)
    out = tmp_path / "report"
    compare(trials, out)
    mean = (scores["NetA"] + scores["NetB"]) / 2
    want = site_metrics.site_thresholds(labels, mean, sites, "youden")
    assert set(want) == {"a", "b"} and want["b"] > want["a"]
    test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    assert {s: b["at_site_threshold"]["threshold"] for s, b in test["per_site"].items()} == \
        pytest.approx(want)
