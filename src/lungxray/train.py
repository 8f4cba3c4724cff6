"""Transfer learning (two phases) or training from scratch on a prepared dataset."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import keras
import numpy as np
from sklearn.utils.class_weight import compute_class_weight

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
)
from lungxray.errors import ConfigError, ModelError, quote
from lungxray.resume import MONITOR, STATE_FORMAT, PhaseState, StateUnusable

if TYPE_CHECKING:
    import tensorflow as tf

MODEL_FILE, INFO_FILE, HISTORY_FILE = (artifacts.MODEL_FILE, artifacts.INFO_FILE,
                                       artifacts.HISTORY_FILE)
OUTPUT_FILES = frozenset({MODEL_FILE, INFO_FILE, HISTORY_FILE, artifacts.CURVES_FILE})
# The image and CI train on TensorFlow; JAX (KERAS_BACKEND=jax) also trains, on one device, for
# machines that have JAX but no TensorFlow build for their GPU.
BACKENDS = ("tensorflow", "jax")

# One place for the defaults of every hyperparameter train understands; tune searches a subset
# of them and hands its choice over in best_hparams.json.
DEFAULT_HPARAMS: dict[str, float | int | bool] = {
    "learning_rate": 1e-3,
    "dropout": 0.2,
    "dense_units": 0,
    "label_smoothing": 0.0,
    "augment": 1.0,
    "unfreeze": 0.3,  # share of backbone layers unfrozen in the fine-tune phase
    "fine_tune_learning_rate": 1e-5,
    "class_weighting": True,
    # Acquisition-like intensity augmentation (gamma, brightness, contrast, blur, noise;
    # models.augmentation_layers), 0 = off.
    "intensity_augment": 0.0,
    # Per-image intensity standardisation inside the model (models.PerImageStandardization).
    # Off for pretrained backbones: their ImageNet features expect natural intensities, and
    # the cached features of the head search are computed without it.
    "standardize": False,
    # Adam keeps an exponential moving average of the weights, validated and saved instead of
    # the raw weights (keras.callbacks.SwapEMAWeights).
    "ema": False,
    # Keras' RandAugment magnitude and AugMix severity (models.augmentation_layers), 0 = off.
    "randaugment": 0.0,
    "augmix": 0.0,
    # MixUp's Beta alpha and CutMix's factor on training batches (with_mixing), 0 = off.
    "mixup": 0.0,
    "cutmix": 0.0,
}
# Without BatchNorm (VGG) a from-scratch network at 1e-3 collapses to one class; 1e-4 learns.
SCRATCH_DEFAULTS: dict[str, float | int | bool] = {"learning_rate": 1e-4}
# Per-model scratch defaults over SCRATCH_DEFAULTS. SmallCNN has BatchNorm after every conv and
# learns at 1e-3: on the shift proxy (bench/levers_bench.py, 8 epochs) val AUC 0.992 and
# test_shifted AUC 0.962 against 0.986 / 0.934 at 1e-4.
MODEL_DEFAULTS: dict[str, dict[str, float | int | bool]] = {"SmallCNN": {"learning_rate": 1e-3}}


def defaults_for(pretrained: bool = True, model_name: str | None = None) -> dict:
    """Train's defaults: DEFAULT_HPARAMS, and from scratch SCRATCH_DEFAULTS and the model's own
    MODEL_DEFAULTS over them."""
    if pretrained:
        return dict(DEFAULT_HPARAMS)
    return {**DEFAULT_HPARAMS, **SCRATCH_DEFAULTS, **MODEL_DEFAULTS.get(model_name or "", {})}


def merge_hparams(hparams: dict | None, pretrained: bool = True,
                  model_name: str | None = None) -> dict:
    """Defaults (:func:`defaults_for`) overridden by ``hparams``; unknown names are an error,
    not silently ignored."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(DEFAULT_HPARAMS))
    if unknown:
        shown = ", ".join(quote(str(n), 40) for n in unknown[:10])
        raise ConfigError(f"unknown hyperparameters {shown}"
                          f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}; "
                          f"known: {', '.join(sorted(DEFAULT_HPARAMS))}")
    schema.check_hparams(hparams, "hparams")
    return {**defaults_for(pretrained, model_name), **hparams}


