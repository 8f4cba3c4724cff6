"""Load a saved model or ensemble for inference: one `lungxray train` output dir, or a dir with
``ensemble.json`` and ``members/<name>/`` whose members' probabilities are averaged.

Predicts in chunks (a memory-mapped split need not fit in memory as float32) and times the
steady-state cost per image, as a deployment would see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

PREDICT_BATCH = 64
PREDICT_CHUNK = 1024  # images converted to float32 at a time


@dataclass
class Predictor:
    """One saved model, or the members of a saved ensemble whose probabilities are averaged."""

    info: dict[str, Any]
    members: list[Any]  # keras.Model objects

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1 or bool(self.info.get("ensemble"))

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, wall-clock ms per image) over the whole array, members in turn.

        Each member first predicts one batch untimed (graph tracing, memory allocation), so the
        time is the steady-state cost a deployment would see.
        """
        n = len(images)
        total, elapsed = None, 0.0
        for model in self.members:
            model.predict(np.asarray(images[:PREDICT_BATCH], dtype=np.float32),
                          batch_size=PREDICT_BATCH, verbose=0)
            parts = []
            start = time.perf_counter()
            # Slices of a (memory-mapped) split: float32 copies of a whole large set would not
            # fit in memory. Converting them is part of the cost a deployment pays, so timed.
            for first in range(0, n, PREDICT_CHUNK):
                x = np.asarray(images[first:first + PREDICT_CHUNK], dtype=np.float32)
                parts.append(model.predict(x, batch_size=PREDICT_BATCH, verbose=0))
            elapsed += time.perf_counter() - start
            probs = np.concatenate(parts).astype(np.float64)
            total = probs if total is None else total + probs
        return total / len(self.members), 1000.0 * elapsed / max(n, 1)

    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Mean member probabilities of an in-memory batch, untimed and without a warm-up (the
        corrupted and test-time views of a split, after :meth:`predict` warmed up)."""
        x = np.asarray(images, dtype=np.float32)
        return np.mean([m.predict(x, batch_size=PREDICT_BATCH, verbose=0) for m in self.members],
                       axis=0).astype(np.float64)


def device_name() -> str:
    """``CPU`` or ``GPU x<n>``: where the predictions (and their latency) ran."""
    import tensorflow as tf  # the Keras backend; already loaded with the model

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else "CPU"
