"""Training-side benchmarks: input pipeline vs train step, and train throughput per model."""

from __future__ import annotations

import time
from pathlib import Path

import keras
import tensorflow as tf

from lungxray import batches, data, fitting, models, prepare

# The CPU profile's sizes (pipelines/profiles.py): prepared at 32 px, each model resizes to at
# least its minimum inside itself (InceptionV3: 75 px).
CPU_PROFILE = [("VGG16", 32), ("ResNet152V2", 32), ("InceptionV3", 32), ("VGG16", 64)]


def _timed_steps(model: keras.Model, dataset: tf.data.Dataset, steps: int) -> float:
    """Seconds for ``steps`` training steps, after one untimed step that traces the graph."""
    model.fit(dataset.take(1), epochs=1, verbose=0)
    started = time.perf_counter()
    model.fit(dataset.take(steps), epochs=1, verbose=0)
    return time.perf_counter() - started


def _model(name: str, split: data.Split, num_classes: int) -> keras.Model:
    model = models.build_classifier(name, split.images.shape[1], split.images.shape[-1],
                                    num_classes, None, augment=1.0)
    fitting.compile_model(model, 1e-4, 0.0, num_classes)
    return model


def bench_input_pipeline(data_dir: Path, model_name: str = "VGG16", batch_size: int = 32,
                         steps: int = 30) -> dict:
    """Images/s the tf.data pipeline delivers on its own vs images/s a training step consumes,
    and the share of step time spent waiting for input (fit on the real pipeline vs on the same
    batches already in memory)."""
    split = data.load_split(data_dir, "train")
    num_classes = len(data.read_manifest(data_dir)["class_names"])
    dataset = batches.make_dataset(split, num_classes, batch_size, shuffle=True).repeat()
    started = time.perf_counter()
    for _ in dataset.take(steps * 4):
        pass
    delivered = steps * 4 * batch_size / (time.perf_counter() - started)

    model = _model(model_name, split, num_classes)
    real = _timed_steps(model, dataset, steps)
    in_memory = dataset.take(steps).cache().repeat()
    for _ in in_memory.take(steps):  # fill the cache outside the timing
        pass
    cached = _timed_steps(model, in_memory, steps)
    return {
        "model": model_name, "image_size": int(split.images.shape[1]), "batch_size": batch_size,
        "steps": steps,
        "delivered_images_per_s": round(delivered, 1),
        "consumed_images_per_s": round(steps * batch_size / real, 1),
        "input_wait_share": round(max(0.0, 1 - cached / real), 3),
    }


def bench_train_throughput(data_dir: Path, runs: list[tuple[str, int]] = CPU_PROFILE,
                           batch_size: int = 32, steps: int = 10, workdir: Path | None = None
                           ) -> list[dict]:
    """Training images/s per (model, prepared size), whole network trainable (from scratch),
    tracing excluded."""
    results = []
    source = data.read_manifest(data_dir)["source"]
    for name, size in runs:
        prepared = data_dir
        if data.read_manifest(data_dir)["image_size"] != size:
            prepared = Path(workdir or data_dir.parent) / f"prepared_{size}"
            if not data.is_prepared(prepared):
                prepare.preprocess(source, prepared, image_size=size)
        split = data.load_split(prepared, "train")
        num_classes = len(data.read_manifest(prepared)["class_names"])
        model = _model(name, split, num_classes)
        dataset = batches.make_dataset(split, num_classes, batch_size, shuffle=True).repeat()
        seconds = _timed_steps(model, dataset, steps)
        results.append({"model": name, "image_size": size,
                        "input_size": models.get_spec(name).input_size(size),
                        "batch_size": batch_size, "steps": steps,
                        "images_per_s": round(steps * batch_size / seconds, 2)})
        keras.backend.clear_session()
    return results
