"""Hyperparameter search with keras-tuner, objective = validation AUC (``val_auc``).

Pretrained weights (``imagenet`` or a weights file) are searched in two phases:

1. **head**: the backbone is frozen, so its pooled features are computed once (and cached on
   disk, see ``lungxray.features``) and the head space (``lungxray.spaces``) is searched on them
   with a tiny Keras model. A trial costs a few dense layers instead of a forward pass of the
   backbone over every image of every epoch.
2. **fine_tune**: ``fine_tune_trials`` trials on the full model, each starting from the best
   head's trained weights, searching ``unfreeze``, ``fine_tune_learning_rate`` and ``augment``.

``weights=none`` trains everything from scratch, so nothing is frozen and nothing can be cached:
one **scratch** phase searches the scratch space on the full model.

``algorithm`` picks keras-tuner's Hyperband (default), BayesianOptimization or RandomSearch for
the head and scratch phases; ``max_trials`` is the number of trials for each of them. Hyperband
trains its trials for ``ceil(epochs / factor**k)`` up to ``epochs`` epochs, continuing the
promising ones from their checkpoints, and repeats its brackets until ``max_trials`` is reached.
The fine-tune phase is small, so it uses RandomSearch (BayesianOptimization when chosen).
Whatever the algorithm, each phase's first trial is its space's default point (train's defaults).

State lives in ``<state_dir or output>/tuner/``: ``search.json`` (the search's settings), one
keras-tuner project per phase and ``trial_times.json`` in each. Re-running the same search
resumes it: finished trials are kept, an interrupted one is run again. A different search on the
same state is refused rather than mixed in.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import keras_tuner as kt
import numpy as np
import pandas as pd
import tensorflow as tf

from lungxray import (
    artifacts,
    data,
    features,
    integrity,
    models,
    safeio,
    schema,
    spaces,
    tune_report,
    tuner_compat,
)
from lungxray.batches import class_weights, make_dataset
from lungxray.errors import ConfigError, quote
from lungxray.fitting import ValidationAUC, compile_model
from lungxray.hparams import DEFAULT_HPARAMS, classifier_options, merge_hparams
from lungxray.resume import MONITOR, check_state

BEST_FILE = artifacts.BEST_HPARAMS_FILE
TRIALS_FILE = "trials.csv"
PLOT_FILE = "tuning.png"
SUMMARY_FILE = "summary.html"
STATE_DIR = "tuner"
CONFIG_FILE = "search.json"
TIMES_FILE = "trial_times.json"
FEATURES_DIR = "features"
ALGORITHMS = schema.TUNE_ALGORITHMS
CONFIG_FORMAT = "lungxray-tune/3"  # 3: trials scored on the exact val_auc


# ---------------------------------------------------------------------------------------------
# Hypermodels: one per kind of search, all compiled like fitting.compile_model so `val_auc`
# means the same thing everywhere.
# ---------------------------------------------------------------------------------------------


class _WeightedFit(kt.HyperModel):
    """``class_weighting`` is a hyperparameter, so the class weights are chosen in ``fit``."""

    def __init__(self, name: str, weights_by_class: dict[int, float], seed: int):
        super().__init__(name=name)
        self.weights_by_class, self.seed = weights_by_class, seed

    def fit(self, hp: kt.HyperParameters, model: keras.Model, *args, **kwargs):
        kwargs["class_weight"] = self.weights_by_class if hp.get("class_weighting") else None
        return model.fit(*args, **kwargs)


class HeadHyperModel(_WeightedFit):
    """The head of the classifier on cached pooled features (pretrained, frozen phase)."""

    def __init__(self, feature_dim: int, num_classes: int, weights_by_class: dict[int, float],
                 seed: int):
        super().__init__("head", weights_by_class, seed)
        self.feature_dim, self.num_classes = feature_dim, num_classes

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        chosen = spaces.head_space(hp, pretrained=True)
        # Same seed for every trial: a trial's result does not depend on its position in the
        # search, so a resumed search reruns an interrupted trial from the same start.
        keras.utils.set_random_seed(self.seed)
        model = features.build_head(self.feature_dim, self.num_classes,
                                    chosen["dense_units"], chosen["dropout"])
        compile_model(model, chosen["learning_rate"], chosen["label_smoothing"],
                      self.num_classes)
        return model


class FullHyperModel(_WeightedFit):
    """The whole classifier. From scratch (``weights=None``): the scratch space, everything
    trains. Pretrained: the head space on a frozen backbone without augmentation, i.e. the
    naive equivalent of :class:`HeadHyperModel` that recomputes the backbone in every epoch
    (the baseline of ``bench/tuning_bench.py``)."""

    def __init__(self, model_name: str, image_size: int, channels: int, num_classes: int,
                 weights: str | None, weights_by_class: dict[int, float], seed: int):
        super().__init__(model_name, weights_by_class, seed)
        self.model_name, self.image_size, self.channels = model_name, image_size, channels
        self.num_classes, self.weights = num_classes, weights

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        pretrained = self.weights is not None
        if pretrained:
            chosen = {**spaces.head_space(hp, pretrained=True), "augment": 0.0}
        else:
            chosen = spaces.scratch_space(hp, self.model_name)
        keras.utils.set_random_seed(self.seed)
        model = models.build_classifier(
            self.model_name, self.image_size, self.channels, self.num_classes, self.weights,
            seed=self.seed, **classifier_options({**DEFAULT_HPARAMS, **chosen}))
        if pretrained:
            models.set_trainable(model, 0.0)
            # Start from the very head HeadHyperModel would build, so both searches differ
            # only in where the features come from.
            keras.utils.set_random_seed(self.seed)
            head = features.build_head(model.get_layer(features.FEATURE_LAYER).output.shape[-1],
                                       self.num_classes, chosen["dense_units"],
                                       chosen["dropout"])
            features.copy_head(features.head_weights(head), model)
        compile_model(model, chosen["learning_rate"], chosen["label_smoothing"],
                      self.num_classes)
        return model


class FineTuneHyperModel(_WeightedFit):
    """The full pretrained classifier starting from the best head (its values fixed, its
    trained weights loaded), searching the fine-tune space."""

    def __init__(self, model_name: str, image_size: int, channels: int, num_classes: int,
                 weights: str, head_values: dict, head_weights: Callable[[], dict],
                 weights_by_class: dict[int, float], seed: int):
        super().__init__(model_name, weights_by_class, seed)
        self.model_name, self.image_size, self.channels = model_name, image_size, channels
        self.num_classes, self.weights = num_classes, weights
        self.head_values = head_values
        self._head_weights_fn, self._head_weights = head_weights, None

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        head = {name: hp.Fixed(name, value) for name, value in self.head_values.items()}
        chosen = spaces.fine_tune_space(hp)
        keras.utils.set_random_seed(self.seed)
        model = models.build_classifier(
            self.model_name, self.image_size, self.channels, self.num_classes, self.weights,
            seed=self.seed, **classifier_options({**DEFAULT_HPARAMS, **head, **chosen}))
        if self._head_weights is None:  # loaded lazily: a finished search needs no head
            self._head_weights = self._head_weights_fn()
        features.copy_head(self._head_weights, model)
        models.set_trainable(model, chosen["unfreeze"])
        compile_model(model, chosen["fine_tune_learning_rate"], head["label_smoothing"],
                      self.num_classes)
        return model


# ---------------------------------------------------------------------------------------------
# Tuners: keras-tuner's own, plus a record of when each trial ran and for how long.
# ---------------------------------------------------------------------------------------------


class _TimedTrials:
    """Mixin recording per trial its start time, run count and duration in
    ``<project>/trial_times.json`` (kept across resumes: an interrupted trial shows 2 starts)."""

    def _times_path(self) -> Path:
        return Path(self.project_dir) / TIMES_FILE

    def _load_times(self) -> dict:
        path = self._times_path()
        return safeio.load_json(path, "trial times", error=ConfigError) if path.is_file() else {}

    def _save_times(self, times: dict) -> None:
        safeio.write_text_atomic(self._times_path(), json.dumps(times, indent=2))

    def on_trial_begin(self, trial):
        super().on_trial_begin(trial)
        times = self._load_times()
        entry = times.setdefault(trial.trial_id, {"starts": 0})
        entry["starts"] += 1
        entry["started"] = datetime.now(UTC).isoformat()
        self._save_times(times)
        self._trial_clock = time.perf_counter()

    def on_trial_end(self, trial):
        times = self._load_times()
        times.setdefault(trial.trial_id, {"starts": 1})["seconds"] = round(
            time.perf_counter() - self._trial_clock, 3)
        self._save_times(times)
        super().on_trial_end(trial)


class TimedHyperband(_TimedTrials, tuner_compat.HyperbandOnOracle):
    pass


class TimedTuner(_TimedTrials, kt.Tuner):
    """RandomSearch and BayesianOptimization are kt.Tuner with their oracle."""


@dataclass(frozen=True)
class Budget:
    """How much one search phase may run."""

    algorithm: str = "hyperband"
    max_trials: int = 3
    epochs: int = 2
    hyperband_factor: int = 3
    seed: int = 42


def make_tuner(hypermodel: kt.HyperModel, budget: Budget, directory: Path,
               project: str) -> kt.Tuner:
    """A resumable tuner (``overwrite=False``) maximising ``val_auc``, that runs at most
    ``budget.max_trials`` trials whatever the algorithm."""
    tuner_compat.check()
    objective = kt.Objective(MONITOR, direction="max")
    # keras-tuner takes seed 0 for "no seed" (a random one): shift so every seed is honoured.
    seed = budget.seed + 1
    if budget.algorithm == "hyperband":
        per_iteration = tuner_compat.hyperband_trials_per_iteration(
            budget.epochs, budget.hyperband_factor, objective)
        oracle = tuner_compat.HyperbandOracle(objective, max_epochs=budget.epochs,
                                 factor=budget.hyperband_factor, seed=seed,
                                 hyperband_iterations=math.ceil(budget.max_trials / per_iteration))
        tuner_class = TimedHyperband
    elif budget.algorithm == "bayesian":
        oracle = tuner_compat.BayesianOracle(objective, max_trials=budget.max_trials, seed=seed)
        tuner_class = TimedTuner
    elif budget.algorithm == "random":
        oracle = tuner_compat.RandomOracle(objective, max_trials=budget.max_trials, seed=seed)
        tuner_class = TimedTuner
    else:
        raise ConfigError(f"unknown tuning algorithm {budget.algorithm!r}; "
                         f"choose one of {', '.join(ALGORITHMS)}")
    tuner = tuner_class(oracle, hypermodel, directory=str(directory), project_name=project,
                        overwrite=False)
    # Hyperband sizes itself by epochs and factor; the cap makes `max_trials` mean the same for
    # every algorithm (and is not part of the oracle's saved state).
    tuner.oracle.max_trials = budget.max_trials
    return tuner


def run_phase(hypermodel: kt.HyperModel, train_ds: tf.data.Dataset, val_ds: tf.data.Dataset,
              val_labels: np.ndarray, budget: Budget, directory: Path, project: str,
              verbose: int = 2) -> kt.Tuner:
    """Run (or resume) one search phase and return its tuner. Trials are scored on the exact
    validation AUC of ``val_ds``, whose labels are ``val_labels``."""
    tuner = make_tuner(hypermodel, budget, directory, project)
    tuner.search(train_ds, validation_data=val_ds, epochs=budget.epochs, verbose=verbose,
                 callbacks=[ValidationAUC(val_ds, val_labels)])
    return tuner


def trial_times(tuner: kt.Tuner) -> dict:
    """``{trial_id: {"starts", "started", "seconds"}}`` as recorded by the tuner."""
    path = Path(tuner.project_dir) / TIMES_FILE
    return safeio.load_json(path, "trial times", error=ConfigError) if path.is_file() else {}


def best_trial(tuner: kt.Tuner) -> kt.engine.trial.Trial:
    """The completed trial with the highest score; ties go to the earliest trial, so a resumed
    search agrees with an uninterrupted one."""
    scored = [t for t in tuner.oracle.trials.values()
              if t.status == "COMPLETED" and t.score is not None and not np.isnan(t.score)]
    if not scored:
        raise RuntimeError(f"all {len(tuner.oracle.trials)} trials of {tuner.project_dir} "
                           f"failed; see the log above")
    return sorted(scored, key=lambda t: (-t.score, t.trial_id))[0]


def hparam_values(trial: kt.engine.trial.Trial) -> dict:
    """A trial's hyperparameters as plain Python values, without Hyperband's ``tuner/*``."""
    values = {}
    for name, value in trial.hyperparameters.values.items():
        if name.startswith("tuner/"):
            continue
        values[name] = value.item() if isinstance(value, np.generic) else value
    return values


def trials_table(tuner: kt.Tuner, phase: str, default_epochs: int) -> pd.DataFrame:
    """One row per trial: phase, id, status, objective, epochs, duration and values tried."""
    times = trial_times(tuner)
    rows = []
    for trial in tuner.oracle.trials.values():
        values = trial.hyperparameters.values
        timing = times.get(trial.trial_id, {})
        rows.append({"phase": phase, "trial_id": trial.trial_id, "status": trial.status,
                     "score": trial.score, "epochs": values.get("tuner/epochs", default_epochs),
                     "seconds": timing.get("seconds"), "starts": timing.get("starts"),
                     **hparam_values(trial)})
    return pd.DataFrame(rows).sort_values("trial_id").reset_index(drop=True)


def remove_checkpoints(state: Path) -> None:
    """Trial weights are never reused once the search is over (train refits with the chosen
    values) and weigh hundreds of MB per trial for large backbones; the oracle state that a
    resume needs stays."""
    for checkpoint in Path(state).glob("*/trial_*/checkpoint*"):
        checkpoint.unlink()


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------


