"""Prevalence-aware operating points and label-free prevalence estimation (binary models).

1. **Calibration on validation.** Platt scaling (a logistic regression on the logit of the
   model's score, scikit-learn) maps a score to P(positive | image) at the validation
   prevalence. Platt, not isotonic: validation holds a few hundred images, and isotonic
   regression returns posteriors of exactly 0 or 1 that no prior shift can move.
2. **Prior shift (Bayes' rule).** At a deployment prevalence ``pi`` the posterior odds are the
   validation-calibrated odds times ``[pi / (1 - pi)] / [pi_val / (1 - pi_val)]``.
3. **Operating point.** The Bayes-optimal rule for equal error costs: predict positive when
   the shifted posterior is at least 0.5. (Youden's J, the training default, does not depend on
   prevalence at all, so "the same criterion" would return the same threshold.) The rule is
   turned back into a threshold on the raw score, so it applies to ``predictions.csv`` as is.
   PPV and NPV at ``pi`` follow from the split's sensitivity and specificity by Bayes' rule.
4. **Prevalence of unlabelled data.** EM of Saerens, Latinne & Decaestecker (2002): alternate
   re-weighting the calibrated posteriors to a candidate prior and taking their mean as the new
   prior, to the fixed point; a percentile bootstrap over images gives the 95% interval.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression

from lungxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)
EPS = 1e-7  # scores are clipped to [EPS, 1 - EPS] before the logit
EM_TOL = 1e-6
EM_MAX_ITER = 1000
N_BOOTSTRAP = 200
CI = (2.5, 97.5)


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(np.asarray(p, dtype=float), EPS, 1 - EPS)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=float)))


def check_prevalence(value: float, what: str = "deployment prevalence") -> float:
    """A prevalence strictly between 0 and 1."""
    if not isinstance(value, int | float) or not math.isfinite(value) or not 0 < value < 1:
        raise ConfigError(f"{what} must be strictly between 0 and 1, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class Calibration:
    """Platt scaling fitted on validation: posterior = sigmoid(slope * logit(score) + intercept)
    at ``prior`` (the validation prevalence)."""

    slope: float
    intercept: float
    prior: float
    n: int
    method: str = "platt"

    def posterior(self, scores: np.ndarray, prevalence: float | None = None) -> np.ndarray:
        """Calibrated P(positive) for raw ``scores``, at ``prevalence`` (default: validation's)."""
        z = self.slope * _logit(scores) + self.intercept
        if prevalence is not None:
            z = z + prior_log_odds_shift(self.prior, prevalence)
        return _sigmoid(z)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibration_from(saved: Any, where: str) -> Calibration:
    """The :class:`Calibration` saved as a dict (model_info.json's ``calibration``), checked:
    finite numbers, a positive slope and a prior strictly between 0 and 1."""
    fields = ("slope", "intercept", "prior", "n")
    if not isinstance(saved, dict) or any(k not in saved for k in fields):
        raise DataError(f"{where}: calibration must be an object with {', '.join(fields)}")
    values = [saved[k] for k in fields]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
               for v in values):
        raise DataError(f"{where}: calibration values must be finite numbers")
    slope, intercept, prior, n = values
    if slope <= 0 or not 0 < prior < 1 or n < 2:
        raise DataError(f"{where}: calibration needs slope > 0, 0 < prior < 1 and n >= 2, got "
                        f"slope {slope:.4g}, prior {prior:.4g}, n {n}")
    return Calibration(float(slope), float(intercept), float(prior), int(n))


def prior_log_odds_shift(from_prior: float, to_prior: float) -> float:
    """What Bayes' rule adds to the log posterior odds when the prior moves."""
    return float(_logit(np.array(to_prior)) - _logit(np.array(from_prior)))