def read_best_hparams(path: Path, model_name: str | None = None) -> dict:
    """The hyperparameters from a ``best_hparams.json`` (or a plain {name: value} file);
    a tuning result for another model than ``model_name`` is refused."""
    content = safeio.load_json_object(Path(path), "--hparams file", error=ConfigError)
    shown = quote(str(path))
    tuned = content.get("model_name")
    if model_name and tuned and tuned != model_name:
        raise ConfigError(f"{shown}: hyperparameters tuned for {quote(str(tuned), 60)}, not "
                          f"{model_name}")
    hparams = content.get("hparams", content)
    if not isinstance(hparams, dict):
        raise ConfigError(f"{shown}: 'hparams' must be a JSON object of hyperparameters")
    merge_hparams(hparams)  # names, types and ranges refused here, before any state exists
    return hparams


def gather_batch(split: data.Split, num_classes: int, index: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """One batch of (float32 pixels, one-hot labels); one-hot so label smoothing works."""
    index = np.sort(index)  # in-order reads are much faster on a memory map
    onehot = np.eye(num_classes, dtype=np.float32)[split.labels[index]]
    return split.images[index].astype(np.float32), onehot


def classifier_options(hp: dict) -> dict:
    """The keyword arguments of ``models.build_classifier`` that come from hyperparameters."""
    return {"dropout": hp["dropout"], "dense_units": int(hp["dense_units"]),
            "augment": hp["augment"], "intensity_augment": hp["intensity_augment"],
            "standardize": bool(hp["standardize"]), "randaugment": hp["randaugment"],
            "augmix": hp["augmix"]}


def with_mixing(dataset: tf.data.Dataset | SplitBatches, mixup: float, cutmix: float,
                seed: int) -> tf.data.Dataset | SplitBatches:
    """Training batches blended by Keras' MixUp (Beta ``mixup`` alpha) and/or CutMix
    (``cutmix`` factor), images and one-hot labels alike; unchanged when both are 0."""
    mixers = []
    if mixup > 0:
        mixers.append(keras.layers.MixUp(alpha=mixup, seed=seed))
    if cutmix > 0:
        mixers.append(keras.layers.CutMix(factor=min(1.0, cutmix), seed=seed))
    if not mixers:
        return dataset

    def mix(images, labels):
        batch = {"images": images, "labels": labels}
        for mixer in mixers:
            batch = mixer(batch, training=True)
        return batch["images"], batch["labels"]

    if isinstance(dataset, SplitBatches):
        return MixedBatches(dataset, mix)
    import tensorflow as tf

    return dataset.map(mix, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def make_dataset(split: data.Split, num_classes: int, batch_size: int, shuffle: bool = False,
                 seed: int = 42) -> tf.data.Dataset | SplitBatches:
    """Batches gathered from the (possibly memory-mapped) arrays in parallel, so a dataset larger
    than memory streams: a tf.data pipeline on TensorFlow, a PyDataset on JAX."""
    if keras.backend.backend() != "tensorflow":
        return SplitBatches(split, num_classes, batch_size, shuffle, seed)
    import tensorflow as tf

    dataset = tf.data.Dataset.range(len(split))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    shape = (None, *split.images.shape[1:])
    dataset = dataset.batch(batch_size).map(
        lambda index: tf.numpy_function(lambda i: gather_batch(split, num_classes, i), [index],
                                        (tf.float32, tf.float32)),
        num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    dataset = dataset.map(lambda x, y: (tf.ensure_shape(x, shape),
                                        tf.ensure_shape(y, (None, num_classes))))
    return dataset.prefetch(tf.data.AUTOTUNE)


class SplitBatches(keras.utils.PyDataset):
    """``make_dataset``'s batches for JAX, which cannot read tf.data: gathered by worker threads,
    from a fresh seeded order of the images each epoch when shuffled."""

    def __init__(self, split: data.Split, num_classes: int, batch_size: int, shuffle: bool,
                 seed: int):
        super().__init__(workers=min(8, os.cpu_count() or 1))
        self.split, self.num_classes, self.batch_size = split, num_classes, batch_size
        self.shuffle, self.rng = shuffle, np.random.default_rng(seed)
        self.order = np.arange(len(split))
        self.on_epoch_end()

    def __len__(self) -> int:
        return math.ceil(len(self.split) / self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        batch = self.order[index * self.batch_size:(index + 1) * self.batch_size]
        return gather_batch(self.split, self.num_classes, batch)

    def on_epoch_end(self) -> None:
        if self.shuffle:
            self.rng.shuffle(self.order)


class MixedBatches(keras.utils.PyDataset):
    """A :class:`SplitBatches` whose batches go through ``mix`` (:func:`with_mixing`, JAX), in
    one thread: the mixing layers' seed generators are not safe to share between threads."""

    def __init__(self, batches: SplitBatches, mix: Callable):
        super().__init__()
        self.batches, self.mix = batches, mix

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = self.mix(*self.batches[index])
        return np.asarray(images), np.asarray(labels)

    def on_epoch_end(self) -> None:
        self.batches.on_epoch_end()


def compile_model(model: keras.Model, learning_rate: float, label_smoothing: float,
                  num_classes: int, jit_compile: bool = False, ema: bool = False) -> None:
    """Adam + cross-entropy; ``auc`` is macro one-vs-rest, which for two softmax outputs equals
    the binary ROC AUC of the positive class (Keras' approximation: :class:`ValidationAUC` makes
    ``val_auc`` exact where it is used to choose). ``model.jit_compile`` then says whether Keras
    really compiles with XLA: it refuses to for a model holding layers it marks unsupported."""
    if jit_compile and keras.backend.backend() == "jax":
        # Keras marks its geometric augmentation layers not XLA-compilable for all backends, as
        # TensorFlow has no XLA kernel for their image transform, and then compiles the whole
        # model without XLA. JAX compiles them, and without XLA it runs op by op: VGG16 at
        # 224 px trained at 40 images/s on an H200 that way.
        for layer in model.layers:
            if isinstance(layer, models.GEOMETRIC_AUGMENTATION):
                layer.supports_jit = True
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, use_ema=ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc", multi_label=True,
                                               num_labels=num_classes)],
        jit_compile=jit_compile,
    )


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights so the minority class (often 'normal') is not ignored."""
    classes = np.arange(num_classes)
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    lookup = dict(zip(present.tolist(), weights.tolist(), strict=True))
    return {int(c): float(lookup.get(c, 1.0)) for c in classes}


def phase_epochs(epochs: int, pretrained: bool) -> list[tuple[str, int]]:
    """Pretrained: head first, then fine-tune (half each, head gets the odd one).
    From scratch: one phase."""
    if not pretrained:
        return [("scratch", epochs)]
    head = (epochs + 1) // 2
    return [("head", head), ("finetune", epochs - head)]


def gpu_count() -> int:
    if keras.backend.backend() == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


class OneDevice:
    """Stands in for a tf.distribute strategy on JAX, which trains on one device here."""

    num_replicas_in_sync = 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def configure_devices(mixed_precision: bool | None, jit_compile: bool | None
                      ) -> tuple[tf.distribute.Strategy | OneDevice, bool, bool]:
    """Mixed precision and XLA default to on with a GPU, off on CPU (where they slow down);
    several GPUs train data-parallel with MirroredStrategy. On JAX, XLA defaults to on also on
    CPU (without it, JAX runs op by op)."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ConfigError(f"Keras backend {backend!r} is not supported; use one of {BACKENDS} "
                         "(KERAS_BACKEND)")
    gpus = gpu_count()
    mixed = gpus > 0 if mixed_precision is None else mixed_precision
    jit = (gpus > 0 or backend == "jax") if jit_compile is None else jit_compile
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    if backend == "jax":
        return OneDevice(), mixed, jit
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy() if gpus > 1 else tf.distribute.get_strategy()
    return strategy, mixed, jit


