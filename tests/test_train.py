"""Real (short) training runs on the real PneumoniaMNIST data."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest

from lungxray import (
    artifacts,
    data,
    fitting,
    metrics,
    models,
    prepare,
    prevalence,
    resume,
    shift,
    train,
)
from lungxray.errors import ConfigError
from lungxray.hparams import DEFAULT_HPARAMS, SCRATCH_DEFAULTS, merge_hparams


def test_scratch_training_writes_a_complete_model_dir(trained_model, small_dataset):
    info = json.loads((trained_model / artifacts.INFO_FILE).read_text())
    assert info["model_name"] == "VGG16" and info["weights"] == "none"
    assert info["class_names"] == ["normal", "pneumonia"] and info["positive_class"] == 1
    assert info["keep_aspect"] is False  # the prepared fixture stretches; predict reads this
    assert 0.0 <= info["threshold"] <= 1.0 and info["threshold_method"] == "youden"
    assert info["hparams"]["learning_rate"] == SCRATCH_DEFAULTS["learning_rate"]
    assert info["params"] > 14_000_000 and info["epochs"] == 2
    history = json.loads((trained_model / artifacts.HISTORY_FILE).read_text())
    assert history["phases"] == [{"name": "scratch", "epochs": 2}]
    assert len(history["history"]["val_auc"]) == 2
    assert (trained_model / "curves.png").stat().st_size > 1000
    model = models.load_model(trained_model / artifacts.MODEL_FILE)
    val = data.load_split(small_dataset, "val")
    probs = model.predict(val.images.astype("float32"), verbose=0)
    assert probs.shape == (len(val), 2)
    # The threshold is Youden's J on the saved model's own validation scores.
    assert info["threshold"] == pytest.approx(metrics.choose_threshold(val.labels, probs[:, 1]),
                                              abs=1e-5)
    # The saved calibration is Platt scaling of those same scores, at val's prevalence.
    expected = prevalence.fit_calibration(val.labels, probs[:, 1])
    saved = prevalence.calibration_from(info["calibration"], "model_info.json")
    assert saved.prior == pytest.approx(float(np.mean(val.labels == 1)))
    assert saved.slope == pytest.approx(expected.slope, rel=1e-3)
    assert saved.intercept == pytest.approx(expected.intercept, abs=1e-3)


@pytest.mark.slow
def test_short_real_training_learns(tmp_path, shared_npz):
    """Two epochs on 300 real images lift validation AUC well above chance."""
    prepared = tmp_path / "data"
    prepare.preprocess(str(shared_npz), prepared, image_size=32, max_per_split=300, seed=3)
    info = train.train(prepared, "VGG16", tmp_path / "model", epochs=2, weights="none", seed=3)
    history = json.loads((tmp_path / "model" / artifacts.HISTORY_FILE).read_text())["history"]
    assert max(history["val_auc"]) > 0.85, history["val_auc"]
    assert info["threshold"] is not None


def test_pretrained_weights_train_in_two_phases(tmp_path, small_dataset):
    backbone = keras.applications.MobileNetV2(weights=None, include_top=False,
                                              input_shape=(32, 32, 3))
    weights = tmp_path / "mobilenetv2.weights.h5"
    backbone.save_weights(weights)
    info = train.train(small_dataset, "MobileNetV2", tmp_path / "model", epochs=3,
                       weights=str(weights), hparams={"unfreeze": 0.2}, seed=1)
    history = json.loads((tmp_path / "model" / artifacts.HISTORY_FILE).read_text())
    assert [p["name"] for p in history["phases"]] == ["head", "finetune"]
    assert [p["epochs"] for p in history["phases"]] == [2, 1]
    assert info["hparams"]["learning_rate"] == DEFAULT_HPARAMS["learning_rate"]
    model = models.load_model(tmp_path / "model" / artifacts.MODEL_FILE)
    # The backbone's frozen lower layers kept the weights from the file.
    first = models.backbone_of(model).layers[1].get_weights()[0]
    np.testing.assert_array_equal(first, backbone.layers[1].get_weights()[0])


def test_bad_hparams_and_epochs_are_refused(small_dataset, tmp_path):
    with pytest.raises(ValueError, match="unknown hyperparameters 'learnig_rate'; known: "):
        train.train(small_dataset, "VGG16", tmp_path / "m", {"learnig_rate": 1e-3})
    with pytest.raises(ValueError, match="epochs must be >= 1"):
        train.train(small_dataset, "VGG16", tmp_path / "m", epochs=0)
    # Checked before training, not after it when the threshold is chosen.
    with pytest.raises(ValueError, match="target_sensitivity must be in \\(0, 1\\], got 1.5"):
        train.train(small_dataset, "VGG16", tmp_path / "m", target_sensitivity=1.5)
    assert not (tmp_path / "m").exists()


def test_state_of_another_training_job_is_discarded_not_resumed(small_dataset, tmp_path,
                                                                capsys):
    """Checkpoints left by a different job (here: another model) are never resumed into this
    one: discarded with a note, and the corrected run trains. A state dir of unknown origin is
    not touched."""
    other = tmp_path / "other"
    other.mkdir()
    (other / resume.JOB_FILE).write_text(json.dumps({"model_name": "ResNet50", "epochs": 1}))
    # With progress beside it (a job file alone is a run that never got going: replaced).
    (other / "scratch.epochs.csv").write_text("epoch\n0\n")
    (other / "scratch.epoch-1.weights.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"x" * 100)
    info = train.train(small_dataset, "SmallCNN", tmp_path / "m", epochs=1, state_dir=other)
    assert info["epochs"] == 1 and not other.exists()
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert note.startswith(f"lungxray train: note: {other} holds the state of a different "
                           "training job (differs in: ")
    assert "model_name" in note and "discarded it, training starts afresh" in note
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=f"{unknown} holds state without job.json"):
        train.train(small_dataset, "SmallCNN", tmp_path / "m", epochs=2, state_dir=unknown)
    assert (unknown / "notes.txt").read_text() == "mine"


def test_resumed_phase_keeps_the_best_epoch_from_before_the_kill(tmp_path):
    state = resume.PhaseState(tmp_path)
    assert state.progress("scratch", 5) is None
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    fitting.compile_model(model, 1e-3, 0.0, 2)
    # Three epochs committed before the kill, the second the best.
    commit = resume.EpochCommit(state, "scratch")
    commit.set_model(model)
    for epoch, auc in enumerate([0.7, 0.9, 0.8]):
        commit.on_epoch_end(epoch, {"val_auc": auc, "loss": 1.0 - epoch / 10})
    before = state.progress("scratch", 5)
    assert len(before.rows) == 3 and before.best[:2] == (1, pytest.approx(0.9))
    resumed = resume.EpochCommit(state, "scratch", before)
    resumed.set_model(model)
    resumed.on_epoch_end(3, {"val_auc": 0.85, "loss": 0.5})  # worse: not the best
    after = state.progress("scratch", 5)
    assert [row["epoch"] for row in after.rows] == [0, 1, 2, 3]
    assert after.best[:2] == (1, pytest.approx(0.9)) and after.best[2].is_file()
    assert after.latest.name == "scratch.epoch-4.weights.h5"
    # Only the latest and the best epoch's weights are kept.
    assert sorted(p.name for p in tmp_path.glob("*.weights.h5")) == [
        "scratch.epoch-2.weights.h5", "scratch.epoch-4.weights.h5"]


def test_a_killed_training_resumes_from_its_last_epoch(small_dataset, tmp_path):
    """SIGKILL a real `lungxray train` after its first epoch; the re-run goes on from there."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pandas as pd

    output = tmp_path / "model"
    command = [sys.executable, "-m", "lungxray.cli", "train", "--data", str(small_dataset),
               "--model", "VGG16", "--output", str(output), "--epochs", "4", "--patience", "9",
               "--seed", "2"]
    log = output / ".state" / "scratch.epochs.csv"

    def epochs_logged() -> int:  # CSVLogger creates the file before it writes a header
        return len(pd.read_csv(log)) if log.exists() and log.stat().st_size else 0

    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             start_new_session=True)
    deadline = time.monotonic() + 600
    while epochs_logged() < 1:
        assert first.poll() is None, first.stdout.read().decode()[-2000:]
        assert time.monotonic() < deadline, "first epoch never finished"
        time.sleep(0.5)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    killed_at = epochs_logged()
    assert 1 <= killed_at < 4 and not (output / artifacts.INFO_FILE).exists()
    first_epoch = pd.read_csv(log)["val_auc"].iloc[0]

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "Epoch 1/4" not in resumed.stdout + resumed.stderr  # not restarted from scratch
    assert f"Epoch {killed_at + 1}/4" in resumed.stdout + resumed.stderr
    history = json.loads((output / artifacts.HISTORY_FILE).read_text())
    assert history["phases"] == [{"name": "scratch", "epochs": 4}]
    assert history["history"]["val_auc"][0] == pytest.approx(first_epoch)
    assert not (output / ".state").exists()  # cleaned up once complete


