"""Prevalence maths on synthetic data whose true prevalence and posteriors are known."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import prevalence
from lungxray.errors import ConfigError, DataError


def scores(n: int, prior: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels at ``prior`` and a classifier's raw scores: feature x ~ N(+-1, 1) gives the true
    posterior at prior 0.5 sigmoid(2x); the raw score distorts it to sigmoid(3*2x + 1), which
    Platt scaling must undo."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prior).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    return y, 1.0 / (1.0 + np.exp(-(6.0 * x + 1.0)))


@pytest.fixture(scope="module")
def calibration() -> prevalence.Calibration:
    y, s = scores(4000, 0.5, seed=0)
    return prevalence.fit_calibration(y, s)


def test_platt_recovers_the_true_posterior(calibration):
    # logit(true posterior) = 2x and logit(score) = 6x + 1, so slope 1/3, intercept -1/3.
    assert calibration.slope == pytest.approx(1 / 3, abs=0.03)
    assert calibration.intercept == pytest.approx(-1 / 3, abs=0.1)
    assert calibration.prior == pytest.approx(0.5, abs=0.03)


@pytest.mark.parametrize("true_prior", [0.2, 0.8])
def test_em_recovers_a_shifted_prevalence_without_labels(calibration, true_prior):
    y, s = scores(3000, true_prior, seed=1)
    found = prevalence.estimate_prevalence(calibration, s, y, n_bootstrap=100, seed=0)
    assert found["estimate"] == pytest.approx(true_prior, abs=0.03)
    lo, hi = found["ci"]
    assert lo < found["true_prevalence"] < hi and hi - lo < 0.08
    # The naive mean posterior is pulled towards the calibration prior; EM is not.
    assert abs(found["naive_mean_posterior"] - true_prior) > abs(found["estimate"] - true_prior)


def test_bayes_threshold_moves_with_prevalence_and_gives_the_posterior_half(calibration):
    low, mid, high = (prevalence.bayes_threshold(calibration, p) for p in (0.05, 0.5, 0.9))
    assert low > mid > high  # rarer disease: more evidence needed to call it
    for p, thr in ((0.05, low), (0.9, high)):
        assert calibration.posterior(np.array([thr]), p)[0] == pytest.approx(0.5, abs=1e-6)


def test_operating_point_reports_ppv_npv_at_the_deployment_prevalence(calibration):
    y, s = scores(3000, 0.5, seed=2)
    point = prevalence.operating_point(calibration, y, s, 0.1, model_threshold=0.5)
    ppv, npv = prevalence.predictive_values(point["sensitivity"], point["specificity"], 0.1)
    assert point["ppv"] == ppv and point["npv"] == npv
    # At 10% prevalence the Bayes rule trades sensitivity for a higher PPV than a 0.5 cut-off.
    assert point["ppv"] > point["at_model_threshold"]["ppv"]
    assert point["sensitivity"] < point["at_model_threshold"]["sensitivity"]
    # Equal-cost Bayes rule: fewer errors at 10% prevalence than the model's own cut-off.
    def errors(p: dict) -> float:
        return 0.1 * (1 - p["sensitivity"]) + 0.9 * (1 - p["specificity"])
    assert errors(point) < errors(point["at_model_threshold"])


def test_bad_inputs_are_one_line_errors():
    with pytest.raises(ConfigError, match="strictly between 0 and 1"):
        prevalence.check_prevalence(1.0)
    with pytest.raises(DataError, match="both classes"):
        prevalence.fit_calibration(np.ones(10), np.linspace(0, 1, 10))
    with pytest.raises(DataError, match="do not increase"):
        prevalence.fit_calibration(np.r_[np.zeros(50), np.ones(50)],
                                   np.r_[np.linspace(0.6, 0.9, 50), np.linspace(0.1, 0.4, 50)])


def test_a_target_report_estimates_the_prevalence_and_adapts_the_threshold(calibration):
    y, s = scores(3000, 0.2, seed=5)  # a target site at 20% prevalence; labels never passed
    report = prevalence.target_report(calibration, s, threshold=0.5, seed=1)
    assert report["estimate"] == pytest.approx(0.2, abs=0.03)
    assert report["ci"][0] <= report["estimate"] <= report["ci"][1]
    assert report["n"] == 3000 and "true_prevalence" not in report
    assert report["bayes_threshold_at_estimate"] == pytest.approx(
        prevalence.bayes_threshold(calibration, report["estimate"]))
    # At a lower prevalence than validation's 0.5 the adapted threshold is stricter.
    assert report["bayes_threshold_at_estimate"] > prevalence.bayes_threshold(calibration, 0.5)
    assert report["positive_share_at_bayes_threshold"] == pytest.approx(
        np.mean(s >= report["bayes_threshold_at_estimate"]))
    assert report["positive_share_at_model_threshold"] == pytest.approx(np.mean(s >= 0.5))


def test_a_saved_calibration_is_checked(calibration):
    saved = calibration.as_dict()
    assert prevalence.calibration_from(saved, "info") == calibration
    for bad, match in (([1, 2], "must be an object"),
                       ({**saved, "slope": float("nan")}, "finite numbers"),
                       ({**saved, "prior": True}, "finite numbers"),
                       ({**saved, "slope": -1.0}, "slope > 0"),
                       ({**saved, "prior": 1.0}, "0 < prior < 1")):
        with pytest.raises(DataError, match=match):
            prevalence.calibration_from(bad, "model_info.json")


def test_scores_that_cannot_be_calibrated_give_no_prevalence_evidence_not_a_failure(caplog):
    labels = np.array([0, 0, 0, 1, 1, 1])
    falling = np.array([0.9, 0.8, 0.7, 0.3, 0.2, 0.1])  # a badly trained model's val scores
    with caplog.at_level("WARNING", logger="lungxray.prevalence"):
        assert prevalence.calibration_or_none(labels, falling, "split 'val'") is None
    assert "no prevalence evidence" in caplog.text and "split 'val'" in caplog.text
    assert prevalence.calibration_or_none(labels, falling[::-1], "split 'val'") is not None
