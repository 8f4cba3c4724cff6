"""Robustness, test-time augmentation and prevalence evidence of a real (tiny) trained model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from lungxray import evaluate, evaluation_report, prevalence, robustness
from lungxray.errors import ConfigError


@pytest.fixture(scope="module")
def evaluated(trained_model, small_dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("robust-eval")
    options = evaluate.EvalOptions(robustness=True, robustness_samples=60, tta=True,
                                   deployment_prevalence=0.1)
    return out, evaluate.evaluate(trained_model, str(small_dataset), out, ["val", "test"],
                                  explain=False, options=options)


def test_corrupted_auc_is_measured_on_the_same_images_as_the_clean_one(evaluated):
    out, results = evaluated
    for split in ("val", "test"):
        rob = results[split]["robustness"]
        table = pd.read_csv(out / split / evaluate.ROBUSTNESS_FILE)
        preds = pd.read_csv(out / split / evaluate.PREDICTIONS_FILE)
        clean = table[table["corruption"] == robustness.CLEAN]
        assert rob["n"] == len(clean) == 60
        # The clean rows are the split's own predictions of those images, not a new set.
        np.testing.assert_allclose(clean["prob_pneumonia"].to_numpy(),
                                   preds["prob_pneumonia"].to_numpy()[clean["row"]], atol=1e-5)
        assert rob["clean_auc"] == pytest.approx(
            roc_auc_score(clean["y_true"], clean["prob_pneumonia"]))
        assert set(rob["auc"]) == set(robustness.CORRUPTIONS)
        assert results[split]["robust_auc"] == rob["mean_corrupted_auc"]
        assert results[split]["robust_auc_drop"] == pytest.approx(
            rob["clean_auc"] - rob["mean_corrupted_auc"])
        assert (out / split / "robustness.png").stat().st_size > 1000
    scalars = evaluation_report.scalar_metrics(results)
    assert {"val_robust_auc", "val_worst_corrupted_auc", "test_robust_auc_drop",
            "val_tta_roc_auc", "test_deploy_ppv", "test_prevalence_em",
            "test_prevalence_em_ci_lo"} <= set(scalars)
    assert "Robustness to acquisition shift" in (out / evaluate.REPORT_FILE).read_text()


def test_tta_is_recorded_beside_the_plain_auc(evaluated):
    _, results = evaluated
    tta = results["test"]["tta"]
    assert tta["views"] == list(robustness.TTA_VIEWS)
    assert tta["roc_auc_plain"] == results["test"]["roc_auc"]  # headline stays plain
    assert 0 < tta["roc_auc"] <= 1 and tta["roc_auc"] != tta["roc_auc_plain"]


def test_operating_point_and_prevalence_come_from_validation(evaluated):
    out, results = evaluated
    val = pd.read_csv(out / "val" / evaluate.PREDICTIONS_FILE)
    calibration = prevalence.fit_calibration(val["y_true"], val["prob_pneumonia"])
    point = results["test"]["operating_point"]
    assert point["threshold"] == pytest.approx(prevalence.bayes_threshold(calibration, 0.1))
    assert point["threshold"] == results["val"]["operating_point"]["threshold"]
    test = pd.read_csv(out / "test" / evaluate.PREDICTIONS_FILE)
    called = test["prob_pneumonia"] >= point["threshold"]
    assert point["sensitivity"] == pytest.approx(called[test["y_true"] == 1].mean())
    ppv, _ = prevalence.predictive_values(point["sensitivity"], point["specificity"], 0.1)
    assert point["ppv"] == pytest.approx(ppv)
    est = results["test"]["prevalence_estimate"]
    assert est["true_prevalence"] == pytest.approx(test["y_true"].mean())
    assert est["ci"][0] <= est["estimate"] <= est["ci"][1]
    assert "prevalence_estimate" not in results["val"]  # val calibrates; nothing to estimate


def test_external_set_is_calibrated_on_the_earlier_val_and_can_be_switched_off(
        evaluated, trained_model, small_dataset, tmp_path):
    out, results = evaluated
    ext = evaluate.evaluate_external(trained_model, str(small_dataset), out,
                                     options=evaluate.EvalOptions(robustness=False))
    m = ext["external"]
    assert m["robustness"] is None and "robust_auc" not in m
    assert not (out / "external" / evaluate.ROBUSTNESS_FILE).exists()
    # Calibrated on out/val (written above), so it is the same calibration as test's.
    assert m["calibration"] == results["test"]["calibration"]
    assert m["prevalence_estimate"]["estimate"] == pytest.approx(
        results["test"]["prevalence_estimate"]["estimate"])


def test_bad_options_are_refused_before_any_output(trained_model, small_dataset, tmp_path):
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        evaluate.evaluate(trained_model, str(small_dataset), tmp_path / "a", ["test"],
                          options=evaluate.EvalOptions(deployment_prevalence=1.5))
    with pytest.raises(ConfigError, match="needs validation predictions"):
        evaluate.evaluate(trained_model, str(small_dataset), tmp_path / "b", ["test"],
                          options=evaluate.EvalOptions(deployment_prevalence=0.2,
                                                       robustness=False))
    with pytest.raises(ConfigError, match="robustness-samples"):
        evaluate.evaluate(trained_model, str(small_dataset), tmp_path / "c", ["test"],
                          options=evaluate.EvalOptions(robustness_samples=-1))
    assert not any((tmp_path / d).exists() for d in "abc")
