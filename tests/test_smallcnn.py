"""SmallCNN, the from-scratch baseline, everywhere a Keras Applications name works; and the
intensity levers (intensity augmentation, per-image standardisation, weight EMA)."""

from __future__ import annotations

import json
import socket

import keras
import numpy as np
import pytest

from lungxray import artifacts, gradcam, models, spaces, train, tune
from lungxray.backbones import REGISTRY
from lungxray.cli import main
from lungxray.hparams import merge_hparams, read_best_hparams


def _no_network(monkeypatch) -> None:
    """Any download attempt fails the test instead of reaching out."""
    def refuse(*args, **kwargs):
        raise AssertionError("SmallCNN tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_smallcnn_is_registered_small_and_explainable(monkeypatch):
    _no_network(monkeypatch)
    spec = REGISTRY["SmallCNN"]
    assert spec.scratch_only and spec.weights_for("imagenet") == "none"
    assert REGISTRY["VGG16"].weights_for("imagenet") == "imagenet"
    # weights=imagenet is ignored (no download): the backbone is built from scratch.
    model = models.build_classifier("SmallCNN", 28, 1, 2, "imagenet", augment=0.0)
    assert 100_000 < model.count_params() < 1_000_000
    backbone = models.backbone_of(model)
    assert backbone.input_shape == (None, 28, 28, 1)  # the grey image, not three copies
    assert "grey_to_rgb" not in [layer.name for layer in model.layers]
    # Grad-CAM explains the last conv block's 7x7 map.
    assert gradcam.explained_layer(backbone).name == "block3_relu2"
    assert backbone.get_layer("block3_relu2").output.shape[1:3] == (7, 7)
    with pytest.raises(models.ModelError, match="no pretrained weights"):
        models.small_cnn(weights="imagenet")


def test_models_command_lists_smallcnn(capsys):
    assert main(["models"]) == 0
    assert any(line.startswith("SmallCNN ") for line in capsys.readouterr().out.splitlines())


def test_intensity_layers_act_in_training_only_and_survive_safe_loading(tmp_path):
    model = models.build_classifier("SmallCNN", 28, 1, 2, None, augment=0.0,
                                    intensity_augment=1.0, standardize=True, seed=0)
    names = {layer.name for layer in model.layers}
    assert {"aug_gamma", "aug_blur", "aug_noise", "standardize"} <= names
    x = np.random.default_rng(0).integers(20, 200, (4, 28, 28, 1)).astype("float32")
    np.testing.assert_allclose(model(x, training=False), model(x, training=False))
    changed = keras.Model(model.input, model.get_layer("aug_noise").output)
    assert not np.allclose(changed(x, training=True), x)
    np.testing.assert_allclose(changed(x, training=False), x)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = models.load_model(path)
    np.testing.assert_allclose(model.predict(x, verbose=0), loaded.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


def test_standardisation_removes_brightness_and_contrast():
    layer = models.PerImageStandardization()
    x = np.random.default_rng(1).uniform(50, 150, (2, 28, 28, 1)).astype("float32")
    y = np.asarray(layer(x))
    np.testing.assert_allclose(np.asarray(layer(x * 0.5 + 40)), y, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(y.mean(axis=(1, 2, 3)), 127.5, atol=1e-3)
    np.testing.assert_allclose(y.std(axis=(1, 2, 3)), 64.0, rtol=1e-3)
    blank = np.full((1, 28, 28, 1), 80.0, "float32")
    assert np.isfinite(np.asarray(layer(blank))).all()


def test_gamma_keeps_the_pixel_range_and_varies_per_image():
    layer = models.RandomGamma(0.5, seed=0)
    x = np.tile(np.linspace(0, 255, 28, dtype="float32")[None, :, None, None], (8, 1, 28, 1))
    y = np.asarray(layer(x, training=True))
    assert y.min() >= 0 and y.max() <= 255.5
    assert len({round(float(v), 3) for v in y[:, 14, 14, 0]}) > 1


def test_tune_then_train_smallcnn_with_imagenet_weights_runs_from_scratch(
        small_dataset, tmp_path, monkeypatch):
    _no_network(monkeypatch)
    best = tune.tune(small_dataset, "SmallCNN", tmp_path / "tune", max_trials=1, epochs=1,
                     weights="imagenet", seed=0)
    assert best["phases"].keys() == {"scratch"} and best["feature_cache"] is None
    assert {"intensity_augment", "standardize"} <= set(best["hparams"])
    # One trial is the default point: SmallCNN's own learning rate and no geometric
    # augmentation (hparams.MODEL_DEFAULTS).
    assert best["hparams"]["learning_rate"] == pytest.approx(1e-3)
    assert best["hparams"]["augment"] == 0.0
    assert merge_hparams({}, False, "SmallCNN")["learning_rate"] == 1e-3
    assert merge_hparams({}, False, "SmallCNN")["augment"] == 0.0
    assert merge_hparams({}, False, "VGG16")["learning_rate"] == 1e-4
    assert merge_hparams({}, False, "VGG16")["augment"] == 1.0
    info = train.train(small_dataset, "SmallCNN", tmp_path / "model", epochs=2,
                       weights="imagenet", seed=0,
                       hparams={**read_best_hparams(tmp_path / "tune" / tune.BEST_FILE),
                                "ema": True})
    assert info["weights"] == "none" and info["hparams"]["ema"] is True
    assert info["params"] < 1_000_000 and info["input_size"] == 32
    saved = json.loads((tmp_path / "model" / artifacts.INFO_FILE).read_text())
    assert saved["model_name"] == "SmallCNN"
    model = models.load_model(tmp_path / "model" / artifacts.MODEL_FILE)
    assert model.predict(np.zeros((1, 32, 32, 1), "float32"), verbose=0).shape == (1, 2)


def test_new_hyperparameters_are_checked():
    with pytest.raises(Exception, match="intensity_augment"):
        merge_hparams({"intensity_augment": -1.0})
    with pytest.raises(Exception, match="standardize"):
        merge_hparams({"standardize": "yes"})
    assert merge_hparams({"ema": True})["ema"] is True
    assert spaces.describe("scratch")[-1]["name"] == "standardize"
