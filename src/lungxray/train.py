"""Transfer learning (two phases) or training from scratch on a prepared dataset."""

from __future__ import annotations

import json
import time
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from sklearn.utils.class_weight import compute_class_weight

from lungxray import data, metrics, models, plots

MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
HISTORY_FILE = "history.json"
MONITOR = "val_auc"

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
}
# Without BatchNorm (VGG) a from-scratch network at 1e-3 collapses to one class; 1e-4 learns.
SCRATCH_DEFAULTS = {"learning_rate": 1e-4}


def merge_hparams(hparams: dict | None, pretrained: bool = True) -> dict:
    """Defaults overridden by ``hparams``; unknown names are an error, not silently ignored."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(DEFAULT_HPARAMS))
    if unknown:
        raise ValueError(f"unknown hyperparameters {unknown}; known: {sorted(DEFAULT_HPARAMS)}")
    return {**DEFAULT_HPARAMS, **({} if pretrained else SCRATCH_DEFAULTS), **hparams}


def make_dataset(split: data.Split, num_classes: int, batch_size: int, shuffle: bool = False,
                 seed: int = 42) -> tf.data.Dataset:
    """Batches of (float32 pixels, one-hot labels); one-hot so label smoothing works."""
    images = split.images.astype(np.float32)
    onehot = keras.utils.to_categorical(split.labels, num_classes).astype(np.float32)
    dataset = tf.data.Dataset.from_tensor_slices((images, onehot))
    if shuffle:
        dataset = dataset.shuffle(len(split), seed=seed, reshuffle_each_iteration=True)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def compile_model(model: keras.Model, learning_rate: float, label_smoothing: float,
                  num_classes: int) -> None:
    """Adam + cross-entropy; ``auc`` is macro one-vs-rest, which for two softmax outputs equals
    the binary ROC AUC of the positive class."""
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc", multi_label=True,
                                               num_labels=num_classes)],
    )


def class_weights(labels: np.ndarray, num_classes: int) -> dict[int, float]:
    """Balanced weights so the minority class (often 'normal') is not ignored."""
    classes = np.arange(num_classes)
    present = np.unique(labels)
    weights = compute_class_weight("balanced", classes=present, y=labels)
    lookup = dict(zip(present.tolist(), weights.tolist(), strict=True))
    return {int(c): float(lookup.get(c, 1.0)) for c in classes}


def _callbacks(patience: int) -> list[keras.callbacks.Callback]:
    return [
        keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience,
                                      restore_best_weights=True),
        keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=0.3,
                                          patience=max(1, patience // 2), min_lr=1e-7),
    ]


def phase_epochs(epochs: int, pretrained: bool) -> list[tuple[str, int]]:
    """Pretrained: head first, then fine-tune (half each, head gets the odd one).
    From scratch: one phase."""
    if not pretrained:
        return [("scratch", epochs)]
    head = (epochs + 1) // 2
    return [("head", head), ("finetune", epochs - head)]


def train(data_dir: Path, model_name: str, output: Path, hparams: dict | None = None,
          epochs: int = 5, weights: str = "none", batch_size: int = 32, seed: int = 42,
          patience: int = 3, cache_dir: Path | None = None) -> dict:
    """Train ``model_name`` on ``data_dir`` and write the model, its info and curves to
    ``output``. Returns the model info (also written as ``model_info.json``)."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    resolved = models.resolve_weights(weights, cache_dir)
    hp = merge_hparams(hparams, pretrained=resolved is not None)
    manifest = data.read_manifest(data_dir)
    class_names = manifest["class_names"]
    num_classes = len(class_names)
    train_split, val_split = data.load_split(data_dir, "train"), data.load_split(data_dir, "val")
    keras.utils.set_random_seed(seed)
    model = models.build_classifier(
        model_name, manifest["image_size"], manifest["channels"], num_classes, resolved,
        dropout=hp["dropout"], dense_units=int(hp["dense_units"]), augment=hp["augment"],
        seed=seed)
    train_ds = make_dataset(train_split, num_classes, batch_size, shuffle=True, seed=seed)
    val_ds = make_dataset(val_split, num_classes, batch_size)
    weights_by_class = (class_weights(train_split.labels, num_classes)
                        if hp["class_weighting"] else None)

    history: dict[str, list[float]] = {}
    phases = []
    started = time.time()
    for phase, n_epochs in phase_epochs(epochs, resolved is not None):
        if n_epochs == 0:
            continue
        if phase == "head":
            models.set_trainable(model, 0.0)
            learning_rate = hp["learning_rate"]
        elif phase == "finetune":
            models.set_trainable(model, hp["unfreeze"])
            learning_rate = hp["fine_tune_learning_rate"]
        else:
            learning_rate = hp["learning_rate"]
        # Changing `trainable` only takes effect after compiling again.
        compile_model(model, learning_rate, hp["label_smoothing"], num_classes)
        fitted = model.fit(train_ds, validation_data=val_ds, epochs=n_epochs,
                           class_weight=weights_by_class, callbacks=_callbacks(patience),
                           verbose=2)
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
        phases.append({"name": phase, "epochs": len(fitted.history["loss"])})
    train_seconds = time.time() - started

    val_probs = model.predict(val_ds, verbose=0)
    threshold = None
    if num_classes == 2:
        threshold = metrics.choose_threshold(val_split.labels, val_probs[:, 1])

    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model.save(output / MODEL_FILE)
    (output / HISTORY_FILE).write_text(json.dumps({"history": history, "phases": phases},
                                                  indent=2))
    plots.plot_history(history, phases, output / "curves.png", title=model_name)
    info = {
        "model_name": model_name,
        "class_names": class_names,
        "positive_class": 1 if num_classes == 2 else None,
        "threshold": threshold,
        "threshold_method": "youden" if threshold is not None else None,
        "image_size": manifest["image_size"],
        "input_size": models.get_spec(model_name).input_size(manifest["image_size"]),
        "channels": manifest["channels"],
        "weights": weights,
        "hparams": hp,
        "params": int(model.count_params()),
        "train_seconds": round(train_seconds, 2),
        "epochs": sum(p["epochs"] for p in phases),
        "batch_size": batch_size,
        "seed": seed,
        "data_sha256": {name: s["sha256"] for name, s in manifest["splits"].items()},
    }
    # Written last: its presence marks a complete model directory.
    (output / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info


def read_model_info(model_dir: Path) -> dict:
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {INFO_FILE}; is this a `lungxray train` output?")
    return json.loads(path.read_text())
