"""The evaluate component: external data with a class map as one more split, the same metric
names for every trial, the test split's Kubeflow classification metrics, one report."""

from __future__ import annotations

import json
from pathlib import Path


def test_external_data_is_one_more_split_with_the_same_names(evaluated_trials):
    names = [set(out["metrics"].metadata) for _, out in evaluated_trials]
    assert names[0] == names[1]  # every trial logs the same metric names
    assert {"val_roc_auc", "val_accuracy", "test_roc_auc", "test_accuracy", "external_roc_auc",
            "external_sensitivity", "test_latency_ms", "test_roc_auc_ci_lo", "val_robust_auc",
            "external_robust_auc_drop", "external_deploy_ppv", "external_prevalence_em",
            "external_prevalence_em_ci_hi"} <= names[0]
    out = evaluated_trials[0][1]
    evaluation = Path(out["evaluation"].path)
    assert out["evaluation"].metadata == {"model_name": "NetA",
                                          "splits": ["val", "test", "external"]}
    ext = json.loads((evaluation / "external" / "metrics.json").read_text())
    assert ext["n"] == 20 and ext["class_map"] == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    assert out["metrics"].metadata["external_roc_auc"] == ext["roc_auc"]
    page = Path(out["report"].path).read_text()
    assert page == (evaluation / "report.html").read_text()  # one report, every split
    # val, test, external: confusion, ROC, PR, reliability, robustness, Grad-CAM each
    assert page.count("data:image/png;base64,") == 3 * 6
    # The external set's prevalence, estimated without its labels, sits beside the truth.
    assert ext["prevalence_estimate"]["true_prevalence"] == 0.5
    assert ext["robustness"]["n"] == 20 and ext["operating_point"]["deployment_prevalence"] == 0.2
    # Calibrated on the val predictions this step wrote, as the test split is.
    test = json.loads((evaluation / "test" / "metrics.json").read_text())
    assert ext["calibration"] == test["calibration"]
    assert "| PR AUC (AP) |" in Path(out["summary"].path).read_text()


def test_the_test_split_is_the_kubeflow_classification_metrics(evaluated_trials):
    out = evaluated_trials[0][1]
    expected = json.loads((Path(out["evaluation"].path) / "test" / "metrics.json").read_text())
    assert out["metrics"].metadata["test_roc_auc"] == expected["roc_auc"]
    classification = out["test_classification"]
    matrix = classification.metadata["confusionMatrix"]
    assert [row["row"] for row in matrix["rows"]] == expected["confusion_matrix"]
    assert len(classification.metadata["confidenceMetrics"]) > 2
