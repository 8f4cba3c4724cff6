"""Hyperparameter search with keras-tuner, objective = validation AUC.

The tuner's state lives in ``<output>/tuner``; re-running with the same output resumes the
search instead of starting over.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import keras_tuner as kt
import pandas as pd

from lungxray import data, models
from lungxray.train import MONITOR, class_weights, compile_model, make_dataset, merge_hparams

BEST_FILE = "best_hparams.json"
TRIALS_FILE = "trials.csv"


def define_space(hp: kt.HyperParameters, pretrained: bool) -> dict:
    """The search space, in one place: learning rate (of the head on a frozen pretrained
    backbone, or of the whole network from scratch, which needs lower rates) and dropout."""
    low, high = (1e-4, 1e-2) if pretrained else (1e-5, 1e-3)
    return {
        "learning_rate": hp.Float("learning_rate", low, high, sampling="log"),
        "dropout": hp.Float("dropout", 0.0, 0.5, step=0.1),
    }


class ClassifierHyperModel(kt.HyperModel):
    """Builds the classifier for one point of the space. A pretrained backbone stays frozen:
    the search tunes the head, train then fine-tunes with the chosen values."""

    def __init__(self, model_name: str, image_size: int, channels: int, num_classes: int,
                 weights: str | None, seed: int):
        super().__init__(name=model_name)
        self.model_name, self.image_size, self.channels = model_name, image_size, channels
        self.num_classes, self.weights, self.seed = num_classes, weights, seed

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        pretrained = self.weights is not None
        chosen = merge_hparams(define_space(hp, pretrained), pretrained)
        model = models.build_classifier(
            self.model_name, self.image_size, self.channels, self.num_classes, self.weights,
            dropout=chosen["dropout"], augment=chosen["augment"], seed=self.seed)
        if pretrained:
            models.set_trainable(model, 0.0)
        compile_model(model, chosen["learning_rate"], chosen["label_smoothing"],
                      self.num_classes)
        return model


def trials_table(tuner: kt.Tuner) -> pd.DataFrame:
    """One row per trial: id, status, objective and the values tried."""
    rows = []
    for trial in tuner.oracle.trials.values():
        rows.append({"trial_id": trial.trial_id, "status": trial.status, "score": trial.score,
                     **trial.hyperparameters.values})
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def tune(data_dir: Path, model_name: str, output: Path, max_trials: int = 3, epochs: int = 2,
         weights: str = "none", batch_size: int = 32, seed: int = 42, train_samples: int = 0,
         cache_dir: Path | None = None) -> dict:
    """Search, then write ``best_hparams.json`` and ``trials.csv`` to ``output``.

    ``train_samples`` > 0 fits each trial on a stratified subset of train (a budget knob for
    CPUs); trials are always scored on the whole validation split.
    """
    if max_trials < 1 or epochs < 1:
        raise ValueError(f"max_trials and epochs must be >= 1, got {max_trials} and {epochs}")
    models.get_spec(model_name)  # fail on a bad name before any work
    manifest = data.read_manifest(data_dir)
    num_classes = len(manifest["class_names"])
    train_split = data.stratified_sample(data.load_split(data_dir, "train"), train_samples, seed)
    val_split = data.load_split(data_dir, "val")
    keras.utils.set_random_seed(seed)
    hypermodel = ClassifierHyperModel(model_name, manifest["image_size"], manifest["channels"],
                                      num_classes, models.resolve_weights(weights, cache_dir),
                                      seed)
    output = Path(output)
    tuner = kt.RandomSearch(hypermodel, objective=kt.Objective(MONITOR, direction="max"),
                            max_trials=max_trials, seed=seed, directory=str(output),
                            project_name="tuner", overwrite=False)
    started = time.time()
    tuner.search(make_dataset(train_split, num_classes, batch_size, shuffle=True, seed=seed),
                 validation_data=make_dataset(val_split, num_classes, batch_size),
                 epochs=epochs, class_weight=class_weights(train_split.labels, num_classes),
                 verbose=2)
    # Trial weights are never reused (train refits with the best values) and weigh hundreds of
    # MB per trial for large backbones; the oracle state needed to resume stays.
    for checkpoint in (output / "tuner").glob("trial_*/checkpoint*"):
        checkpoint.unlink()
    table = trials_table(tuner)
    table.to_csv(output / TRIALS_FILE, index=False)
    # Ties (common on tiny budgets) go to the earliest trial, so a resumed search agrees.
    scored = table.dropna(subset=["score"])
    if scored.empty:
        raise RuntimeError(f"all {len(table)} trials of {model_name} failed; see the log above")
    best_id = scored.sort_values(["score", "trial_id"], ascending=[False, True]).iloc[0][
        "trial_id"]
    best_trial = tuner.oracle.trials[best_id]
    best = {
        "model_name": model_name,
        "objective": MONITOR,
        "best_score": float(best_trial.score),
        "trials": int(len(table)),
        "train_samples": len(train_split),
        "search_seconds": round(time.time() - started, 2),
        "hparams": dict(best_trial.hyperparameters.values),
    }
    (output / BEST_FILE).write_text(json.dumps(best, indent=2))
    return best


def read_best_hparams(path: Path) -> dict:
    """The hyperparameters from a ``best_hparams.json`` (or a plain {name: value} file)."""
    content = json.loads(Path(path).read_text())
    return content.get("hparams", content)
