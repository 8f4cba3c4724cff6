"""The model card says only what the trial's files support."""

from __future__ import annotations

import dataclasses

import pandas as pd

from lungxray.artifacts import EvalSplit, Trial
from lungxray.modelcard import model_card

SUMMARY = {"select_metric": "val_roc_auc", "n_models": 3, "select_value": 0.99}


def trial(splits: list[str], **info) -> Trial:
    metrics = {"n": 4, "roc_auc": 0.9, "accuracy": 0.75, "latency_ms": 1.0}
    predictions = pd.DataFrame({"y_true": [0, 1, 1, 1]})
    model_info = {"model_name": "VGG16", "class_names": ["normal", "pneumonia"],
                  "threshold": 0.4, "threshold_method": "youden", "weights": "none",
                  "epochs": 9, "hparams": {"dense_units": 0, "augment": 0.0},
                  "image_size": 32, "channels": 1, **info}
    return Trial(model_info, {s: EvalSplit(s, metrics, predictions) for s in splits})


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


def test_robustness_and_prevalence_sections_follow_the_metrics():
    assert "Not measured" in model_card(trial(["val", "test"]), SUMMARY)
    best = trial(["val", "test"])
    rob = {"n": 4, "severities": [1, 2, 3], "clean_auc": 0.9, "mean_corrupted_auc": 0.8,
           "drop": 0.1, "worst_corrupted_auc": 0.6, "worst_corruption": "contrast@3",
           "auc": {"contrast": {"1": 0.85, "2": 0.7, "3": 0.6}, "invert": {"1": 0.1}}}
    point = {"deployment_prevalence": 0.05, "validation_prevalence": 0.74, "threshold": 0.93,
             "sensitivity": 0.8, "specificity": 0.95, "ppv": 0.457, "npv": 0.989,
             "at_model_threshold": {"ppv": 0.2, "npv": 0.99}}
    estimate = {"estimate": 0.31, "ci": [0.25, 0.37], "true_prevalence": 0.3,
                "validation_prevalence": 0.74}
    best.splits = {s: dataclasses.replace(v, metrics={**v.metrics, "robustness": rob,
                                                      "operating_point": point,
                                                      **({"prevalence_estimate": estimate}
                                                         if s == "test" else {})})
                   for s, v in best.splits.items()}
    card = model_card(best, SUMMARY)
    assert "| val | 4 | 0.9000 | 0.8000 | 0.1000 | 0.6000 (contrast@3) |" in card
    assert "| contrast | 0.8500 | 0.7000 | 0.6000 |" in card
    assert "| invert | 0.1000 | — | — |" in card
    assert "deployment prevalence of 0.050" in card and "score threshold 0.9300" in card
    assert "| test | 0.8000 | 0.9500 | 0.4570 | 0.9890 | 0.2000 / 0.9900 |" in card
    assert "| test | 0.3100 | 0.2500 – 0.3700 | 0.3000 | 0.7400 |" in card