class ValidationAUC(keras.callbacks.Callback):
    """Replaces Keras' ``val_auc``, an approximation on 200 fixed thresholds, by the exact ROC
    AUC (sklearn) of the model's validation predictions: the figure evaluation reports. Listed
    first, it runs before the checkpoint, early stopping, the LR schedule, the epoch log and
    keras-tuner read the value. Costs one more prediction pass over validation per epoch."""

    def __init__(self, inputs: object, labels: np.ndarray):
        super().__init__()
        self.inputs, self.labels = inputs, np.asarray(labels)

    def __deepcopy__(self, memo: dict) -> ValidationAUC:
        # keras-tuner deep-copies search callbacks for every trial; the data is shared, not
        # copied (a tf.data pipeline cannot be).
        return ValidationAUC(self.inputs, self.labels)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        auc = metrics.roc_auc(self.labels, self.model.predict(self.inputs, verbose=0))
        if auc is not None:  # a class absent from validation: leave Keras' value
            logs[MONITOR] = auc


def train(data_dir: Path, model_name: str, output: Path, hparams: dict | None = None,
          epochs: int = 5, weights: str = "none", batch_size: int = 32, seed: int = 42,
          patience: int = 3, target_sensitivity: float | None = None,
          mixed_precision: bool | None = None, jit_compile: bool | None = None,
          state_dir: Path | None = None, cache_dir: Path | None = None) -> dict:
    """Train ``model_name`` on ``data_dir`` and write the model, its info and curves to
    ``output``. Returns the model info (also written as ``model_info.json``).

    Re-running with the same ``output`` (or ``state_dir``) after a kill resumes from the last
    finished epoch, optimizer state included (:mod:`lungxray.resume`); a state that cannot be
    used, or of other settings, is discarded with a note. The decision threshold is chosen on
    validation: Youden's J, or the highest one reaching ``target_sensitivity``. A full disk
    is one error naming the file and the bytes it needs.
    """
    # Every argument, the weights file and the data are checked, and the model built, before
    # the state dir exists: a refused run never blocks its corrected re-run.
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    schema.check_training(epochs=epochs, batch_size=batch_size, seed=seed, patience=patience)
    metrics.check_target_sensitivity(target_sensitivity)
    weights = models.get_spec(model_name).weights_for(weights)  # SmallCNN: always 'none'
    strategy, mixed, jit = configure_devices(mixed_precision, jit_compile)
    resolved = models.resolve_weights(weights, cache_dir)
    hp = merge_hparams(hparams, pretrained=resolved is not None, model_name=model_name)
    manifest = integrity.read_manifest(data_dir)
    class_names = manifest["class_names"]
    num_classes = len(class_names)
    train_split = integrity.load_checked_split(data_dir, "train", manifest)
    val_split = integrity.load_checked_split(data_dir, "val", manifest)
    output = Path(output)
    state = PhaseState(Path(state_dir) if state_dir else output / ".state")
    digests = {name: split["sha256"] for name, split in manifest["splits"].items()}
    plan = phase_epochs(epochs, resolved is not None)

    def build() -> keras.Model:
        keras.utils.set_random_seed(seed)
        with strategy.scope():
            return models.build_classifier(
                model_name, manifest["image_size"], manifest["channels"], num_classes,
                resolved, seed=seed, **classifier_options(hp))

    model = build()
    config = {
        "state_format": STATE_FORMAT, "model_name": model_name, "hparams": hp, "epochs": epochs,
        "batch_size": batch_size, "seed": seed,
        "weights": features.weights_identity(resolved) if resolved else "none",
        "image_size": manifest["image_size"], "channels": manifest["channels"],
        "data_sha256": digests,
    }
    # SIGTERM (a pod stopped) unwinds like an error: no temporary file of a write is left.
    with state.stop_on_signals(), safeio.no_space_as_error(output):
        state.open(config, plan)
        resume.sweep_temporaries(output, OUTPUT_FILES.__contains__)  # left by a SIGKILL
        (output / INFO_FILE).unlink(missing_ok=True)  # until rewritten, the dir is not a model
        global_batch = batch_size * strategy.num_replicas_in_sync
        train_ds = with_mixing(
            make_dataset(train_split, num_classes, global_batch, shuffle=True, seed=seed),
            hp["mixup"], hp["cutmix"], seed)
        val_ds = make_dataset(val_split, num_classes, global_batch)
        fit = Fit(strategy, train_ds, val_ds, val_split.labels, num_classes, jit, hp, patience,
                  class_weights(train_split.labels, num_classes) if hp["class_weighting"]
                  else None)
        started = time.time()
        try:
            done = fit.phases(model, state, plan)
        except StateUnusable as err:  # a weights file that did not load: start afresh
            state.discard(config, err)
            model = build()
            done = fit.phases(model, state, plan)
        train_seconds = time.time() - started
        info = _write_outputs(model, output, done, val_ds, val_split.labels, {
            "model_name": model_name, "class_names": class_names,
            "positive_class": 1 if num_classes == 2 else None,
        }, target_sensitivity)
        phases = [{"name": r["name"], "epochs": r["epochs"]} for r in done.values()]
        images_seen = len(train_split) * sum(p["epochs"] for p in phases)
        info.update({
            "image_size": manifest["image_size"],
            "input_size": models.get_spec(model_name).input_size(manifest["image_size"]),
            "channels": manifest["channels"],
            # predict and export fit new images the way preprocess fitted the training ones
            "keep_aspect": bool(manifest.get("keep_aspect", False)),
            "weights": weights,
            "hparams": hp,
            "params": int(model.count_params()),
            "train_seconds": round(train_seconds, 2),
            "train_images_per_s": round(images_seen / max(train_seconds, 1e-9), 2),
            "epochs": sum(p["epochs"] for p in phases),
            "batch_size": batch_size,
            "devices": {"backend": keras.backend.backend(), "gpus": gpu_count(),
                        "replicas": strategy.num_replicas_in_sync,
                        "mixed_precision": mixed, "xla": bool(model.jit_compile)},
            "seed": seed,
            "data_sha256": digests,
        })
        # Written last: its presence marks a complete model directory.
        safeio.write_text_atomic(output / INFO_FILE, json.dumps(info, indent=2))
    state.remove()  # complete: the output keeps the results, a PVC does not fill up
    return info


