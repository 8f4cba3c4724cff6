"""Training on Keras' JAX backend, for machines with JAX but no TensorFlow build for their GPU:
a real run in a process where TensorFlow cannot be imported (its PyDataset input is tested in
test_batches.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from lungxray import artifacts, data, metrics, models, prepare

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
    info = json.loads((tmp_path / "model" / artifacts.INFO_FILE).read_text())
    assert info["devices"] == {"backend": "jax", "gpus": 0, "replicas": 1,
                               "mixed_precision": False, "xla": True}
    history = json.loads((tmp_path / "model" / artifacts.HISTORY_FILE).read_text())["history"]
    assert len(history["val_auc"]) == 2 and len(history["epoch_started"]) == 2
    # The rest of the pipeline (evaluate, compare) runs on TensorFlow: the saved model loads
    # there, and its threshold is Youden's J on the scores TensorFlow computes.
    model = models.load_model(tmp_path / "model" / artifacts.MODEL_FILE)
    val = data.load_split(prepared, "val")
    probs = model.predict(val.images.astype("float32"), verbose=0)[:, 1]
    assert info["threshold"] == pytest.approx(metrics.choose_threshold(val.labels, probs),
                                              abs=1e-4)


def test_every_augmentation_layer_keras_will_not_xla_compile_is_allowed_on_jax():
    """A geometric layer added to the augmentation but not to GEOMETRIC_AUGMENTATION would
    silently turn XLA off on JAX again."""
    refused = {type(layer) for layer in models.augmentation_layers(1.0, 0)
               if not layer.supports_jit}
    assert refused and refused <= set(models.GEOMETRIC_AUGMENTATION)