def test_model_info_records_that_keras_dropped_xla_for_the_augmented_model(tmp_path,
                                                                           small_dataset):
    """Asked for XLA, Keras on TensorFlow trains a model with its geometric augmentation
    layers without it (and only warns); model_info.json must not claim XLA."""
    info = train.train(small_dataset, "VGG16", tmp_path / "model", epochs=1, weights="none",
                       jit_compile=True)
    assert info["devices"]["xla"] is False and info["devices"]["backend"] == "tensorflow"


def test_a_state_dir_of_an_older_format_is_discarded(small_dataset, tmp_path, monkeypatch,
                                                     capsys):
    # A run of the older format that got as far as its first epoch log, then was killed.
    monkeypatch.setattr(train, "STATE_FORMAT", train.STATE_FORMAT - 1)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "make_dataset", killed)
    with pytest.raises(KeyboardInterrupt):
        train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=1, weights="none")
    (tmp_path / "model" / ".state" / "scratch.epochs.csv").write_text("epoch\n0\n")
    (tmp_path / "model" / ".state" / "scratch.backup").mkdir()  # Keras' BackupAndRestore
    monkeypatch.undo()
    info = train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=1, weights="none")
    assert info["epochs"] == 1 and not (tmp_path / "model" / ".state").exists()
    assert "(differs in: state_format); discarded it" in capsys.readouterr().err
    # Bad settings are refused before the state dir is even looked at.
    with pytest.raises(ValueError, match="unknown model"):
        train.train(small_dataset, "NoSuchNet", tmp_path / "fresh", epochs=1, weights="none")
    assert not (tmp_path / "fresh").exists()


