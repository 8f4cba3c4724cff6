"""keras-tuner search on real data: spaces, budgets, the two pretrained phases on cached
features, outputs, resuming a finished search, and train consuming the result."""

from __future__ import annotations

import json
from pathlib import Path

import keras_tuner as kt
import numpy as np
import pandas as pd
import pytest

from lungxray import features, metrics, models, spaces, train, tune, tuner_compat
from lungxray.errors import ConfigError
from lungxray.hparams import DEFAULT_HPARAMS, merge_hparams, read_best_hparams

HEAD = {"dense_units", "dropout", "learning_rate", "label_smoothing", "class_weighting"}
FINE_TUNE = {"unfreeze", "fine_tune_learning_rate", "augment", "intensity_augment"}
# Train-only for pretrained backbones: standardize (cached features are computed without it);
# ema and the levers that measured no gain on the shift proxies (bench/levers.md).
NOT_SEARCHED_PRETRAINED = {"standardize", "ema", "randaugment", "augmix", "mixup", "cutmix",
                           "site_weighting"}


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> str:
    """VGG16 weights saved from a weights=None backbone (no download)."""
    path = tmp_path_factory.mktemp("weights") / "vgg16.weights.h5"
    models.build_backbone(models.get_spec("VGG16"), 32, None).save_weights(path)
    return str(path)


def space_names(space: str) -> set[str]:
    hp = kt.HyperParameters()
    spaces.SPACES[space](hp)
    return {p.name for p in hp.space}


def test_spaces_cover_train_hyperparameters_with_train_defaults():
    assert space_names("head") == HEAD
    assert space_names("fine_tune") == FINE_TUNE
    assert space_names("scratch") == HEAD | {"augment", "intensity_augment", "standardize"}
    # Between them, the pretrained phases search every hyperparameter train knows but
    # NOT_SEARCHED_PRETRAINED.
    assert set(DEFAULT_HPARAMS) == HEAD | FINE_TUNE | NOT_SEARCHED_PRETRAINED
    hp = kt.HyperParameters()
    defaults = {**spaces.head_space(hp), **spaces.fine_tune_space(hp)}
    assert defaults == {k: v for k, v in DEFAULT_HPARAMS.items()
                        if k not in NOT_SEARCHED_PRETRAINED}
    # The scratch space starts at train's scratch defaults.
    scratch = spaces.scratch_space(kt.HyperParameters())
    assert scratch == {k: v for k, v in merge_hparams({}, pretrained=False).items()
                       if k in scratch}
    rows = spaces.describe("fine_tune")
    assert [r["name"] for r in rows] == ["unfreeze", "fine_tune_learning_rate", "augment",
                                         "intensity_augment"]
    assert rows[1]["sampling"] == "log" and rows[0]["values"] == "0 – 0.5 step 0.1"


@pytest.mark.parametrize("max_epochs, factor, expected", [(1, 3, 1), (2, 3, 2), (9, 3, 23)])
def test_hyperband_iteration_size(max_epochs, factor, expected):
    # 9 epochs, factor 3: brackets of 9+3+1, 5+2 and 3 trials (keras-tuner's sizes).
    objective = kt.Objective(tune.MONITOR, "max")
    assert tuner_compat.hyperband_trials_per_iteration(max_epochs, factor, objective) == expected


def test_keras_tuner_internals_are_checked_and_a_missing_one_is_named(monkeypatch):
    tuner_compat.check()  # the pinned keras-tuner has every private member used
    monkeypatch.delattr(kt.oracles.HyperbandOracle, "_get_num_brackets")
    with pytest.raises(ConfigError, match=r"incompatible.*HyperbandOracle\._get_num_brackets"):
        tuner_compat.check()
    with pytest.raises(ConfigError, match="incompatible"):  # before any tuner state is written
        tune.make_tuner(None, tune.Budget(), Path("/nonexistent/tuner"), "p")


