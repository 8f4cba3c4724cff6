"""The model card says only what the trial's files support."""

from __future__ import annotations

import pandas as pd

from lungxray.modelcard import model_card

SUMMARY = {"select_metric": "val_roc_auc", "n_models": 3, "select_value": 0.99}


def trial(splits: list[str], **info) -> dict:
    metrics = {"n": 4, "roc_auc": 0.9, "accuracy": 0.75, "latency_ms": 1.0}
    predictions = pd.DataFrame({"y_true": [0, 1, 1, 1]})
    model_info = {"model_name": "VGG16", "class_names": ["normal", "pneumonia"],
                  "threshold": 0.4, "threshold_method": "youden", "weights": "none",
                  "epochs": 9, "hparams": {"dense_units": 0, "augment": 0.0},
                  "image_size": 32, "channels": 1, **info}
    return {"model_info": model_info,
            "splits": {s: {"metrics": metrics, "predictions": predictions} for s in splits}}


def test_validation_alone_is_never_called_held_out():
    card = model_card(trial(["val"]), SUMMARY)
    assert "`val` is the held-out estimate" not in card
    assert "No held-out split was evaluated" in card
    assert "`test` is the held-out estimate" in model_card(trial(["val", "test"]), SUMMARY)
    external = model_card(trial(["val", "shenzhen"]), SUMMARY)
    assert "`shenzhen` is the held-out estimate" in external


def test_architecture_follows_the_hyperparameters():
    plain = model_card(trial(["val", "test"]), SUMMARY)
    assert "global average pooling, dropout and a softmax" in plain
    assert "augmentation" not in plain
    head = model_card(trial(["val", "test"], hparams={"dense_units": 128, "augment": 1.0}),
                      SUMMARY)
    assert "global average pooling, a 128-unit ReLU dense layer, dropout" in head
    assert "random augmentation layers act during training only" in head
    assert "9 training epochs" in head


def test_an_ensemble_is_described_as_one():
    card = model_card(trial(["val", "test"], model_name="Ensemble-top2", epochs=None, hparams={},
                            weights=None, members=["VGG16", "InceptionV3"]), SUMMARY)
    assert "an ensemble averaging the class probabilities of VGG16, InceptionV3" in card
    assert "None" not in card and "initialised from" not in card
