"""Transfer learning (two phases) or training from scratch on a prepared dataset.

:func:`train` follows the keras.io transfer-learning guide: the backbone, called as
``backbone(x, training=False)`` (:func:`lungxray.models.build_classifier`), is frozen while a new
head learns; then its top ``unfreeze`` share is made trainable and the model compiled again at a
low learning rate. Every epoch is committed to a state dir (:mod:`lungxray.resume`), so a killed
run goes on where it stopped. Batches come from :mod:`lungxray.batches`, the hyperparameters
from :mod:`lungxray.hparams`, compile and the validation AUC from :mod:`lungxray.fitting`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np

from lungxray import (
    artifacts,
    data,
    features,
    integrity,
    metrics,
    models,
    plots,
    prevalence,
    resume,
    safeio,
    schema,
    shift,
    site_metrics,
    sites,
)
from lungxray.batches import balanced_weights, class_weights, make_dataset, with_mixing
from lungxray.devices import OneDevice, configure_devices, gpu_count
from lungxray.errors import ConfigError
from lungxray.fitting import ValidationAUC, compile_model
from lungxray.hparams import classifier_options, merge_hparams
from lungxray.resume import STATE_FORMAT, PhaseState, StateUnusable

if TYPE_CHECKING:
    import tensorflow as tf

TRAIN_SPLIT = "train"
OUTPUT_FILES = frozenset({artifacts.MODEL_FILE, artifacts.INFO_FILE, artifacts.HISTORY_FILE,
                          artifacts.CURVES_FILE})


def train(data_dir: Path, model_name: str, output: Path, hparams: dict | None = None,
          epochs: int = schema.DEFAULTS.epochs, weights: str = "none",
          batch_size: int = schema.DEFAULTS.batch_size, seed: int = schema.DEFAULTS.seed,
          patience: int = 3, target_sensitivity: float | None = None,
          threshold_rule: str = schema.DEFAULTS.threshold_rule,
          mixed_precision: bool | None = None, jit_compile: bool | None = None,
          state_dir: Path | None = None, cache_dir: Path | None = None,
          train_splits: tuple[str, ...] = (TRAIN_SPLIT,)) -> dict:
    """Train ``model_name`` on ``data_dir`` and write the model, its info and curves to
    ``output``. Returns the model info (also written as ``model_info.json``).

    ``train_splits``: the splits trained on, together (default train alone; a refit adds the
    carved ``test_shifted``, :mod:`lungxray.refit`). Validation is never one of them: it stops
    early and sets the threshold.

    Re-running with the same ``output`` (or ``state_dir``) after a kill resumes from the last
    finished epoch, optimizer state included (:mod:`lungxray.resume`); a state that cannot be
    used, or of other settings, is discarded with a note. The decision threshold is chosen on
    validation by ``threshold_rule`` (:func:`lungxray.metrics.choose_threshold`), or as the
    highest one reaching ``target_sensitivity`` when given. A full disk is one error naming
    the file and the bytes it needs.
    """
    # Every argument, the weights file and the data are checked, and the model built, before
    # the state dir exists: a refused run never blocks its corrected re-run.
    job = check_job(data_dir, model_name, hparams, epochs, weights, batch_size, seed, patience,
                    target_sensitivity, mixed_precision, jit_compile, cache_dir, threshold_rule,
                    train_splits)
    hp, model, output = job.hp, job.build(), Path(output)
    state = PhaseState(Path(state_dir) if state_dir else output / ".state")

    def fit_phases(fit: Fit, model: keras.Model) -> dict[str, dict]:
        done = fit.finished()
        if job.pretrained:
            # 1. Transfer: the backbone frozen, only the new head learns. The backbone is
            #    called with training=False, so its BatchNorm stays in inference mode for good.
            fit.phase(model, done, "head", hp["learning_rate"], unfreeze=0.0)
            # 2. Fine-tune: the backbone's top `unfreeze` share trainable, at a low learning
            #    rate (fit.phase compiles again: a change of `trainable` takes effect only then).
            fit.phase(model, done, "finetune", hp["fine_tune_learning_rate"],
                      unfreeze=hp["unfreeze"])
        else:
            fit.phase(model, done, "scratch", hp["learning_rate"])
        fit.keep_best(model, done)
        return done

    # SIGTERM (a pod stopped) unwinds like an error: no temporary file of a write is left.
    with state.stop_on_signals(), safeio.no_space_as_error(output):
        state.open(job.config, job.plan)
        resume.sweep_temporaries(output, OUTPUT_FILES.__contains__)  # left by a SIGKILL
        # Until rewritten, the dir is not a model.
        (output / artifacts.INFO_FILE).unlink(missing_ok=True)
        fit = Fit(job, state)
        started = time.time()
        try:
            done = fit_phases(fit, model)
        except StateUnusable as err:  # a weights file that did not load: start afresh
            state.discard(job.config, err)
            model = job.build()
            done = fit_phases(fit, model)
        train_seconds = time.time() - started
        info = _write_outputs(model, output, done, fit.val_ds, job, target_sensitivity,
                              threshold_rule)
        info.update(job.record(model, done, train_seconds))
        # Written last: its presence marks a complete model directory.
        safeio.write_text_atomic(output / artifacts.INFO_FILE, json.dumps(info, indent=2))
    state.remove()  # complete: the output keeps the results, a PVC does not fill up
    return info


def phase_epochs(epochs: int, pretrained: bool) -> list[tuple[str, int]]:
    """Pretrained: head first, then fine-tune (half each, head gets the odd one).
    From scratch: one phase."""
    if not pretrained:
        return [("scratch", epochs)]
    head = (epochs + 1) // 2
    return [("head", head), ("finetune", epochs - head)]


@dataclass
class Job:
    """One training run's settings and data, checked (:func:`check_job`)."""

    model_name: str
    weights: str  # as asked for (``none`` for a scratch-only model)
    resolved: str | None  # what the backbone constructor takes; None from scratch
    hp: dict
    manifest: dict
    train_split: data.Split  # every split in ``train_splits``, in that order
    train_sites: np.ndarray | None  # the site of each of its rows; None without sites
    val_split: data.Split
    strategy: tf.distribute.Strategy | OneDevice
    mixed: bool
    jit: bool
    epochs: int
    batch_size: int
    seed: int
    patience: int
    train_splits: tuple[str, ...] = (TRAIN_SPLIT,)

    @property
    def pretrained(self) -> bool:
        return self.resolved is not None

    @property
    def num_classes(self) -> int:
        return len(self.manifest["class_names"])

    @property
    def plan(self) -> list[tuple[str, int]]:
        return phase_epochs(self.epochs, self.pretrained)

    @property
    def digests(self) -> dict[str, str]:
        return {name: split["sha256"] for name, split in self.manifest["splits"].items()}

    @property
    def config(self) -> dict:
        """What a state dir's checkpoints belong to: a state of other settings is discarded."""
        return {
            "state_format": STATE_FORMAT, "model_name": self.model_name, "hparams": self.hp,
            "epochs": self.epochs, "batch_size": self.batch_size, "seed": self.seed,
            "weights": features.weights_identity(self.resolved) if self.resolved else "none",
            "image_size": self.manifest["image_size"], "channels": self.manifest["channels"],
            "data_sha256": self.digests, "train_splits": list(self.train_splits),
        }

    def build(self) -> keras.Model:
        """The classifier, seeded: a rebuild starts from the same weights."""
        keras.utils.set_random_seed(self.seed)
        with self.strategy.scope():
            return models.build_classifier(
                self.model_name, self.manifest["image_size"], self.manifest["channels"],
                self.num_classes, self.resolved, seed=self.seed, **classifier_options(self.hp))

    def record(self, model: keras.Model, done: dict[str, dict], train_seconds: float) -> dict:
        """What model_info.json says of the data, the settings and the run."""
        epochs = sum(record["epochs"] for record in done.values())
        return {
            "image_size": self.manifest["image_size"],
            "input_size": models.get_spec(self.model_name).input_size(self.manifest["image_size"]),
            "channels": self.manifest["channels"],
            # predict and export fit new images the way preprocess fitted the training ones
            "keep_aspect": bool(self.manifest.get("keep_aspect", False)),
            "weights": self.weights,
            "hparams": self.hp,
            "params": int(model.count_params()),
            "train_seconds": round(train_seconds, 2),
            "train_images_per_s": round(len(self.train_split) * epochs
                                        / max(train_seconds, 1e-9), 2),
            "epochs": epochs,
            "batch_size": self.batch_size,
            "devices": {"backend": keras.backend.backend(), "gpus": gpu_count(),
                        "replicas": self.strategy.num_replicas_in_sync,
                        "mixed_precision": self.mixed, "xla": bool(model.jit_compile)},
            "seed": self.seed,
            "data_sha256": self.digests,
            "train_splits": list(self.train_splits),
            "train_images": len(self.train_split),
        }


