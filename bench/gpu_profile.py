"""Where a steady epoch of ``lungxray train`` spends its time, for a model that trains slower
than its device allows. Each part is timed after a warm-up call that compiled it:

- the training steps alone, fed by the pipeline's input (``batches.make_dataset``) and by arrays
  already in memory, and once more under cProfile;
- the validation passes (Keras' evaluate, and the prediction behind the exact ``val_auc``) and
  one save of the weights (what the per-epoch checkpoints write);
- a whole epoch as ``lungxray train`` runs it: validation data and the same callbacks.

    python bench/gpu_profile.py DATA_DIR MODEL OUT [--batch-size 32]

DATA_DIR is a ``lungxray preprocess`` output. Writes OUT/profile.json (seconds, ms per step,
images/s) and OUT/profile.txt (cProfile's top functions by own and by cumulative time). The
model is built and compiled as ``lungxray train`` does it (from scratch, default
hyperparameters).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np

from lungxray import batches, data, devices, fitting, models, resume
from lungxray.hparams import merge_hparams


def timed(call: Callable[[], object], model: keras.Model) -> float:
    """Seconds of ``call()``, up to the device having finished the model's last update."""
    start = time.perf_counter()
    call()
    keras.ops.convert_to_numpy(model.trainable_variables[-1].value)
    return time.perf_counter() - start


def timed_fit(model: keras.Model, *args: object, **kwargs: object) -> float:
    """Seconds of one epoch of ``fit``."""
    return timed(lambda: model.fit(*args, epochs=1, verbose=0, **kwargs), model)


def timed_twice(call: Callable[[], object], model: keras.Model) -> float:
    """Seconds of the second of two calls: the first compiles."""
    timed(call, model)
    return timed(call, model)


def module_paths(text: str) -> str:
    """Source paths as importable from ``sys.path`` (``keras/src/...``), not as this machine's
    folders: the profile reads the same wherever it was made."""
    for folder in sorted({p for p in sys.path if p}, key=len, reverse=True):
        text = text.replace(folder.rstrip("/") + "/", "")
    return text


def profile(data_dir: Path, model_name: str, out: Path, batch_size: int) -> dict:
    """Time the parts of an epoch of ``model_name`` and write profile.json/.txt."""
    _, mixed, jit = devices.configure_devices(None, None)
    manifest = data.read_manifest(data_dir)
    num_classes = len(manifest["class_names"])
    split = data.load_split(data_dir, "train")
    val = data.load_split(data_dir, "val")
    hp = merge_hparams(None, pretrained=False)
    keras.utils.set_random_seed(0)
    model = models.build_classifier(
        model_name, manifest["image_size"], manifest["channels"], num_classes, None,
        dropout=hp["dropout"], dense_units=int(hp["dense_units"]), augment=hp["augment"])
    fitting.compile_model(model, hp["learning_rate"], hp["label_smoothing"], num_classes, jit)
    pipeline = batches.make_dataset(split, num_classes, batch_size, shuffle=True)
    val_ds = batches.make_dataset(val, num_classes, batch_size)
    images, labels = batches.gather_batch(split, num_classes, np.arange(len(split)))

    training = {"first (compiles)": timed_fit(model, pipeline),
                "pipeline input": timed_fit(model, pipeline),
                "arrays in memory": timed_fit(model, images, labels, batch_size=batch_size,
                                              shuffle=False)}
    profiler = cProfile.Profile()
    profiler.enable()
    training["pipeline input, under cProfile"] = timed_fit(model, pipeline)
    profiler.disable()
    with tempfile.TemporaryDirectory() as scratch:
        state = resume.PhaseState(Path(scratch))
        other = {
            "validation: evaluate": timed_twice(lambda: model.evaluate(val_ds, verbose=0), model),
            "validation: predict": timed_twice(lambda: model.predict(val_ds, verbose=0), model),
            "save weights": timed_twice(
                lambda: model.save_weights(Path(scratch) / "w.weights.h5"), model),
            "whole epoch as lungxray train runs it": timed_fit(
                model, pipeline, validation_data=val_ds,
                callbacks=state.callbacks("scratch", 99,
                                          fitting.ValidationAUC(val_ds, val.labels))),
        }

    text = io.StringIO()
    for order in ("tottime", "cumulative"):
        text.write(f"==== top 40 by {order} ====\n")
        pstats.Stats(profiler, stream=text).sort_stats(order).print_stats(40)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.txt").write_text(module_paths(text.getvalue()))
    train_steps = -(-len(split) // batch_size)
    result = {
        "model": model_name, "train_images": len(split), "val_images": len(val),
        "batch_size": batch_size, "train_steps": train_steps,
        "image_size": manifest["image_size"],
        "backend": keras.backend.backend(), "gpus": devices.gpu_count(),
        "mixed_precision": mixed, "xla": bool(model.jit_compile),
        "seconds": {k: round(v, 3) for k, v in {**training, **other}.items()},
        "train_ms_per_step": {k: round(1000 * v / train_steps, 1) for k, v in training.items()},
        "train_images_per_s": {k: round(len(split) / v, 1) for k, v in training.items()},
    }
    (out / "profile.json").write_text(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data_dir", type=Path)
    parser.add_argument("model", choices=sorted(models.REGISTRY))
    parser.add_argument("out", type=Path)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(profile(args.data_dir, args.model, args.out, args.batch_size), indent=2))


if __name__ == "__main__":
    main()