@pytest.mark.slow
def test_every_lever_trains_and_is_recorded(tmp_path, small_dataset):
    levers = {"randaugment": 0.2, "augmix": 0.2, "mixup": 0.2, "cutmix": 0.5,
              "intensity_augment": 0.5, "standardize": True, "ema": True}
    info = train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=1,
                       hparams=levers, seed=0)
    assert {k: info["hparams"][k] for k in levers} == levers
    model = models.load_model(tmp_path / "model" / artifacts.MODEL_FILE)
    names = {layer.name for layer in model.layers}
    assert {"aug_randaugment", "aug_augmix", "standardize"} <= names
    val = data.load_split(small_dataset, "val")
    assert metrics.roc_auc(val.labels, model.predict(val.images.astype("float32"),
                                                     verbose=0)) is not None
    with pytest.raises(ConfigError, match="mixup"):
        merge_hparams({"mixup": -1.0})


def test_model_info_records_the_threshold_rule(tmp_path, small_dataset):
    info = train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=1, seed=0,
                       threshold_rule="platt")
    saved = json.loads((tmp_path / "model" / artifacts.INFO_FILE).read_text())
    assert saved["threshold_method"] == info["threshold_method"] == "platt"
    assert saved["target_sensitivity"] is None
    # The threshold is where the Platt posterior saved beside it (fitted on the same val
    # predictions) is 0.5.
    calibration = prevalence.calibration_from(saved["calibration"], "model_info.json")
    assert calibration.posterior(np.array([saved["threshold"]]))[0] == pytest.approx(0.5)
    # A bad rule is refused before anything is written.
    with pytest.raises(ConfigError, match="^threshold rule 'median' is not one of"):
        train.train(small_dataset, "SmallCNN", tmp_path / "bad", epochs=1,
                    threshold_rule="median")
    assert not (tmp_path / "bad").exists()


