"""The backbone registry: read without Keras, every Keras Applications name real, input sizes
never below a backbone's minimum, and SmallCNN always trained from scratch."""

from __future__ import annotations

import subprocess
import sys

from lungxray import backbones
from lungxray.backbones import REGISTRY


def test_the_registry_is_read_without_importing_keras():
    code = ("import sys; from lungxray import backbones; "
            "assert backbones.REGISTRY; "
            "print(sorted(m for m in ('keras', 'tensorflow', 'jax') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"


def test_every_keras_applications_name_exists_and_smallcnn_is_ours():
    import keras

    keras_names = [name for name, spec in REGISTRY.items() if not spec.scratch_only]
    assert [name for name in keras_names if not hasattr(keras.applications, name)] == []
    assert [name for name, spec in REGISTRY.items() if spec.scratch_only] == ["SmallCNN"]
    assert {spec.preprocess for spec in REGISTRY.values()} <= {"caffe", "tf", "torch", "builtin"}


def test_input_size_and_weights_follow_the_backbone():
    inception = REGISTRY["InceptionV3"]
    assert inception.input_size(28) == 75 and inception.input_size(128) == 128
    assert REGISTRY["VGG16"].input_size(16) == 32  # the default minimum
    assert REGISTRY["VGG16"].weights_for("imagenet") == "imagenet"
    assert REGISTRY["SmallCNN"].weights_for("imagenet") == "none"
    assert isinstance(REGISTRY["VGG16"], backbones.ModelSpec)