class Fit:
    """The phases of one training job over its data and settings."""

    def __init__(self, strategy: tf.distribute.Strategy | OneDevice, train_ds: object,
                 val_ds: object, val_labels: np.ndarray, num_classes: int, jit: bool, hp: dict,
                 patience: int, weights_by_class: dict[int, float] | None):
        self.strategy, self.train_ds, self.val_ds = strategy, train_ds, val_ds
        self.val_labels, self.num_classes, self.jit = val_labels, num_classes, jit
        self.hp, self.patience, self.weights_by_class = hp, patience, weights_by_class

    def phases(self, model: keras.Model, state: PhaseState, plan: list[tuple[str, int]]
               ) -> dict[str, dict]:
        """Train every phase of ``plan`` not finished in ``state``, each from its last
        committed epoch; returns the finished phases' records, the model holding the best
        epoch of the last one."""
        hp = self.hp
        done = {record["name"]: record for record in state.finished(plan)}
        for phase, n_epochs in plan:
            if n_epochs == 0 or phase in done:
                continue
            if done:  # resuming after a finished phase: start from its weights
                resume.load_weights(model, state.weights(list(done)[-1]))
            learning_rate = hp["learning_rate"]
            if phase == "head":
                models.set_trainable(model, 0.0)
            elif phase == "finetune":
                models.set_trainable(model, hp["unfreeze"])
                learning_rate = hp["fine_tune_learning_rate"]
            # Changing `trainable` only takes effect after compiling again.
            with self.strategy.scope():
                compile_model(model, learning_rate, hp["label_smoothing"], self.num_classes,
                              self.jit, ema=bool(hp["ema"]))
            progress = state.progress(phase, n_epochs)
            # Killed after its last epoch (or early stop) but before it was recorded as done:
            # finished without training again.
            if progress is None or not (progress.stopped or len(progress.rows) >= n_epochs):
                model.fit(self.train_ds, validation_data=self.val_ds, epochs=n_epochs,
                          initial_epoch=len(progress.rows) if progress else 0,
                          class_weight=self.weights_by_class,
                          # tf.data batches come shuffled (make_dataset); Keras only warns
                          shuffle=keras.backend.backend() != "tensorflow",
                          callbacks=state.callbacks(
                              phase, self.patience, ValidationAUC(self.val_ds, self.val_labels),
                              ema=bool(hp["ema"]), resumed=progress),
                          verbose=2)
                progress = state.progress(phase, n_epochs)
            if progress is None:
                raise StateUnusable(f"phase {phase!r} ended without recording an epoch")
            done[phase] = state.finish(phase, model, progress)
        resume.load_weights(model, state.weights(list(done)[-1]))  # the last phase's best
        return done