def tune(data_dir: Path, model_name: str, output: Path,
         max_trials: int = schema.DEFAULTS.tune_trials, epochs: int = schema.DEFAULTS.tune_epochs,
         weights: str = "none", batch_size: int = schema.DEFAULTS.batch_size,
         seed: int = schema.DEFAULTS.seed, train_samples: int = schema.DEFAULTS.tune_train_samples,
         cache_dir: Path | None = None, *, algorithm: str = schema.DEFAULTS.tune_algorithm,
         hyperband_factor: int = schema.DEFAULTS.tune_hyperband_factor,
         fine_tune_trials: int = schema.DEFAULTS.tune_fine_tune_trials,
         state_dir: Path | None = None,
         feature_cache: Path | None = None, verbose: int = 2) -> dict:
    """Search, then write ``best_hparams.json``, ``trials.csv``, ``tuning.png`` and
    ``summary.html`` to ``output``; returns what ``best_hparams.json`` holds.

    ``max_trials`` trials of up to ``epochs`` epochs for the head (pretrained) or scratch
    search, then ``fine_tune_trials`` of ``epochs`` epochs (pretrained only; 0 skips it).
    ``train_samples`` > 0 fits each trial on a stratified subset of train (a budget knob for
    CPUs); trials are always scored on the whole validation split. Tuner state goes to
    ``state_dir`` (default ``output``), features to ``feature_cache`` (default
    ``<cache_dir>/features`` when ``cache_dir`` is given, else ``<state>/features``).
    """
    if max_trials < 1 or epochs < 1:
        raise ConfigError(f"max_trials and epochs must be >= 1, got {max_trials} and {epochs}")
    if algorithm not in ALGORITHMS:
        raise ConfigError(f"unknown tuning algorithm {quote(algorithm, 40)}; "
                         f"choose one of {', '.join(ALGORITHMS)}")
    if hyperband_factor < 2:
        raise ConfigError(f"hyperband_factor must be >= 2, got {hyperband_factor}")
    if fine_tune_trials < 0:
        raise ConfigError(f"fine_tune_trials must be >= 0, got {fine_tune_trials}")
    if batch_size < 1 or train_samples < 0:
        raise ConfigError(f"batch_size must be >= 1 and train_samples >= 0, got {batch_size} "
                         f"and {train_samples}")
    # Upper bounds and the seed, with the pipeline's ranges (lungxray.schema).
    schema.check_training(epochs=epochs, batch_size=batch_size, seed=seed,
                          max_trials=max_trials, train_samples=train_samples)
    # Fails on a bad name before any work; a scratch-only backbone (SmallCNN) ignores the
    # weights, so it gets the scratch search whatever the run's weights.
    weights = models.get_spec(model_name).weights_for(weights)
    started = time.time()
    manifest = integrity.read_manifest(data_dir)
    num_classes = len(manifest["class_names"])
    image_size, channels = manifest["image_size"], manifest["channels"]
    full_train = integrity.load_checked_split(data_dir, "train", manifest)
    train_split = data.stratified_sample(full_train, train_samples, seed)
    val_split = integrity.load_checked_split(data_dir, "val", manifest)
    digests = {
        "train": (manifest["splits"]["train"]["sha256"] if train_split is full_train
                  else integrity.split_sha256(train_split)),
        "val": manifest["splits"]["val"]["sha256"],
    }
    resolved = models.resolve_weights(weights, cache_dir)
    pretrained = resolved is not None
    weights_id = features.weights_identity(resolved) if pretrained else "none"

    output = Path(output)
    root = Path(state_dir) if state_dir else output
    state = root / STATE_DIR
    budget = Budget(algorithm, max_trials, epochs, hyperband_factor, seed)
    config = {"format": CONFIG_FORMAT, "model_name": model_name, "weights": weights_id,
              "image_size": image_size, "channels": channels, "data_sha256": digests,
              "algorithm": algorithm, "max_trials": max_trials, "epochs": epochs,
              "hyperband_factor": hyperband_factor if algorithm == "hyperband" else None,
              "fine_tune_trials": fine_tune_trials if pretrained else None,
              "batch_size": batch_size, "seed": seed, "train_samples": train_samples}
    check_state(state, config, CONFIG_FILE, "search")
    # An earlier search's result must not outlive a failed one and pass for its result.
    (output / BEST_FILE).unlink(missing_ok=True)

    keras.utils.set_random_seed(seed)
    weights_by_class = class_weights(train_split.labels, num_classes)
    val_ds = make_dataset(val_split, num_classes, batch_size)
    tables, phases, feature_info = [], {}, None

    if pretrained:
        cache = Path(feature_cache) if feature_cache else (
            Path(cache_dir) / FEATURES_DIR if cache_dir else root / FEATURES_DIR)
        cached = features.cached_features(
            model_name, image_size, channels, resolved,
            {"train": (train_split, digests["train"]), "val": (val_split, digests["val"])},
            cache)
        feature_info = {"dir": str(cache), "dim": int(cached["train"].features.shape[1]),
                        **{name: {"key": f.key, "computed": f.computed, "seconds": f.seconds}
                           for name, f in cached.items()}}
        head_tuner = run_phase(
            HeadHyperModel(feature_info["dim"], num_classes, weights_by_class, seed),
            features.feature_dataset(cached["train"].features, train_split.labels, num_classes,
                                     batch_size, shuffle=True, seed=seed),
            features.feature_dataset(cached["val"].features, val_split.labels, num_classes,
                                     batch_size),
            val_split.labels, budget, state, "head", verbose)
        head_best = best_trial(head_tuner)
        tables.append(trials_table(head_tuner, "head", epochs))
        phases["head"] = _phase_summary(head_tuner, head_best)
        final_tuner, final_best = head_tuner, head_best
        if fine_tune_trials:
            ft_budget = Budget("bayesian" if algorithm == "bayesian" else "random",
                               fine_tune_trials, epochs, hyperband_factor, seed)
            hypermodel = FineTuneHyperModel(
                model_name, image_size, channels, num_classes, resolved,
                hparam_values(head_best),
                lambda: _trained_head(head_tuner, head_best),
                weights_by_class, seed)
            final_tuner = run_phase(
                hypermodel, make_dataset(train_split, num_classes, batch_size, shuffle=True,
                                         seed=seed),
                val_ds, val_split.labels, ft_budget, state, "fine_tune", verbose)
            final_best = best_trial(final_tuner)
            tables.append(trials_table(final_tuner, "fine_tune", epochs))
            phases["fine_tune"] = _phase_summary(final_tuner, final_best)
        hparams = {**hparam_values(head_best), **hparam_values(final_best)}
    else:
        final_tuner = run_phase(
            FullHyperModel(model_name, image_size, channels, num_classes, None,
                           weights_by_class, seed),
            make_dataset(train_split, num_classes, batch_size, shuffle=True, seed=seed),
            val_ds, val_split.labels, budget, state, "scratch", verbose)
        final_best = best_trial(final_tuner)
        tables.append(trials_table(final_tuner, "scratch", epochs))
        phases["scratch"] = _phase_summary(final_tuner, final_best)
        hparams = hparam_values(final_best)
    remove_checkpoints(state)
    merge_hparams(hparams, pretrained, model_name)  # the contract with train: names all known

    table = pd.concat(tables, ignore_index=True)
    output.mkdir(parents=True, exist_ok=True)
    table.to_csv(output / TRIALS_FILE, index=False)
    best = {
        "model_name": model_name,
        "objective": MONITOR,
        "best_score": float(final_best.score),
        "trials": int(len(table)),
        "train_samples": len(train_split),
        "search_seconds": round(time.time() - started, 2),
        "trial_seconds": round(float(table["seconds"].fillna(0).sum()), 2),
        "algorithm": algorithm,
        "hyperband_factor": hyperband_factor if algorithm == "hyperband" else None,
        "max_trials": max_trials,
        "epochs": epochs,
        "fine_tune_trials": fine_tune_trials if pretrained else 0,
        "weights": weights,
        "phases": phases,
        "feature_cache": feature_info,
        "hparams": hparams,
    }
    tune_report.plot_trials(table, output / PLOT_FILE, title=f"{model_name}: {MONITOR}")
    (output / SUMMARY_FILE).write_text(tune_report.summary_html(
        best, table, output / PLOT_FILE, spaces_used=_spaces_used(pretrained, fine_tune_trials)))
    # Written last: its presence marks a complete tune output.
    (output / BEST_FILE).write_text(json.dumps(best, indent=2))
    return best


def _trained_head(tuner: kt.Tuner, trial: kt.engine.trial.Trial) -> dict:
    """The head weights of a finished head trial (its best epoch's checkpoint)."""
    with warnings.catch_warnings():
        # The checkpoint carries Adam's slots, the freshly built head has none yet: harmless.
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return features.head_weights(tuner.load_model(trial))


def _phase_summary(tuner: kt.Tuner, best: kt.engine.trial.Trial) -> dict:
    times = trial_times(tuner)
    seconds = [t["seconds"] for t in times.values() if "seconds" in t]
    return {"trials": len(tuner.oracle.trials), "best_trial": best.trial_id,
            "best_score": float(best.score), "trial_seconds": round(sum(seconds), 2),
            "mean_trial_seconds": round(sum(seconds) / len(seconds), 3) if seconds else None}


def _spaces_used(pretrained: bool, fine_tune_trials: int) -> list[str]:
    if not pretrained:
        return ["scratch"]
    return ["head", "fine_tune"] if fine_tune_trials else ["head"]
