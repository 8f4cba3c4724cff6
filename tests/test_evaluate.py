"""Evaluation of a really trained model: prepared data, raw sources, external folders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from lungxray import data, evaluate, train


def test_val_and_test_metrics_at_the_models_own_threshold(trained_model, small_dataset, tmp_path):
    results = evaluate.evaluate(trained_model, str(small_dataset), tmp_path, ["val", "test"])
    info = train.read_model_info(trained_model)
    for split in ("val", "test"):
        metrics = json.loads((tmp_path / split / evaluate.METRICS_FILE).read_text())
        assert metrics == results[split]
        for key in ("accuracy", "roc_auc", "precision", "sensitivity", "specificity", "f1",
                    "threshold", "confusion_matrix", "n"):
            assert key in metrics
        assert metrics["threshold"] == info["threshold"]  # never re-fitted on this split
        assert metrics["n"] == data.read_manifest(small_dataset)["splits"][split]["n"]
        assert np.sum(metrics["confusion_matrix"]) == metrics["n"]
        predictions = pd.read_csv(tmp_path / split / evaluate.PREDICTIONS_FILE)
        assert metrics["roc_auc"] == pytest.approx(
            roc_auc_score(predictions["y_true"], predictions["prob_pneumonia"]))
        for png in ("confusion_matrix.png", "roc.png"):
            assert (tmp_path / split / png).stat().st_size > 1000
        roc = json.loads((tmp_path / split / evaluate.ROC_FILE).read_text())
        assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
        assert all(0.0 <= t <= 1.0 for t in roc["thresholds"])
    scalars = evaluate.scalar_metrics(results)
    assert {"val_roc_auc", "test_roc_auc", "test_accuracy", "val_threshold"} <= set(scalars)
    assert "| test |" in evaluate.describe(results)


def test_raw_npz_is_prepared_with_the_models_settings(trained_model, shared_npz, tmp_path):
    results = evaluate.evaluate(trained_model, str(shared_npz), tmp_path, ["val"])
    assert results["val"]["n"] == 524  # the file's own val split, resized to the model's 32 px
    with pytest.raises(data.DataError, match=r"no split\(s\) \['test'\]"):
        evaluate.evaluate(trained_model, str(shared_npz), tmp_path / "t", ["test"])


def test_external_flat_folder_is_one_test_set(trained_model, shared_npz, tmp_path):
    val = data.load_npz(shared_npz).splits["val"]
    for i in range(30):
        folder = tmp_path / "external" / ["normal", "pneumonia"][i % 2]
        folder.mkdir(parents=True, exist_ok=True)
        index = np.flatnonzero(val.labels == i % 2)[i]
        Image.fromarray(val.images[index, ..., 0]).resize((100, 100)).save(folder / f"{i}.png")
    results = evaluate.evaluate(trained_model, str(tmp_path / "external"), tmp_path / "out")
    assert results["test"]["n"] == 30
    assert results["test"]["confusion_matrix"][0][0] + results["test"]["confusion_matrix"][0][
        1] == 15


def test_class_names_must_match_the_model(trained_model, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        Image.new("L", (32, 32)).save(tmp_path / "pets" / cls / "a.png")
    with pytest.raises(data.DataError, match="differ from the expected"):
        evaluate.evaluate(trained_model, str(tmp_path / "pets"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