def check_job(data_dir: Path, model_name: str, hparams: dict | None, epochs: int, weights: str,
              batch_size: int, seed: int, patience: int, target_sensitivity: float | None,
              mixed_precision: bool | None, jit_compile: bool | None,
              cache_dir: Path | None,
              threshold_rule: str = schema.DEFAULTS.threshold_rule,
              train_splits: tuple[str, ...] = (TRAIN_SPLIT,)) -> Job:
    """:func:`train`'s arguments checked, the weights file found and the data read: a
    :class:`Job`, or an error before anything is written."""
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    schema.check_training(epochs=epochs, batch_size=batch_size, seed=seed, patience=patience)
    metrics.check_target_sensitivity(target_sensitivity)
    metrics.check_threshold_rule(threshold_rule)
    weights = models.get_spec(model_name).weights_for(weights)  # SmallCNN: always 'none'
    strategy, mixed, jit = configure_devices(mixed_precision, jit_compile)
    resolved = models.resolve_weights(weights, cache_dir)
    hp = merge_hparams(hparams, pretrained=resolved is not None, model_name=model_name)
    manifest = integrity.read_manifest(data_dir)
    train_splits = tuple(train_splits)
    # Validation chooses; a held-out site is the off-site estimate: neither is trained on.
    allowed = [s for s in manifest["splits"]
               if s != "val" and not s.startswith(sites.HOLDOUT_PREFIX)]
    if not train_splits or set(train_splits) - set(allowed) or len(set(train_splits)) < len(
            train_splits):
        raise ConfigError(f"train_splits {list(train_splits)} must name distinct splits of "
                          f"{allowed}")
    parts = [integrity.load_checked_split(data_dir, name, manifest) for name in train_splits]
    site_parts = [site_metrics.site_rows(manifest, name, "training data") for name in train_splits]
    train_sites = (None if any(part is None for part in site_parts)
                   else np.concatenate(site_parts))
    return Job(model_name, weights, resolved, hp, manifest, data.concatenate(parts), train_sites,
               integrity.load_checked_split(data_dir, "val", manifest),
               strategy, mixed, jit, epochs, batch_size, seed, patience, train_splits)


