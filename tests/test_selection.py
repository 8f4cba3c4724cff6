"""lungxray.selection on fake trial dirs that follow the train/evaluate file contract: loading
and pairing trials, ranking on a validation metric and the model folder that ships (through
:func:`lungxray.report.compare`, the public entry, where files matter). The ensemble candidate's
own tests are in test_ensemble.py."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungxray import safeio, selection
from lungxray.artifacts import Ensemble, Trial
from lungxray.errors import ConfigError, ModelError
from lungxray.limits import Limits
from lungxray.report import compare
from lungxray.selection import load_trial, pair_trials
from tests.trial_helpers import (
    GOOD,
    MID,
    POOR,
    Y,
    add_robustness,
    make_trial,
    three_trials,
)


@pytest.fixture
def trials(tmp_path: Path) -> list[Path]:
    return three_trials(tmp_path)


def test_compare_selects_on_validation_not_test(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    summary = compare(trials, out)
    assert summary["best_model"] == "VGG16"
    assert summary["select_metric"] == "val_roc_auc"
    assert summary["select_value"] == pytest.approx(1.0)
    # The top-2 ensemble (VGG16 + ResNet152V2) ties VGG16 at 1.0; the single model wins the tie.
    assert [r["model_name"] for r in summary["ranking"]] == [
        "VGG16", "Ensemble-top2", "ResNet152V2", "InceptionV3"]
    assert [r["value"] for r in summary["ranking"]] == pytest.approx([1.0, 1.0, 8 / 9, 6 / 9])
    assert summary["best_is_ensemble"] is False
    # The test split would have chosen another model.
    assert summary["best_model_scores"]["test_roc_auc"] == pytest.approx(6 / 9)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_best_model_is_a_real_copy(trials: list[Path], tmp_path: Path) -> None:
    # Links at both levels (pair_trials' dir link, a link to a file inside model/) are
    # dereferenced: best_model/ holds regular files only.
    model = trials[1] / "model"
    (model / "inner.bin").write_bytes(b"inner")
    (model / "alias.bin").symlink_to(model / "inner.bin")
    paired = pair_trials([t / "model" for t in trials], [t / "eval" for t in trials], None,
                         tmp_path / "work")
    out = tmp_path / "report"
    compare(paired, out)
    best = out / "best_model"
    assert not best.is_symlink()
    assert (best / "model.keras").read_bytes() == b"fake keras model VGG16"
    assert (best / "alias.bin").read_bytes() == b"inner"
    assert not any(p.is_symlink() for p in best.rglob("*"))
    assert json.loads((best / "model_info.json").read_text())["model_name"] == "VGG16"
    assert sorted(p.name for p in best.iterdir()) == sorted(
        p.name for p in (tmp_path / "trials" / "VGG16" / "model").iterdir())


@pytest.mark.parametrize("target", ["outside", "/dev/zero"])
def test_best_model_never_follows_a_link_out(trials: list[Path], tmp_path: Path,
                                             target: str) -> None:
    # Issue 26: a link in model/ to a file outside was copied into best_model/; /dev/zero
    # filled the disk. Refused in one line, nothing written, the fixed trial then compares.
    keras = trials[1] / "model" / "model.keras"
    original = keras.read_bytes()
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the model")
    keras.unlink()
    keras.symlink_to(outside if target == "outside" else Path(target))
    out = tmp_path / "report"
    with pytest.raises(ModelError, match="model.keras' links outside the folder"):
        compare(trials, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".report.build-*"))
    if target == "outside":  # the corrected trial compares (once: a compare takes ~10 s)
        keras.unlink()
        keras.write_bytes(original)
        assert compare(trials, out)["best_model"] == "VGG16"


def test_copy_model_folder_bounds(tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "w.bin").write_bytes(b"x" * 1000)
    os.mkfifo(source / "pipe")
    with pytest.raises(ModelError, match="'pipe' is not a regular file"):
        safeio.copy_model_folder(source, tmp_path / "a")
    (source / "pipe").unlink()
    (source / "loop").symlink_to(source / "sub", target_is_directory=True)
    with pytest.raises(ModelError, match="is a link to a folder"):
        safeio.copy_model_folder(source, tmp_path / "a")
    (source / "loop").unlink()
    with pytest.raises(ModelError, match="holds more than 999 bytes"):
        safeio.copy_model_folder(source, tmp_path / "a", Limits(max_model_folder_bytes=999))
    assert not (tmp_path / "a").exists()
    safeio.copy_model_folder(source, tmp_path / "a")
    assert (tmp_path / "a" / "sub" / "w.bin").read_bytes() == b"x" * 1000


def test_select_on_test_is_refused(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="never select on the test split"):
        compare(trials, out, select_metric="test_roc_auc")
    with pytest.raises(ValueError, match="val_"):
        compare(trials, out, select_metric="roc_auc")
    with pytest.raises(ValueError, match="not one of"):
        compare(trials, out, select_metric="val_threshold")
    assert not out.exists()


def test_lower_is_better_metric(trials: list[Path], tmp_path: Path) -> None:
    briers = {t.name: np.mean((np.array(s) - Y) ** 2)
              for t, s in zip(trials, (MID, GOOD, POOR), strict=True)}
    summary = compare(trials, tmp_path / "report", select_metric="val_brier")
    assert summary["best_model"] == min(briers, key=briers.get)
    assert summary["select_value"] == pytest.approx(min(briers.values()))


def test_ties_are_broken_by_name(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, n, {"val": GOOD, "test": GOOD}) for n in ("Zeta", "Alpha", "Mid")]
    summary = compare(dirs, tmp_path / "report")
    # Single models before the (equally good) ensemble, then by name.
    assert [r["model_name"] for r in summary["ranking"]] == ["Alpha", "Mid", "Zeta",
                                                             "Ensemble-top2"]
    assert [r["rank"] for r in summary["ranking"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(("metric", "values", "expected"), [
    ("val_roc_auc", [0.9, None, 0.95], ["C", "A", "B"]),  # higher is better
    ("val_brier", [0.2, None, 0.1], ["C", "A", "B"]),  # lower is better
])
def test_undefined_select_metric_ranks_last(metric, values, expected) -> None:
    table = pd.DataFrame({"model_name": ["A", "B", "C"], metric: values})
    assert selection.rank_models(table, metric)["model_name"].tolist() == expected


def test_a_metric_undefined_for_every_trial_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    labels = {"val": np.zeros(6, dtype=int)}
    a = make_trial(root, "A", {"val": GOOD, "test": GOOD}, labels=labels)
    with pytest.raises(ValueError, match="undefined for every trial"):
        compare([a], tmp_path / "report")


def test_multiclass_trials(tmp_path: Path) -> None:
    classes = ["normal", "bacterial", "viral"]
    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3) * 0.7 + 0.1
    good = eye[y]
    bad = eye[(y + 1) % 3]
    labels = {"val": y, "test": y}
    root = tmp_path / "trials"
    dirs = [make_trial(root, "Good", {"val": good, "test": bad}, classes=classes, labels=labels),
            make_trial(root, "Bad", {"val": bad, "test": good}, classes=classes, labels=labels)]
    summary = compare(dirs, tmp_path / "report", select_metric="val_accuracy")
    assert summary["best_model"] == "Good"
    df = pd.read_csv(tmp_path / "report" / "results.csv")
    assert df["val_threshold"].isna().all()


def test_load_trial_names_missing_file(trials: list[Path]) -> None:
    (trials[1] / "eval" / "test" / "predictions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"predictions\.csv.*VGG16"):
        load_trial(trials[1])
    (trials[2] / "model" / "history.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"history\.json.*InceptionV3"):
        load_trial(trials[2])


def test_load_trial_reads_contract(trials: list[Path]) -> None:
    t = load_trial(trials[1])
    assert isinstance(t, Trial) and t.model_name == "VGG16" and t.members == []
    assert list(t.splits) == ["val", "test"]
    assert t.phases[1]["name"] == "finetune"
    assert t.tune_dir is None
    assert t.splits["val"].metrics["roc_auc"] == pytest.approx(1.0)
    assert t.splits["val"].dir == trials[1] / "eval" / "val"
    assert t.splits["test"].robustness is None


def test_different_validation_data_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": GOOD})
    b = make_trial(root, "B", {"val": GOOD}, labels={"val": np.array([0, 0, 1, 1, 1, 1])})
    with pytest.raises(ValueError, match="same data"):
        compare([a, b], tmp_path / "report")


def test_duplicate_trial_names_are_refused(tmp_path: Path) -> None:
    a = make_trial(tmp_path / "one", "VGG16", {"val": GOOD})
    b = make_trial(tmp_path / "two", "VGG16", {"val": MID})
    with pytest.raises(ValueError,
                       match=r"duplicate model names across trial dirs: \['VGG16'\]"):
        compare([a, b], tmp_path / "report")


# --------------------------------------------------------------------------- pair_trials


def test_pair_trials_shuffled(trials: list[Path], tmp_path: Path) -> None:
    models = [t / "model" for t in trials]
    evals = [t / "eval" for t in trials]
    random.Random(1).shuffle(models)
    evals.reverse()
    paired = pair_trials(models, evals, None, tmp_path / "work")
    assert [p.name for p in paired] == ["InceptionV3", "ResNet152V2", "VGG16"]
    for p in paired:
        assert (p / "model").resolve() == (tmp_path / "trials" / p.name / "model").resolve()
        assert (p / "eval").resolve() == (tmp_path / "trials" / p.name / "eval").resolve()
        assert not (p / "tune").exists()
        assert load_trial(p).model_name == p.name
    assert compare(paired, tmp_path / "report")["best_model"] == "VGG16"


def test_pair_trials_with_tune_dirs(trials: list[Path], tmp_path: Path) -> None:
    tunes = []
    for t in trials[:2]:
        d = tmp_path / "tune" / f"out-{len(tunes)}"
        d.mkdir(parents=True)
        (d / "best_hparams.json").write_text(json.dumps({"model_name": t.name, "hparams": {}}))
        tunes.append(d)
    paired = pair_trials([t / "model" for t in trials], [t / "eval" for t in trials],
                         list(reversed(tunes)), tmp_path / "work")
    by_name = {p.name: p for p in paired}
    assert (by_name["ResNet152V2"] / "tune").resolve() == tunes[0].resolve()
    assert (by_name["VGG16"] / "tune").resolve() == tunes[1].resolve()
    assert not (by_name["InceptionV3"] / "tune").exists()


def test_pair_trials_duplicates(trials: list[Path], tmp_path: Path) -> None:
    models = [t / "model" for t in trials] + [trials[1] / "model"]
    with pytest.raises(ValueError, match="duplicate.*VGG16"):
        pair_trials(models, [t / "eval" for t in trials], None, tmp_path / "work")
    evals = [t / "eval" for t in trials] + [trials[0] / "eval"]
    with pytest.raises(ValueError, match="duplicate.*ResNet152V2"):
        pair_trials([t / "model" for t in trials], evals, None, tmp_path / "work")


def test_pair_trials_unmatched(trials: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="models without evaluation.*InceptionV3"):
        pair_trials([t / "model" for t in trials], [t / "eval" for t in trials[:2]], None,
                    tmp_path / "work")
    with pytest.raises(ValueError, match="evaluations without model.*VGG16"):
        pair_trials([trials[0] / "model"], [t / "eval" for t in trials[:2]], None,
                    tmp_path / "work")
    assert not (tmp_path / "work").exists()


# --------------------------------------------------------------------------- robustness & select()


def test_selection_on_robust_auc_and_the_ensembles_robustness(tmp_path: Path) -> None:
    # A is best on clean validation but collapses under corruption; B holds up.
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": GOOD, "test": GOOD})
    b = make_trial(root, "B", {"val": MID, "test": MID})
    for split in ("val", "test"):
        add_robustness(a, split, POOR)
        add_robustness(b, split, MID)
    clean = compare([a, b], tmp_path / "clean")
    # Six images: every candidate is tied with A on val AUC, and the tie goes to robustness.
    assert clean["ties"]["tied"][0] == "A" and len(clean["ties"]["tied"]) == 3
    assert clean["best_model"] != "A" and clean["ties"]["winner"] == clean["best_model"]
    out = tmp_path / "robust"
    summary = compare([a, b], out, select_metric="val_robust_auc")
    # Ensemble: the members' corrupted scores averaged row by row -> AUC 8/9, tying B, and a
    # single model wins a tie.
    assert [r["model_name"] for r in summary["ranking"]] == ["B", "Ensemble-top2", "A"]
    assert [r["value"] for r in summary["ranking"]] == pytest.approx([8 / 9, 8 / 9, 6 / 9])
    ens = json.loads((out / "ensemble" / "val" / "metrics.json").read_text())
    assert ens["robustness"]["auc"]["blur"]["2"] == pytest.approx(8 / 9)
    assert ens["robust_auc_drop"] == pytest.approx(1 - 8 / 9)
    assert (out / "ensemble" / "val" / "robustness.png").is_file()
    # Calibrated on its own val scores: the ensemble reports a label-free test prevalence.
    ens_test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    assert 0 < ens_test["prevalence_em"] < 1 and ens_test["prevalence"] == 0.5
    lowest = compare([a, b], tmp_path / "drop", select_metric="val_robust_auc_drop")
    assert lowest["best_model"] == "B"  # B loses nothing; lower is better
    page = (out / "report.html").read_text()
    assert "Robustness to acquisition shift" in page and "robust AUC" in page
    assert (out / "robustness_val.png").is_file()
    card = (out / "model_card.md").read_text()
    assert "## Robustness to acquisition shift" in card
    assert "| blur | 0.8889 | 0.8889 | 0.8889 |" in card
    for metric in ("val_prevalence_em", "val_deploy_ppv", "test_robust_auc"):
        with pytest.raises(ConfigError):
            selection.check_select_metric(metric)


def _scores(y: np.ndarray, noise: float, seed: int) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(1 / (1 + np.exp(-(4 * (y - 0.5) + rng.normal(0, noise, len(y))))))


def test_ties_on_validation_auc_go_to_the_more_robust_candidate(tmp_path: Path) -> None:
    y = np.tile([0, 1], 150)
    labels = {"val": y, "test": y}
    root = tmp_path / "trials"
    # A and B are indistinguishable on val (A a hair ahead); C is clearly worse.
    a = make_trial(root, "A", {"val": _scores(y, 1.6, 0), "test": _scores(y, 1.6, 1)},
                   labels=labels)
    b = make_trial(root, "B", {"val": _scores(y, 1.6, 11), "test": _scores(y, 1.6, 2)},
                   labels=labels)
    c = make_trial(root, "C", {"val": _scores(y, 6.0, 3), "test": _scores(y, 6.0, 4)},
                   labels=labels)
    for trial, corrupted in ((a, _scores(y, 12.0, 5)), (b, _scores(y, 1.7, 6)),
                             (c, _scores(y, 12.0, 7))):
        add_robustness(trial, "val", corrupted)
    out = tmp_path / "report"
    summary = compare([a, b, c], out, ensemble_k=0)
    ties = summary["ties"]
    assert ties["leader"] == "A" and ties["tied"] == ["A", "B"]
    lo, hi = ties["vs_leader"]["B"]["ci"]
    assert lo < 0 < hi and ties["vs_leader"]["C"]["ci"][1] < 0
    assert summary["best_model"] == "B" and ties["winner"] == "B"
    assert [r["model_name"] for r in summary["ranking"]] == ["B", "A", "C"]
    assert "Tied on validation AUC: A, B" in (out / "report.md").read_text()
    assert "broken on val_robust_auc" in (out / "model_card.md").read_text()
    # Clearly apart: no tie, and the validation order stands whatever the robustness says.
    alone = compare([a, c], tmp_path / "alone", ensemble_k=0)
    assert alone["best_model"] == "A" and alone["ties"]["tied"] == ["A"]
    assert "Not tied" in (tmp_path / "alone" / "report.md").read_text()
    # Other selection metrics have no paired test: the order is the metric's.
    brier = compare([a, b, c], tmp_path / "brier", ensemble_k=0, select_metric="val_brier")
    assert brier["ties"]["tested"] is False


def test_ties_go_first_to_the_better_score_on_the_shift_proxy(tmp_path: Path) -> None:
    y = np.tile([0, 1], 150)
    labels = {"val": y, "test": y, "test_shifted": y}
    root = tmp_path / "trials"
    # A a hair ahead on val and more robust to corruptions; B better on test_shifted.
    a = make_trial(root, "A", {"val": _scores(y, 1.6, 0), "test": _scores(y, 1.6, 1),
                               "test_shifted": _scores(y, 6.0, 2)}, labels=labels)
    b = make_trial(root, "B", {"val": _scores(y, 1.6, 11), "test": _scores(y, 1.6, 12),
                               "test_shifted": _scores(y, 1.6, 13)}, labels=labels)
    for trial, corrupted in ((a, _scores(y, 1.7, 5)), (b, _scores(y, 12.0, 6))):
        add_robustness(trial, "val", corrupted)
    out = tmp_path / "report"
    summary = compare([a, b], out, ensemble_k=0)
    assert summary["ties"]["tied"] == ["A", "B"] and summary["ties"]["break"] == (
        "test_shifted_roc_auc")
    assert summary["best_model"] == "B"
    assert "broken on test_shifted_roc_auc (AUC on the shift proxy" in (
        out / "model_card.md").read_text()


def test_shift_folds_break_ties_before_the_carve_and_can_select(tmp_path: Path) -> None:
    y = np.tile([0, 1], 150)
    labels = {"val": y, "test": y, "test_shifted": y, "shift_folds": y}
    root = tmp_path / "trials"
    # Tied on val; A better on the one carved region, B on the out-of-fold predictions of
    # every training image.
    a = make_trial(root, "A", {"val": _scores(y, 1.6, 0), "test": _scores(y, 1.6, 1),
                               "test_shifted": _scores(y, 1.6, 2),
                               "shift_folds": _scores(y, 6.0, 3)}, labels=labels)
    b = make_trial(root, "B", {"val": _scores(y, 1.6, 11), "test": _scores(y, 1.6, 12),
                               "test_shifted": _scores(y, 6.0, 13),
                               "shift_folds": _scores(y, 1.6, 14)}, labels=labels)
    out = tmp_path / "report"
    summary = compare([a, b], out, ensemble_k=0)
    assert summary["ties"]["break"] == "shift_folds_roc_auc", summary["ties"]
    assert summary["best_model"] == "B"
    assert "out-of-fold AUC over image-statistics folds" in (out / "model_card.md").read_text()
    # Selecting on the folds themselves: no paired test, the folds' order; the ensemble's
    # out-of-fold predictions are its members' mean, row by row.
    chosen = selection.select([load_trial(a), load_trial(b)], "shift_folds_roc_auc",
                              ensemble_k=2)
    assert chosen.summary["ties"]["tested"] is False
    assert chosen.ranked["model_name"].tolist()[0] in ("B", "Ensemble-top2")
    members = [load_trial(t).splits["shift_folds"].predictions["prob_pneumonia"] for t in (b, a)]
    assert np.allclose(chosen.ensemble.splits["shift_folds"].predictions["prob_pneumonia"],
                       np.mean(members, axis=0))
    plain = make_trial(root, "C", {"val": _scores(y, 1.6, 0), "test": _scores(y, 1.6, 1)},
                       labels=labels)
    with pytest.raises(ConfigError, match="shift_folds >= 2"):
        selection.select([load_trial(plain)], "shift_folds_roc_auc")  # measured where run
    selection.check_select_metric("shift_folds_worst_site_auc")


def test_a_split_of_several_sites_breaks_ties_on_its_worst_site_first(tmp_path: Path) -> None:
    y = np.tile([0, 1], 150)
    labels = {"val": y, "test": y, "test_shifted": y}
    root = tmp_path / "trials"
    # Tied on val; A better on test_shifted pooled, B on its worst site (as evaluate writes
    # worst_site_auc for a split of several sites).
    trials = {name: make_trial(root, name, {"val": _scores(y, 1.6, seed),
                                            "test": _scores(y, 1.6, seed + 1),
                                            "test_shifted": _scores(y, noise, seed + 2)},
                               labels=labels)
              for name, noise, seed in (("A", 1.6, 0), ("B", 3.0, 11))}
    for name, worst in (("A", 0.61), ("B", 0.74)):
        path = trials[name] / "eval" / "test_shifted" / "metrics.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "worst_site_auc": worst}))
    summary = compare(list(trials.values()), tmp_path / "report", ensemble_k=0)
    assert summary["ties"]["break"] == "test_shifted_worst_site_auc"
    assert summary["best_model"] == "B"
    assert "the lowest per-site AUC on the shift proxy" in (
        tmp_path / "report" / "model_card.md").read_text()


def test_select_decides_without_writing(trials: list[Path], tmp_path: Path) -> None:
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    loaded = [load_trial(t) for t in trials]
    chosen = selection.select(loaded, "val_roc_auc", ensemble_k=2)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
    assert chosen.best.model_name == "VGG16" and not isinstance(chosen.best, Ensemble)
    assert isinstance(chosen.ensemble, Ensemble)
    assert chosen.ensemble.members == ["VGG16", "ResNet152V2"]
    assert chosen.ensemble.model_info["members"] == chosen.ensemble.members
    assert all(s.dir is None for s in chosen.ensemble.splits.values())  # nothing saved yet
    assert chosen.ranked["model_name"].tolist() == [r["model_name"]
                                                    for r in chosen.summary["ranking"]]
    assert chosen.splits == ["val", "test"] and chosen.candidates[-1] is chosen.ensemble
    with pytest.raises(ConfigError, match="at least one trial"):
        selection.select([], "val_roc_auc")
