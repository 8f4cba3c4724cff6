"""Training on Keras' JAX backend, for machines with JAX but no TensorFlow build for their GPU:
the PyDataset input it uses, and a real run in a process where TensorFlow cannot be imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lungxray import data, metrics, models, prepare, train

# The train CLI in a Python where importing TensorFlow fails as if it were not installed.
NO_TENSORFLOW = """
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTensorFlow())
from lungxray.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_split_batches_match_the_tf_pipeline_and_reshuffle_each_epoch(small_dataset):
    split = data.load_split(small_dataset, "train")
    ordered = train.SplitBatches(split, 2, batch_size=32, shuffle=False, seed=0)
    tf_batches = list(train.make_dataset(split, 2, batch_size=32).as_numpy_iterator())
    assert len(ordered) == len(tf_batches) == -(-len(split) // 32)
    for (x, y), (tx, ty) in zip((ordered[i] for i in range(len(ordered))), tf_batches,
                                strict=True):
        np.testing.assert_array_equal(x, tx)
        np.testing.assert_array_equal(y, ty)

    shuffled = train.SplitBatches(split, 2, batch_size=32, shuffle=True, seed=0)
    first = shuffled.order.copy()
    assert sorted(first) == list(range(len(split))) and not np.array_equal(first, ordered.order)
    labels = np.concatenate([shuffled[i][1].argmax(1) for i in range(len(shuffled))])
    assert np.bincount(labels).tolist() == np.bincount(split.labels).tolist()
    shuffled.on_epoch_end()
    assert sorted(shuffled.order) == list(range(len(split)))
    assert not np.array_equal(shuffled.order, first)


def test_trains_on_jax_without_tensorflow_and_the_model_serves_on_tensorflow(tmp_path,
                                                                              shared_npz):
    # Fewer images than small_dataset: JAX's XLA convolutions on CPU are slow.
    prepared = tmp_path / "data"
    prepare.preprocess(str(shared_npz), prepared, image_size=32, max_per_split=48, seed=0)
    result = subprocess.run(
        [sys.executable, "-c", NO_TENSORFLOW, "train", "--data", str(prepared),
         "--model", "VGG16", "--output", str(tmp_path / "model"), "--epochs", "2",
         "--weights", "none"],
        env={**os.environ, "KERAS_BACKEND": "jax"}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    info = json.loads((tmp_path / "model" / train.INFO_FILE).read_text())
    assert info["devices"] == {"backend": "jax", "gpus": 0, "replicas": 1,
                               "mixed_precision": False, "xla": True}
    history = json.loads((tmp_path / "model" / train.HISTORY_FILE).read_text())["history"]
    assert len(history["val_auc"]) == 2 and len(history["epoch_started"]) == 2
    # The rest of the pipeline (evaluate, compare) runs on TensorFlow: the saved model loads
    # there, and its threshold is Youden's J on the scores TensorFlow computes.
    model = models.load_model(tmp_path / "model" / train.MODEL_FILE)
    val = data.load_split(prepared, "val")
    probs = model.predict(val.images.astype("float32"), verbose=0)[:, 1]
    assert info["threshold"] == pytest.approx(metrics.choose_threshold(val.labels, probs),
                                              abs=1e-4)


def test_a_backend_train_does_not_support_is_refused(monkeypatch):
    monkeypatch.setattr(train.keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match=r"Keras backend 'torch' is not supported.*jax"):
        train.configure_devices(None, None)


def test_every_augmentation_layer_keras_will_not_xla_compile_is_allowed_on_jax():
    """A geometric layer added to the augmentation but not to GEOMETRIC_AUGMENTATION would
    silently turn XLA off on JAX again."""
    refused = {type(layer) for layer in models.augmentation_layers(1.0, 0)
               if not layer.supports_jit}
    assert refused and refused <= set(models.GEOMETRIC_AUGMENTATION)
