"""Backbone registry, weights handling and the raw-pixels-in classifier."""

from __future__ import annotations

import socket

import keras
import numpy as np
import pytest

from lungxray import models

LARGE = {"EfficientNetB5", "EfficientNetB6", "EfficientNetB7", "EfficientNetV2M",
         "EfficientNetV2L", "ConvNeXtBase", "ConvNeXtLarge", "ConvNeXtXLarge", "NASNetLarge",
         "ResNet152", "ResNet152V2", "InceptionResNetV2", "DenseNet201", "VGG19"}


def test_registry_covers_keras_applications():
    for required in ("VGG16", "VGG19", "ResNet50", "ResNet101", "ResNet152", "ResNet50V2",
                     "ResNet101V2", "ResNet152V2", "InceptionV3", "InceptionResNetV2",
                     "Xception", "DenseNet121", "DenseNet169", "DenseNet201", "MobileNet",
                     "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0",
                     "EfficientNetB7", "EfficientNetV2B0", "EfficientNetV2S", "EfficientNetV2L",
                     "ConvNeXtTiny", "NASNetMobile", "NASNetLarge"):
        assert required in models.REGISTRY
        assert hasattr(keras.applications, required)
    assert models.get_spec("InceptionV3").input_size(28) == 75
    assert models.get_spec("VGG16").input_size(64) == 64


def test_unknown_model_lists_valid_names():
    with pytest.raises(models.ModelError, match="unknown model 'VGG61'.*VGG16.*InceptionV3"):
        models.get_spec("VGG61")


# One backbone of each keras.applications module (the first registered, the smallest) and the
# default base models are built and run; the rest share their module's code path, so each is
# checked to be that module's function with the family's input rules (building all 41 took
# about 200 s of the suite's time for no other code path).
FAMILY_FIRST = {spec.module: name for name, spec in reversed(models.REGISTRY.items())}
BUILT = sorted(set(FAMILY_FIRST.values()) | {"VGG16", "ResNet152V2", "InceptionV3"})


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n for n in BUILT])
def test_one_backbone_per_family_builds_and_predicts_at_its_minimum_size(name):
    spec = models.get_spec(name)
    model = models.build_classifier(name, spec.min_size, 1, 2, None, augment=0.0)
    probs = model.predict(np.random.default_rng(0).integers(0, 255, (2, spec.min_size,
                                                                       spec.min_size, 1)),
                          verbose=0)
    assert probs.shape == (2, 2)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)


def test_every_other_backbone_is_its_built_familys_keras_function():
    assert len(BUILT) >= 16
    for name, spec in models.REGISTRY.items():
        built = models.get_spec(FAMILY_FIRST[spec.module])
        constructor = models.backbone_constructor(spec)
        assert callable(constructor), name
        if not spec.scratch_only:
            assert constructor.__module__.rsplit(".", 1)[-1] == spec.module, name
        assert (spec.min_size, spec.preprocess) == (built.min_size, built.preprocess), name


def test_saved_model_takes_raw_pixels_and_loads_in_safe_mode(tmp_path):
    model = models.build_classifier("VGG16", 28, 3, 3, None, augment=1.0)
    assert model.input_shape == (None, 28, 28, 3)
    assert any(isinstance(layer, models.ReverseChannels) for layer in model.layers)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = models.load_model(path)
    x = np.random.default_rng(1).integers(0, 255, (3, 28, 28, 3)).astype("float32")
    # Augmentation is inactive at inference, so both give identical outputs.
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    # safe_mode: a file carrying Python code (a Lambda layer) is refused, not run.
    inputs = keras.Input((4,))
    unsafe = keras.Model(inputs, keras.layers.Lambda(lambda t: t * 2)(inputs))
    unsafe.save(tmp_path / "unsafe.keras")
    with pytest.raises(ValueError, match="Lambda"):
        models.load_model(tmp_path / "unsafe.keras")


def test_weights_file_is_loaded_into_the_backbone(tmp_path):
    source = keras.applications.VGG16(weights=None, include_top=False, input_shape=(32, 32, 3))
    path = tmp_path / "vgg16_notop.weights.h5"
    source.save_weights(path)
    model = models.build_classifier("VGG16", 32, 1, 2, models.resolve_weights(str(path)))
    for mine, theirs in zip(models.backbone_of(model).get_weights(), source.get_weights(),
                            strict=True):
        np.testing.assert_array_equal(mine, theirs)


def test_weights_that_do_not_fit_or_do_not_exist_fail_clearly(tmp_path):
    other = keras.applications.MobileNetV2(weights=None, include_top=False,
                                           input_shape=(32, 32, 3))
    path = tmp_path / "mobilenet.weights.h5"
    other.save_weights(path)
    with pytest.raises(models.ModelError, match="does not fit VGG16"):
        models.build_classifier("VGG16", 32, 1, 2, str(path))
    with pytest.raises(models.ModelError, match="does not exist"):
        models.resolve_weights(str(tmp_path / "nope.h5"))


def test_imagenet_offline_fails_fast_with_advice(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # empty cache: a download is needed

    timeouts = []

    def offline(*args, **kwargs):
        # Keras' download passes no timeout: the bound is the socket default set around it.
        timeouts.append(socket.getdefaulttimeout())
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", offline)
    before = socket.getdefaulttimeout()
    with pytest.raises(models.ModelError, match="--weights none"):
        models.build_classifier("VGG16", 32, 1, 2, "imagenet")
    assert timeouts and set(timeouts) == {models.IMAGENET_TIMEOUT_S}
    assert socket.getdefaulttimeout() == before  # restored for everything else


def test_fine_tune_unfreezes_the_top_share_but_never_batchnorm():
    model = models.build_classifier("ResNet50V2", 32, 1, 2, None)
    backbone = models.backbone_of(model)
    models.set_trainable(model, 0.0)
    assert not backbone.trainable
    models.set_trainable(model, 0.25)
    flags = [layer.trainable for layer in backbone.layers]
    cut = flags.index(True)
    assert abs(cut / len(flags) - 0.75) < 0.05
    assert not any(layer.trainable for layer in backbone.layers
                   if isinstance(layer, keras.layers.BatchNormalization))
    assert not any(flags[:cut])


def test_randaugment_and_augmix_change_training_images_only_and_survive_saving(tmp_path):
    model = models.build_classifier("SmallCNN", 32, 1, 2, None, augment=0.0, seed=3,
                                    randaugment=0.5, augmix=0.5)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = models.load_model(path)  # Keras' own layers: safe_mode loads them
    x = np.random.default_rng(2).integers(0, 255, (4, 32, 32, 1)).astype("float32")
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)
    for name in ("aug_randaugment", "aug_augmix"):
        augmented = keras.Model(loaded.input, loaded.get_layer(name).output)
        np.testing.assert_array_equal(augmented.predict(x, verbose=0), x)  # inference: none
        trained = np.asarray(augmented(x, training=True))
        assert trained.shape == x.shape and np.abs(trained - x).mean() > 1.0
        assert trained.min() >= 0.0 and trained.max() <= 255.0
    # Off by default: a plain classifier has neither layer.
    plain = models.build_classifier("SmallCNN", 32, 1, 2, None, augment=0.0)
    assert not {"aug_randaugment", "aug_augmix"} & {layer.name for layer in plain.layers}