def test_the_worst_group_rule_chooses_on_val_groups(tmp_path, small_dataset):
    info = train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=1, seed=0,
                       threshold_rule="worst_group")
    assert info["threshold_method"] == "worst_group"
    # The threshold maximises the lowest balanced accuracy over the groups evaluate writes
    # beside val's predictions, recomputed from the saved model's val predictions.
    val = data.load_split(small_dataset, "val")
    model = models.load_model(tmp_path / "model" / artifacts.MODEL_FILE)
    scores = model.predict(val.images.astype("float32"), verbose=0)[:, 1]
    groups = shift.val_groups(val.images)
    assert info["threshold"] == pytest.approx(metrics.choose_threshold(
        val.labels, scores, rule="worst_group", groups=groups), abs=1e-6)
    best = metrics.worst_group_accuracy(val.labels, scores, info["threshold"], groups)
    youden = metrics.choose_threshold(val.labels, scores)
    assert best >= metrics.worst_group_accuracy(val.labels, scores, youden, groups) - 1e-9


def test_site_weighting_balances_the_sites_of_every_split_trained_on(tmp_path, two_sites):
    manifest = json.loads((two_sites / "manifest.json").read_text())
    splits = ("train", shift.SPLIT)  # a refit's: each split's sites, in order
    job = train.check_job(two_sites, "SmallCNN", {"site_weighting": True}, 1, "none", 32, 0, 3,
                          None, None, None, None, train_splits=splits)
    counts = [(site, part["n"]) for name in splits
              for site, part in manifest["splits"][name]["sites"].items()]
    assert job.train_sites.tolist() == [site for site, n in counts for _ in range(n)]
    fit = train.Fit(job, resume.PhaseState(tmp_path / "state"))
    assert fit.weights_by_class is None  # the per-image weights balance the classes too
    # Every site x class group carries a quarter of the total weight, and the batches carry
    # every image's weight once an epoch.
    groups = [(job.train_sites == site) & (job.train_split.labels == c)
              for site in ("nih", "pneumoniamnist") for c in (0, 1)]
    assert [fit.image_weights[g].sum() for g in groups] == pytest.approx(
        [len(job.train_sites) / 4] * 4, rel=1e-4)
    batches = list(fit.train_ds.as_numpy_iterator())
    assert {len(batch) for batch in batches} == {3}
    assert sum(batch[2].sum() for batch in batches) == pytest.approx(
        fit.image_weights.sum(), rel=1e-4)
    # The same seed and data, only the weighting changed: another model, the setting recorded.
    infos = {on: train.train(two_sites, "SmallCNN", tmp_path / f"m{on}", epochs=1, seed=0,
                             hparams={"site_weighting": on}) for on in (True, False)}
    assert [infos[on]["hparams"]["site_weighting"] for on in (True, False)] == [True, False]
    loaded = [models.load_model(tmp_path / f"m{on}" / artifacts.MODEL_FILE).get_weights()
              for on in (True, False)]
    assert any(not np.allclose(a, b) for a, b in zip(*loaded, strict=True))