class Fit:
    """The phases of one training job over its batches, each resumed from its last committed
    epoch in ``state``."""

    def __init__(self, job: Job, state: PhaseState):
        self.job, self.state, hp = job, state, job.hp
        global_batch = job.batch_size * job.strategy.num_replicas_in_sync
        # Site weighting: per-image weights balance sites (x classes); Keras' class weights
        # otherwise.
        self.image_weights = (balanced_weights(job.train_split.labels, job.train_sites,
                                               bool(hp["class_weighting"]))
                              if hp["site_weighting"] else None)
        self.train_ds = with_mixing(
            make_dataset(job.train_split, job.num_classes, global_batch, shuffle=True,
                         seed=job.seed, weights=self.image_weights),
            hp["mixup"], hp["cutmix"], job.seed)
        self.val_ds = make_dataset(job.val_split, job.num_classes, global_batch)
        self.weights_by_class = (class_weights(job.train_split.labels, job.num_classes)
                                 if hp["class_weighting"] and self.image_weights is None
                                 else None)

    def finished(self) -> dict[str, dict]:
        """The records of the phases the state holds as finished, by name."""
        return {record["name"]: record for record in self.state.finished(self.job.plan)}

    def phase(self, model: keras.Model, done: dict[str, dict], name: str, learning_rate: float,
              unfreeze: float | None = None) -> None:
        """Train phase ``name`` (unless in ``done`` or planned for no epochs) from its last
        committed epoch, the backbone's top ``unfreeze`` share trainable (None: the whole
        model); its record goes into ``done``."""
        job, state, hp = self.job, self.state, self.job.hp
        n_epochs = dict(job.plan)[name]
        if n_epochs == 0 or name in done:
            return
        if done:  # resuming after a finished phase: start from its weights
            resume.load_weights(model, state.weights(list(done)[-1]))
        if unfreeze is not None:
            models.set_trainable(model, unfreeze)
        # Changing `trainable` only takes effect after compiling again.
        with job.strategy.scope():
            compile_model(model, learning_rate, hp["label_smoothing"], job.num_classes, job.jit,
                          ema=bool(hp["ema"]))
        progress = state.progress(name, n_epochs)
        # Killed after its last epoch (or early stop) but before it was recorded as done:
        # finished without training again.
        if progress is None or not (progress.stopped or len(progress.rows) >= n_epochs):
            model.fit(self.train_ds, validation_data=self.val_ds, epochs=n_epochs,
                      initial_epoch=len(progress.rows) if progress else 0,
                      class_weight=self.weights_by_class,
                      # tf.data batches come shuffled (make_dataset); Keras only warns
                      shuffle=keras.backend.backend() != "tensorflow",
                      callbacks=state.callbacks(
                          name, job.patience, ValidationAUC(self.val_ds, job.val_split.labels),
                          ema=bool(hp["ema"]), resumed=progress),
                      verbose=2)
            progress = state.progress(name, n_epochs)
        if progress is None:
            raise StateUnusable(f"phase {name!r} ended without recording an epoch")
        done[name] = state.finish(name, model, progress)

    def keep_best(self, model: keras.Model, done: dict[str, dict]) -> None:
        """The model gets the best epoch of the last phase."""
        resume.load_weights(model, self.state.weights(list(done)[-1]))