@pytest.mark.parametrize("algorithm", tune.ALGORITHMS)
def test_every_algorithm_runs_exactly_max_trials(algorithm, tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 2
    feats = (rng.normal(size=(64, 8)) + labels[:, None]).astype(np.float32)
    train_ds = features.feature_dataset(feats, labels, 2, 16, shuffle=True, seed=0)
    val_ds = features.feature_dataset(feats, labels, 2, 16)
    hypermodel = tune.HeadHyperModel(8, 2, {0: 1.0, 1: 1.0}, seed=1)
    budget = tune.Budget(algorithm, max_trials=4, epochs=3, hyperband_factor=3, seed=1)
    tuner = tune.run_phase(hypermodel, train_ds, val_ds, labels, budget, tmp_path, "head",
                           verbose=0)
    table = tune.trials_table(tuner, "head", 3)
    assert len(table) == 4 and set(table["status"]) == {"COMPLETED"}
    assert table["score"].between(0.0, 1.0).all()  # every trial scored (an AUC)
    if algorithm == "hyperband":
        assert set(table["epochs"]) <= {1, 3}  # ceil(3 / 3**k) epochs per trial
    assert all(t["starts"] == 1 and t["seconds"] > 0 for t in tune.trial_times(tuner).values())
    # The first trial is the space's default point (train's untuned values), then draws;
    # Hyperband's continuations (tuner/trial_id) reuse a drawn point by design.
    fresh = [t.hyperparameters.values for _, t in sorted(tuner.oracle.trials.items())
             if "tuner/trial_id" not in t.hyperparameters.values]
    defaults = spaces.head_space(kt.HyperParameters())
    first, *drawn = [{k: v for k, v in values.items() if not k.startswith("tuner/")}
                     for values in fresh]
    assert first == defaults and drawn and defaults not in drawn


def test_pretrained_search_caches_features_and_tunes_head_then_fine_tuning(
        small_dataset, weights_file, tmp_path, monkeypatch):
    output, cache = tmp_path / "tune", tmp_path / "features"
    best = tune.tune(small_dataset, "VGG16", output, max_trials=3, epochs=2,
                     weights=weights_file, seed=5, fine_tune_trials=1, feature_cache=cache)
    assert best["algorithm"] == "hyperband" and best["objective"] == "val_auc"
    assert best["trials"] == 4
    assert best["phases"]["head"]["trials"] == 3 and best["phases"]["fine_tune"]["trials"] == 1
    assert set(best["hparams"]) == HEAD | FINE_TUNE
    assert merge_hparams(best["hparams"]) == {**DEFAULT_HPARAMS, **best["hparams"]}
    assert best["feature_cache"]["train"]["computed"] and best["feature_cache"]["val"]["computed"]
    assert best["feature_cache"]["dim"] == 512
    assert len(list(cache.glob("*.npy"))) == 2

    trials = pd.read_csv(output / tune.TRIALS_FILE)
    assert list(trials["phase"]) == ["head"] * 3 + ["fine_tune"]
    assert set(trials["status"]) == {"COMPLETED"}
    # The fine-tune trial starts from the best head: its head values are the head's best.
    head_rows = trials[trials["phase"] == "head"]
    best_head = head_rows.sort_values(["score", "trial_id"], ascending=[False, True]).iloc[0]
    fine = trials[trials["phase"] == "fine_tune"].iloc[0]
    for name in HEAD:
        assert fine[name] == best_head[name] == best["hparams"][name]
    assert best["best_score"] == pytest.approx(fine["score"])
    assert json.loads((output / tune.BEST_FILE).read_text()) == best
    assert read_best_hparams(output / tune.BEST_FILE) == best["hparams"]
    assert not list(output.rglob("checkpoint*"))  # trial weights are dropped after the search

    plot = output / tune.PLOT_FILE
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 10_000
    page = (output / tune.SUMMARY_FILE).read_text()
    assert "data:image/png;base64," in page and "VGG16" in page
    assert "fine_tune_learning_rate" in page and "src='http" not in page

    # A second tune of the same model (another output) reads the features and never runs
    # the backbone to extract them.
    monkeypatch.setattr(features, "build_extractor", lambda *a, **k: pytest.fail("recomputed"))
    again = tune.tune(small_dataset, "VGG16", tmp_path / "again", max_trials=2,
                      epochs=1, weights=weights_file, seed=5, fine_tune_trials=0,
                      algorithm="random", feature_cache=cache)
    assert not again["feature_cache"]["train"]["computed"]
    assert not again["feature_cache"]["val"]["computed"]
    assert set(again["hparams"]) == HEAD and again["trials"] == 2

    # train takes the chosen values as they are.
    info = train.train(small_dataset, "VGG16", tmp_path / "model",
                       read_best_hparams(output / tune.BEST_FILE), epochs=2,
                       weights=weights_file, seed=5)
    assert {k: info["hparams"][k] for k in best["hparams"]} == best["hparams"]


def test_scratch_search_resumes_a_finished_search_and_refuses_a_different_one(
        small_dataset, tmp_path):
    output = tmp_path / "tune"
    best = tune.tune(small_dataset, "VGG16", output, max_trials=2, epochs=1, seed=5,
                     algorithm="random")
    assert best["phases"].keys() == {"scratch"} and best["feature_cache"] is None
    assert set(best["hparams"]) == HEAD | {"augment", "intensity_augment", "standardize"}
    assert 1e-5 <= best["hparams"]["learning_rate"] <= 1e-3  # the from-scratch range
    times = json.loads((output / "tuner" / "scratch" / tune.TIMES_FILE).read_text())

    again = tune.tune(small_dataset, "VGG16", output, max_trials=2, epochs=1,
                      seed=5, algorithm="random")
    assert again["hparams"] == best["hparams"] and again["best_score"] == best["best_score"]
    # Nothing ran again: the trials' recorded starts are untouched.
    assert json.loads((output / "tuner" / "scratch" / tune.TIMES_FILE).read_text()) == times

    with pytest.raises(ValueError, match="different search .*max_trials"):
        tune.tune(small_dataset, "VGG16", output, max_trials=3, epochs=1, seed=5,
                  algorithm="random")
    # The refused search changed nothing; its result is for VGG16 only.
    assert read_best_hparams(output / tune.BEST_FILE, "VGG16") == best["hparams"]
    with pytest.raises(ValueError, match="tuned for 'VGG16', not ResNet50"):
        read_best_hparams(output / tune.BEST_FILE, "ResNet50")


@pytest.mark.parametrize("kwargs, message", [
    ({"algorithm": "grid"}, "unknown tuning algorithm"),
    ({"hyperband_factor": 1}, "hyperband_factor"),
    ({"max_trials": 0}, "max_trials"),
    ({"fine_tune_trials": -1}, "fine_tune_trials"),
    ({"batch_size": 0}, "batch_size must be >= 1"),
    ({"train_samples": -1}, "train_samples >= 0"),
])
def test_bad_settings_are_refused_before_any_work(kwargs, message, small_dataset, tmp_path):
    with pytest.raises(ValueError, match=message):
        tune.tune(small_dataset, "VGG16", tmp_path / "out", **kwargs)
    assert not (tmp_path / "out").exists()


def test_trials_are_scored_on_the_exact_validation_auc(tmp_path):
    rng = np.random.default_rng(1)
    labels = np.arange(96) % 2
    # Tiny features keep every predicted probability within one of the 200 bins of Keras' AUC,
    # which then reads about 0.5 however well the scores rank.
    feats = ((rng.normal(size=(96, 8)) + labels[:, None]) * 1e-3).astype(np.float32)
    val_feats, val_labels = feats[:48], labels[:48]
    tuner = tune.run_phase(
        tune.HeadHyperModel(8, 2, {0: 1.0, 1: 1.0}, seed=1),
        features.feature_dataset(feats[48:], labels[48:], 2, 16, shuffle=True, seed=0),
        features.feature_dataset(val_feats, val_labels, 2, 16), val_labels,
        tune.Budget("random", max_trials=2, epochs=2, hyperband_factor=3, seed=1), tmp_path,
        "head", verbose=0)
    best = tune.best_trial(tuner)
    # keras-tuner keeps each trial's best epoch: that model's exact AUC is the trial's score.
    probs = tuner.get_best_models(1)[0].predict(val_feats, verbose=0)
    assert best.score == pytest.approx(metrics.roc_auc(val_labels, probs), abs=1e-6)
    assert best.score > 0.7 and np.ptp(probs[:, 1]) < 1 / 200


def test_a_failed_search_leaves_no_earlier_result_behind(small_dataset, tmp_path, monkeypatch):
    output = tmp_path / "tune"
    output.mkdir()
    (output / tune.BEST_FILE).write_text(json.dumps({"model_name": "VGG16",
                                                     "hparams": {"dropout": 0.5}}))

    def interrupted(*args, **kwargs):
        raise RuntimeError("node preempted")

    monkeypatch.setattr(tune, "run_phase", interrupted)
    with pytest.raises(RuntimeError, match="preempted"):
        tune.tune(small_dataset, "VGG16", output, max_trials=1, epochs=1,
                  state_dir=tmp_path / "state")
    assert not (output / tune.BEST_FILE).exists()  # train cannot pick up the old search