def _write_outputs(model: keras.Model, output: Path, done: dict[str, dict], val_ds: object,
                   val_labels: np.ndarray, info: dict, target_sensitivity: float | None
                   ) -> dict:
    """The model, its history and curves (each written whole or not at all); returns ``info``
    with the threshold and calibration chosen on validation."""
    phases = [{"name": r["name"], "epochs": r["epochs"]} for r in done.values()]
    history: dict[str, list[float]] = {}
    for record in done.values():
        for key, values in record["history"].items():
            history.setdefault(key, []).extend(values)
    val_probs = model.predict(val_ds, verbose=0)
    threshold = calibration = None
    if len(info["class_names"]) == 2:
        threshold = metrics.choose_threshold(val_labels, val_probs[:, 1],
                                             target_sensitivity=target_sensitivity)
        fitted = prevalence.calibration_or_none(val_labels, val_probs[:, 1], "split 'val'")
        calibration = fitted.as_dict() if fitted else None

    output.mkdir(parents=True, exist_ok=True)
    resume.save_model(model, output / MODEL_FILE)
    safeio.write_text_atomic(output / HISTORY_FILE,
                             json.dumps({"history": history, "phases": phases}, indent=2))
    curves = output / artifacts.CURVES_FILE
    with safeio.no_space_as_error(curves):
        safeio.replace_via_temp(
            curves, lambda temp: plots.plot_history(history, phases, temp,
                                                    title=info["model_name"]),
            suffix=".tmp.png")
    return {
        **info,
        "threshold": threshold,
        "threshold_method": (None if threshold is None else "youden" if target_sensitivity is None
                             else f"sensitivity>={target_sensitivity}"),
        "target_sensitivity": target_sensitivity,
        # Platt scaling on val: `lungxray predict` estimates a target set's prevalence with it.
        "calibration": calibration,
    }


def read_model_info(model_dir: Path) -> dict:
    """A model folder's model_info.json, read within the size and depth limits."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {INFO_FILE}; is this a `lungxray train` output?")
    return safeio.load_json_object(path, "model info", error=ModelError)