def _write_outputs(model: keras.Model, output: Path, done: dict[str, dict], val_ds: object,
                   job: Job, target_sensitivity: float | None, threshold_rule: str) -> dict:
    """The model, its history and curves (each written whole or not at all); returns the
    start of the model info, with the threshold and calibration chosen on validation."""
    phases = [{"name": r["name"], "epochs": r["epochs"]} for r in done.values()]
    history: dict[str, list[float]] = {}
    for record in done.values():
        for key, values in record["history"].items():
            history.setdefault(key, []).extend(values)
    val_labels: np.ndarray = job.val_split.labels
    val_probs = model.predict(val_ds, verbose=0)
    threshold = method = calibration = by_site = None
    if job.num_classes == 2:
        groups = None
        val_sites = site_metrics.site_rows(job.manifest, "val", "training data")
        if threshold_rule == "worst_group" and target_sensitivity is None:
            # The groups evaluate writes beside val's predictions (compare's ensemble uses them).
            groups = shift.val_groups(job.val_split.images, val_sites)
        threshold, method = metrics.operating_threshold(val_labels, val_probs[:, 1],
                                                        threshold_rule, target_sensitivity,
                                                        groups)
        by_site = site_metrics.site_thresholds(val_labels, val_probs[:, 1], val_sites,
                                               threshold_rule, target_sensitivity, groups)
        fitted = prevalence.calibration_or_none(val_labels, val_probs[:, 1], "split 'val'")
        calibration = fitted.as_dict() if fitted else None

    output.mkdir(parents=True, exist_ok=True)
    resume.save_model(model, output / artifacts.MODEL_FILE)
    safeio.write_text_atomic(output / artifacts.HISTORY_FILE,
                             json.dumps({"history": history, "phases": phases}, indent=2))
    curves = output / artifacts.CURVES_FILE
    with safeio.no_space_as_error(curves):
        safeio.replace_via_temp(
            curves, lambda temp: plots.plot_history(history, phases, temp, title=job.model_name),
            suffix=".tmp.png")
    return {
        "model_name": job.model_name,
        "class_names": job.manifest["class_names"],
        "positive_class": 1 if job.num_classes == 2 else None,
        "threshold": threshold,
        "threshold_method": method,
        "target_sensitivity": target_sensitivity,
        # Each site's own, on its val rows (site_metrics.site_thresholds); None on one site.
        site_metrics.SITE_THRESHOLDS: by_site,
        # Platt scaling on val: `lungxray predict` estimates a target set's prevalence with it.
        "calibration": calibration,
    }