def fit_calibration(y_true: np.ndarray, scores: np.ndarray, where: str = "validation"
                    ) -> Calibration:
    """Platt scaling of the positive-class ``scores`` on labelled ``where`` data."""
    y = np.asarray(y_true).astype(int)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise DataError(f"{where}: {y.shape} labels for {s.shape} scores")
    if np.unique(y).size != 2:
        raise DataError(f"{where}: calibration needs both classes; got labels {np.unique(y)}")
    # A very weak L2 penalty: near-separable validation scores would send an unpenalised
    # slope to infinity; C=1e4 keeps it finite without biasing ordinary fits.
    model = LogisticRegression(C=1e4, max_iter=1000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.fit(_logit(s)[:, None], y)
    slope, intercept = float(model.coef_[0, 0]), float(model.intercept_[0])
    if slope <= 0:
        raise DataError(f"{where}: the model's scores do not increase with the positive class "
                        f"(Platt slope {slope:.3g}); no prevalence-aware threshold exists")
    return Calibration(slope, intercept, float(y.mean()), int(y.size))


def calibration_or_none(y_true: np.ndarray, scores: np.ndarray, where: str
                        ) -> Calibration | None:
    """:func:`fit_calibration`, or None with a warning when the scores cannot be calibrated
    (one class only, or scores that fall with the positive class): a poor model still gets its
    other metrics and can be saved, only without prevalence evidence."""
    try:
        return fit_calibration(y_true, scores, where)
    except DataError as exc:
        log.warning("no prevalence evidence: %s", exc)
        return None


def bayes_threshold(calibration: Calibration, prevalence: float) -> float:
    """The raw-score threshold at which the calibrated posterior at ``prevalence`` is 0.5."""
    check_prevalence(prevalence)
    z = -(calibration.intercept + prior_log_odds_shift(calibration.prior, prevalence))
    return float(_sigmoid(z / calibration.slope))


def predictive_values(sensitivity: float, specificity: float, prevalence: float
                      ) -> tuple[float | None, float | None]:
    """(PPV, NPV) at ``prevalence`` for a test of the given sensitivity and specificity."""
    tp, fp = sensitivity * prevalence, (1 - specificity) * (1 - prevalence)
    tn, fn = specificity * (1 - prevalence), (1 - sensitivity) * prevalence
    ppv = tp / (tp + fp) if tp + fp > 0 else None
    npv = tn / (tn + fn) if tn + fn > 0 else None
    return ppv, npv


def _rates(y: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float | None, ...]:
    pred = scores >= threshold
    pos, neg = y == 1, y == 0
    sens = float(pred[pos].mean()) if pos.any() else None
    spec = float((~pred[neg]).mean()) if neg.any() else None
    return sens, spec


def operating_point(calibration: Calibration, y_true: np.ndarray, scores: np.ndarray,
                    prevalence: float, model_threshold: float | None = None) -> dict[str, Any]:
    """The Bayes operating point at ``prevalence`` on one labelled split: its raw-score
    threshold, the split's sensitivity and specificity there, and PPV/NPV at ``prevalence``;
    the same at the model's own threshold for comparison."""
    y, s = np.asarray(y_true).astype(int), np.asarray(scores, dtype=float)
    threshold = bayes_threshold(calibration, prevalence)

    def at(thr: float) -> dict[str, Any]:
        sens, spec = _rates(y, s, thr)
        ppv, npv = (predictive_values(sens, spec, prevalence) if sens is not None
                    and spec is not None else (None, None))
        return {"threshold": thr, "sensitivity": sens, "specificity": spec, "ppv": ppv,
                "npv": npv}

    result = {"deployment_prevalence": prevalence, "validation_prevalence": calibration.prior,
              "rule": "calibrated posterior at the deployment prevalence >= 0.5 "
                      "(Bayes-optimal for equal error costs)",
              "calibration": calibration.as_dict(), **at(threshold)}
    if model_threshold is not None:
        result["at_model_threshold"] = at(float(model_threshold))
    return result


# --------------------------------------------------------------------------- EM (Saerens 2002)


def em_prevalence(posteriors: np.ndarray, train_prior: float, tol: float = EM_TOL,
                  max_iter: int = EM_MAX_ITER) -> tuple[float, int]:
    """(estimated prevalence, iterations) of unlabelled data from posteriors calibrated at
    ``train_prior``. Each step re-weights the posteriors to the current prior estimate (Bayes'
    rule) and takes their mean as the next estimate."""
    p = np.clip(np.asarray(posteriors, dtype=float), EPS, 1 - EPS)
    if p.ndim != 1 or p.size == 0:
        raise DataError(f"EM needs a non-empty vector of posteriors, got shape {p.shape}")
    check_prevalence(train_prior, "the calibration prior")
    ratio_pos, prior = 1.0 / train_prior, float(train_prior)
    for iteration in range(1, max_iter + 1):
        pos = prior * ratio_pos * p
        neg = (1 - prior) / (1 - train_prior) * (1 - p)
        new = float(np.mean(pos / (pos + neg)))
        if abs(new - prior) < tol:
            return new, iteration
        prior = new
    return prior, max_iter


def estimate_prevalence(calibration: Calibration, scores: np.ndarray,
                        y_true: np.ndarray | None = None, n_bootstrap: int = N_BOOTSTRAP,
                        seed: int = 0) -> dict[str, Any]:
    """EM estimate of a split's prevalence from its raw scores only, with a percentile
    bootstrap 95% interval; the true prevalence next to it when labels are given (they are
    never used by the estimate)."""
    posteriors = calibration.posterior(scores)
    estimate, iterations = em_prevalence(posteriors, calibration.prior)
    rng = np.random.default_rng(seed)
    n = len(posteriors)
    boot = [em_prevalence(posteriors[rng.integers(0, n, n)], calibration.prior)[0]
            for _ in range(n_bootstrap)]
    lo, hi = (np.percentile(boot, CI).tolist() if n_bootstrap else (None, None))
    return {"method": "EM (Saerens, Latinne & Decaestecker 2002) on validation-calibrated "
                      "posteriors; labels not used",
            "estimate": estimate, "ci": [lo, hi] if n_bootstrap else None,
            "n_bootstrap": int(n_bootstrap), "iterations": iterations,
            "naive_mean_posterior": float(np.mean(posteriors)),
            "validation_prevalence": calibration.prior,
            "true_prevalence": None if y_true is None else float(np.mean(np.asarray(y_true)))}


def target_report(calibration: Calibration, scores: np.ndarray, threshold: float | None,
                  seed: int = 0) -> dict[str, Any]:
    """What an unlabelled target set says about its prevalence: the EM estimate with its 95%
    interval, the share of images called positive at the model's threshold, and the Bayes
    threshold (with its positive share) the model would use at the estimated prevalence."""
    s = np.asarray(scores, dtype=float)
    result = estimate_prevalence(calibration, s, seed=seed)
    del result["true_prevalence"]
    estimate = min(max(result["estimate"], EPS), 1 - EPS)
    adapted = bayes_threshold(calibration, estimate)
    result.update({
        "n": int(s.size),
        "model_threshold": threshold,
        "positive_share_at_model_threshold": (None if threshold is None
                                              else float(np.mean(s >= threshold))),
        "bayes_threshold_at_estimate": adapted,
        "positive_share_at_bayes_threshold": float(np.mean(s >= adapted)),
    })
    return result
