"""Classification metrics, bootstrap confidence intervals and operating-threshold choice.

Every point estimate comes from scikit-learn, so that what the report shows is what a reviewer can
reproduce with a one-liner; this module only validates inputs, picks the right sklearn call and
turns the results into plain JSON-serialisable Python values.

Confidence intervals are stratified percentile bootstraps (each class resampled within itself, as
pROC's ``ci.auc`` does by default): the class mix of the split stays fixed, so AUC is defined in
every resample and PPV/NPV keep the split's prevalence. A binary resample's ranking metrics (ROC
AUC, average precision, Brier) are the same sklearn calls as the point estimate; its
threshold-dependent rates are read off the resample's four confusion counts
(:func:`binary_rates`, held equal to sklearn's by tests), which makes the CIs several times
faster: the bootstrap dominated evaluation and comparison time.

Expected calibration error is not in sklearn: it is the bin-size-weighted gap between the observed
frequencies and mean confidences that ``sklearn.calibration.calibration_curve`` returns.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import sklearn
from sklearn import metrics as skm
from sklearn.calibration import calibration_curve
from sklearn.exceptions import UndefinedMetricWarning
from sklearn.preprocessing import label_binarize

from lungxray import prevalence
from lungxray.artifacts import AT_HALF, CI_METRICS, THRESHOLD_RULES
from lungxray.errors import ConfigError, DataError

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5
DEFAULT_N_BOOTSTRAP = 200
DEFAULT_SEED = 0
CI_LEVEL = 0.95
ECE_BINS = 10
PROB_TOLERANCE = 1e-3
MIN_GROUP_SIZE = 10  # worst_group: smaller groups are too noisy to decide on, left out
# The metrics with a bootstrap CI (CI_METRICS) and those repeated at 0.5 (AT_HALF) are named,
# with their labels, in lungxray.artifacts.
# Headline metrics without an interval: the plug-in ECE is biased upwards and so is every
# resample of it, so a percentile interval can miss even the point estimate (a perfectly
# calibrated model's interval lies wholly above 0).
NO_CI = frozenset({"ece"})
PER_CLASS = ("precision", "recall", "specificity", "npv", "f1", "roc_auc", "pr_auc")


def _as_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Return y_true as a 1-D int array, checking every label is in [0, n_classes)."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise DataError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise DataError("y_true is empty")
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise DataError("y_true must hold integer class indices")
    y = y.astype(int)
    bad = sorted(set(np.unique(y).tolist()) - set(range(n_classes)))
    if bad:
        raise DataError(f"y_true holds labels {bad} outside 0..{n_classes - 1}")
    return y


def _float_or_none(value: float) -> float | None:
    """Plain float, or None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def check_target_sensitivity(target_sensitivity: float | None) -> None:
    """A target sensitivity lies in (0, 1]; None means Youden's J."""
    if target_sensitivity is not None and not 0.0 < float(target_sensitivity) <= 1.0:
        raise ConfigError(f"target_sensitivity must be in (0, 1], got {target_sensitivity}")


def check_threshold_rule(rule: str) -> str:
    """One of :data:`lungxray.artifacts.THRESHOLD_RULES`, else a one-line ConfigError."""
    if rule not in THRESHOLD_RULES:
        raise ConfigError(f"threshold rule {str(rule)[:40]!r} is not one of "
                          f"{', '.join(THRESHOLD_RULES)}")
    return rule


def choose_threshold(y_true: np.ndarray, scores: np.ndarray,
                     target_sensitivity: float | None = None, rule: str = "youden",
                     groups: np.ndarray | None = None) -> float:
    """Pick the decision threshold on (validation) scores.

    ``rule`` (:data:`lungxray.artifacts.THRESHOLD_RULES`): ``youden`` maximises Youden's J
    (TPR - FPR); ``balanced`` is 0.5 whatever the scores (the models train with class weights,
    so 0.5 is their balanced-prior operating point); ``platt`` fits Platt scaling on the scores
    (:func:`lungxray.prevalence.fit_calibration`) and returns the score where the calibrated
    P(positive) is 0.5; ``worst_group`` maximises the lowest balanced accuracy over ``groups``
    (the group of each row, :func:`lungxray.shift.val_groups`; see
    :func:`worst_group_accuracy`), ties broken by the higher pooled Youden's J, then the
    higher threshold. Without ``groups`` (or without a group of MIN_GROUP_SIZE rows) the rows
    are one group and ``worst_group`` is Youden's J (balanced accuracy = (J + 1) / 2); the
    other rules ignore ``groups``. ``target_sensitivity`` (e.g. 0.95), when given, wins over
    the rule: the highest threshold whose sensitivity reaches the target, i.e. the best
    specificity that still misses at most the allowed share of positives. ``scores`` are
    P(positive); a sample is positive when ``score >= threshold``, the convention
    ``roc_curve`` uses, so the value reproduces its point.
    """
    check_threshold_rule(rule)
    y = _as_labels(y_true, 2)
    s = np.asarray(scores, dtype=float)
    if s.shape != y.shape:
        raise DataError(f"scores shape {s.shape} does not match y_true shape {y.shape}")
    if not np.all(np.isfinite(s)):
        raise DataError("scores contain NaN or inf")
    check_target_sensitivity(target_sensitivity)
    if target_sensitivity is None and rule == "balanced":
        return DEFAULT_THRESHOLD
    if np.unique(y).size < 2:
        raise DataError(
            "choose_threshold needs both classes in y_true (only "
            f"class {int(y[0])} present): the ROC curve is undefined"
        )
    if target_sensitivity is None and rule == "platt":
        calibration = prevalence.fit_calibration(y, s)
        # At the validation prior the posterior is the calibrated one itself.
        return float(np.clip(prevalence.bayes_threshold(calibration, calibration.prior),
                             0.0, 1.0))
    # Keep every point: dropping collinear ones never removes the optimum, but keeping them makes
    # the tie-break (first = highest threshold = most conservative) independent of sklearn's
    # pruning heuristics.
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    if target_sensitivity is None and rule == "worst_group":
        candidates = np.clip(thresholds[1:], 0.0, 1.0)
        worst = _worst_group_curve(y, s, _as_groups(groups, y), candidates)
        tied = np.flatnonzero(worst >= worst.max() - 1e-12)
        # argmax takes the first of equal J: the highest threshold, as roc_curve descends.
        best = 1 + int(tied[np.argmax((tpr - fpr)[1:][tied])])
    elif target_sensitivity is None:
        # thresholds[0] (+inf, "nothing positive") is left out: clipped to 1.0 it would turn
        # into "positive where P == 1", which a float32 softmax reaches.
        best = 1 + int(np.argmax((tpr - fpr)[1:]))
    else:
        # tpr never decreases along the curve: the first point reaching the target has the highest
        # threshold. The tolerance absorbs float error in k/n (0.95 * 20 positives = 19).
        best = int(np.argmax(tpr >= float(target_sensitivity) - 1e-12))
    # thresholds[0] is +inf ("predict nothing positive"); a probability threshold lives in [0, 1].
    return float(np.clip(thresholds[best], 0.0, 1.0))


def operating_threshold(y_true: np.ndarray, scores: np.ndarray, rule: str,
                        target_sensitivity: float | None = None,
                        groups: np.ndarray | None = None) -> tuple[float, str]:
    """(threshold, threshold_method) of a model, as model_info.json records them: the
    method is ``sensitivity>=X`` when a target sensitivity wins, else the rule (``groups``:
    for ``worst_group``). Validation scores that do not rise with the positive class have no
    Platt fit: ``platt`` then falls back to Youden's J, with a warning, and says so in the
    method it returns."""
    if target_sensitivity is not None:
        return (choose_threshold(y_true, scores, target_sensitivity, rule),
                f"sensitivity>={target_sensitivity}")
    try:
        return choose_threshold(y_true, scores, rule=rule, groups=groups), rule
    except DataError as exc:
        if rule != "platt":
            raise
        log.warning("threshold rule platt: %s; Youden's J instead", exc)
        return choose_threshold(y_true, scores, rule="youden"), "youden"


def rule_thresholds(y_true: np.ndarray, scores: np.ndarray,
                    groups: np.ndarray | None = None) -> dict[str, float | None]:
    """Every threshold rule's threshold on the same (validation) scores (``groups``: their
    rows' groups, for ``worst_group``); None where a rule has none (Platt on scores that fall
    with the positive class)."""
    found: dict[str, float | None] = {}
    for rule in THRESHOLD_RULES:
        try:
            found[rule] = choose_threshold(y_true, scores, rule=rule, groups=groups)
        except DataError:
            found[rule] = None
    return found


def _as_groups(groups: np.ndarray | None, y: np.ndarray) -> np.ndarray:
    """The group of each row as strings; one group when ``groups`` is None."""
    if groups is None:
        return np.zeros(len(y), dtype=str)
    found = np.asarray(groups).astype(str)
    if found.shape != y.shape:
        raise DataError(f"groups shape {found.shape} does not match y_true shape {y.shape}")
    return found


def _worst_group_curve(y: np.ndarray, s: np.ndarray, groups: np.ndarray,
                       thresholds: np.ndarray) -> np.ndarray:
    """At each threshold, the lowest balanced accuracy (mean recall over the classes present:
    a one-class group counts that class's recall) of the groups of at least MIN_GROUP_SIZE
    rows; all rows as one group when no group is that large."""
    rows = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    kept = [r for r in rows if len(r) >= MIN_GROUP_SIZE] or [np.arange(len(y))]
    worst = np.full(len(thresholds), np.inf)
    for r in kept:
        recalls = []
        for c in np.unique(y[r]):
            ranked = np.sort(s[r][y[r] == c])
            called = (len(ranked) - np.searchsorted(ranked, thresholds, side="left")) / len(ranked)
            recalls.append(called if c == 1 else 1.0 - called)
        worst = np.minimum(worst, np.mean(recalls, axis=0))
    return worst


def worst_group_accuracy(y_true: np.ndarray, scores: np.ndarray, threshold: float,
                         groups: np.ndarray | None = None) -> float:
    """The lowest balanced accuracy of ``scores >= threshold`` over the groups of at least
    MIN_GROUP_SIZE rows (smaller ones are left out; none that large: all rows as one): what
    ``worst_group`` maximises."""
    y = _as_labels(y_true, 2)
    s = np.asarray(scores, dtype=float)
    return float(_worst_group_curve(y, s, _as_groups(groups, y), np.array([threshold]))[0])


RATES = ("accuracy", "balanced_accuracy", "sensitivity", "specificity")


def rates_at(y_true: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Accuracy, balanced accuracy, sensitivity and specificity of ``scores >= threshold``."""
    y = _as_labels(y_true, 2)
    pred = (np.asarray(scores, dtype=float) >= threshold).astype(int)
    with warnings.catch_warnings():  # one class present: sklearn warns, the values are defined
        warnings.simplefilter("ignore", UserWarning)
        counts = _binary_counts(y, pred)
    return {k: counts[k] for k in RATES}


def threshold_rules_block(thresholds: dict[str, float | None], split: str,
                          y_true: np.ndarray, scores: np.ndarray) -> dict[str, dict[str, Any]]:
    """Evidence for choosing a rule: ``{rule: {"threshold": t, split: rates_at(t)}}``, each
    ``t`` chosen on validation (:func:`rule_thresholds`), the rates on this split."""
    return {rule: {"threshold": t, split: None if t is None else rates_at(y_true, scores, t)}
            for rule, t in thresholds.items()}


def roc_auc(y_true: np.ndarray, probs: np.ndarray) -> float | None:
    """Exact ROC AUC, as evaluation reports it: the positive class's for two classes, the macro
    one-vs-rest mean for more. None when a class is missing from ``y_true`` (undefined)."""
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] < 2:
        raise DataError(f"probs must be (n, K>=2), got shape {p.shape}")
    y = _as_labels(y_true, p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise DataError(f"{y.shape[0]} labels for {p.shape[0]} rows of probabilities")
    if np.unique(y).size < p.shape[1]:
        return None
    if p.shape[1] == 2:
        return float(skm.roc_auc_score(y, p[:, 1]))
    return float(skm.roc_auc_score(label_binarize(y, classes=list(range(p.shape[1]))), p,
                                   average="macro"))


def _check_probs(probs: np.ndarray, class_names: list[str]) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2:
        raise DataError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if p.shape[1] != len(class_names):
        raise DataError(
            f"probs has {p.shape[1]} columns but {len(class_names)} class_names {class_names}"
        )
    if len(class_names) < 2:
        raise DataError("need at least two classes")
    if not np.all(np.isfinite(p)):
        raise DataError("probs contain NaN or inf")
    # Catch logits or one column of scores passed by mistake; float32 softmax rounding is fine.
    if p.size and (p.min() < -PROB_TOLERANCE or p.max() > 1 + PROB_TOLERANCE):
        raise DataError(f"probs must lie in [0, 1] (class probabilities), got values from "
                         f"{p.min():.4g} to {p.max():.4g}")
    sums = p.sum(axis=1)
    bad = np.flatnonzero(np.abs(sums - 1.0) > PROB_TOLERANCE)
    if bad.size:
        raise DataError(f"probs rows must sum to 1 (softmax outputs); row {int(bad[0])} sums to "
                         f"{sums[bad[0]]:.6g} ({bad.size} such rows)")
    return p


def _confidence(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, outcome) pairs that calibration is judged on: P(positive) vs being positive
    for two classes; the top-label probability vs being right for more (Guo et al. 2017)."""
    # float32 softmax can overshoot 1 by an ulp; calibration_curve refuses anything outside [0, 1].
    p = np.clip(p, 0.0, 1.0)
    if p.shape[1] == 2:
        return p[:, 1], (y == 1).astype(int)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(int)


def _bin_ids(confidence: np.ndarray, n_bins: int) -> np.ndarray:
    """Uniform bins exactly as ``calibration_curve(strategy="uniform")`` assigns them."""
    return np.searchsorted(np.linspace(0.0, 1.0, n_bins + 1)[1:-1], confidence)


def reliability(y_true: np.ndarray, probs: np.ndarray,
                n_bins: int = ECE_BINS) -> dict[str, list[float]]:
    """Non-empty bins of the reliability diagram: mean confidence, observed frequency, count."""
    p = np.asarray(probs, dtype=float)
    y = _as_labels(y_true, p.shape[1])
    confidence, outcome = _confidence(y, p)
    observed, predicted = calibration_curve(outcome, confidence, n_bins=n_bins, strategy="uniform")
    counts = np.bincount(_bin_ids(confidence, n_bins), minlength=n_bins)
    counts = counts[counts > 0]
    return {"confidence": predicted.tolist(), "observed": observed.tolist(),
            "count": counts.astype(int).tolist()}


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray,
                               n_bins: int = ECE_BINS) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) * |observed - mean confidence|.

    Binary: on P(positive) (the reliability diagram's axis); more classes: top-label confidence.
    """
    if n_bins < 1:
        raise ConfigError(f"n_bins must be >= 1, got {n_bins}")
    bins = reliability(y_true, probs, n_bins)
    counts = np.asarray(bins["count"], dtype=float)
    gaps = np.abs(np.asarray(bins["observed"]) - np.asarray(bins["confidence"]))
    return float(np.sum(counts / counts.sum() * gaps))


# --------------------------------------------------------------------------- bootstrap


def bootstrap_indices(y_true: np.ndarray, n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
                      seed: int = DEFAULT_SEED) -> Iterator[np.ndarray]:
    """Stratified bootstrap resamples as index arrays: each class drawn with replacement from
    itself, as many times as it has members."""
    y = np.asarray(y_true).astype(int)
    rng = np.random.default_rng(seed)
    classes = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(n_bootstrap):
        yield np.concatenate([rng.choice(members, members.size) for members in classes])


def _interval(values: list[float | None]) -> list[float] | None:
    finite = np.array([v for v in values if v is not None and math.isfinite(v)])
    if finite.size == 0:
        return None
    tail = (1.0 - CI_LEVEL) / 2 * 100
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return [float(lo), float(hi)]


def binary_rates(tn: int, fp: int, fn: int, tp: int) -> dict[str, float]:
    """sklearn's threshold-dependent binary metrics from the four confusion counts, with its
    conventions: a ratio with an empty denominator is 0 (``zero_division=0``), balanced
    accuracy averages the recalls of the classes present, MCC is 0 when undefined."""
    def ratio(num: float, den: float) -> float:
        return num / den if den else 0.0

    recalls = [hit / total for hit, total in ((tp, tp + fn), (tn, tn + fp)) if total]
    mcc_den = float(tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)
    return {"accuracy": ratio(tp + tn, tp + tn + fp + fn),
            "balanced_accuracy": float(np.mean(recalls)) if recalls else 0.0,
            "precision": ratio(tp, tp + fp), "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp), "npv": ratio(tn, tn + fn),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "mcc": (float(tp) * tn - float(fp) * fn) / math.sqrt(mcc_den) if mcc_den else 0.0}


def _bootstrap(y: np.ndarray, p: np.ndarray, class_names: list[str], threshold: float | None,
               n_bootstrap: int, seed: int) -> list[dict[str, Any]]:
    """The metrics with a CI on every resample (at the same threshold). The inputs were checked
    once for the point estimates, so sklearn's per-call validation is skipped; a binary
    resample's rates come from its confusion counts (:func:`binary_rates`)."""
    with sklearn.config_context(skip_parameter_validation=True, assume_finite=True):
        if p.shape[1] != 2:
            return [_point_metrics(y[idx], p[idx], class_names, threshold, at_half=False)[0]
                    for idx in bootstrap_indices(y, n_bootstrap, seed)]
        score = p[:, 1]
        # 2 * truth + call: 0 = TN, 1 = FP, 2 = FN, 3 = TP.
        cell = 2 * y + (score >= (DEFAULT_THRESHOLD if threshold is None else threshold))
        reps = []
        for idx in bootstrap_indices(y, n_bootstrap, seed):
            ys, ss = y[idx], score[idx]
            both = ys.min() != ys.max()
            reps.append({**binary_rates(*np.bincount(cell[idx], minlength=4).tolist()),
                         "roc_auc": _float_or_none(skm.roc_auc_score(ys, ss)) if both else None,
                         "pr_auc": _float_or_none(skm.average_precision_score(ys, ss))
                         if ys.max() == 1 else None,
                         "brier": float(skm.brier_score_loss(ys, ss, labels=[0, 1]))})
        return reps


def _check_bootstrap(n_bootstrap: int, seed: int) -> None:
    if n_bootstrap != 0 and n_bootstrap < 2:
        raise ConfigError(f"n_bootstrap must be 0 (no CIs) or >= 2, got {n_bootstrap}")
    if not isinstance(seed, int | np.integer):
        raise ConfigError(f"seed must be an integer, got {seed!r}")


# --------------------------------------------------------------------------- metrics


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    threshold: float | None,
    n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
    seed: int = DEFAULT_SEED,
) -> dict[str, Any]:
    """Compute the evaluation metrics for one split, with bootstrap 95% CIs.

    Binary (K == 2): class 1 is positive and ``probs[:, 1] >= threshold`` (0.5 when None) is the
    prediction; the threshold-dependent metrics are repeated at 0.5 under ``at_0.5``. Multiclass
    (K > 2): argmax prediction, macro averages and a ``per_class`` breakdown (one-vs-rest).
    ``ci[metric] = [lo, hi]`` (None when undefined, and for the ECE); ``n_bootstrap=0`` skips
    the CIs. Metrics that are undefined on the split (AUC with a single class present) are None;
    ratios with an empty denominator (e.g. precision with no positive prediction) follow
    sklearn's ``zero_division=0``.
    """
    p = _check_probs(probs, class_names)
    y = _as_labels(y_true, p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise DataError(f"y_true has {y.shape[0]} rows but probs has {p.shape[0]}")
    _check_bootstrap(n_bootstrap, seed)
    result, _ = _point_metrics(y, p, list(class_names), threshold)
    result.update({"ci_level": CI_LEVEL, "n_bootstrap": int(n_bootstrap),
                   "bootstrap_seed": int(seed),
                   "ci_method": "stratified percentile bootstrap", "ci": {}})
    if n_bootstrap:
        reps = _bootstrap(y, p, list(class_names), threshold, n_bootstrap, int(seed))
        # A CI only where the point estimate exists: an undefined metric has no interval.
        result["ci"] = {m: _interval([r[m] for r in reps])
                        if result.get(m) is not None and m not in NO_CI else None
                        for m in CI_METRICS}
        for name, per in (result.get("per_class") or {}).items():
            per["ci"] = {m: _interval([r["per_class"][name][m] for r in reps])
                         if per.get(m) is not None else None for m in PER_CLASS}
    return result


def _point_metrics(y: np.ndarray, p: np.ndarray, class_names: list[str],
                   threshold: float | None, at_half: bool = True
                   ) -> tuple[dict[str, Any], np.ndarray]:
    """Point estimates of every metric (sklearn), plus ECE."""
    # Undefined-metric warnings are expected on tiny/one-class splits and are handled explicitly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        if p.shape[1] == 2:
            result, pred = _binary_metrics(y, p, class_names, threshold, at_half)
        else:
            result, pred = _multiclass_metrics(y, p, class_names)
    result["ece"] = expected_calibration_error(y, p)
    return result, pred


def _binary_counts(y: np.ndarray, pred: np.ndarray) -> dict[str, Any]:
    # One sklearn call for both classes: class 0's precision and recall are the NPV and the
    # specificity.
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        y, pred, labels=[0, 1], average=None, zero_division=0)
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "precision": float(precision[1]),
        "sensitivity": float(recall[1]),
        "specificity": float(recall[0]),
        "npv": float(precision[0]),
        "f1": float(f1[1]),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "confusion_matrix": _confusion(y, pred, 2),
    }


def _binary_metrics(
    y: np.ndarray, p: np.ndarray, class_names: list[str], threshold: float | None,
    at_half: bool = True,
) -> tuple[dict[str, Any], np.ndarray]:
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not math.isfinite(thr):
        raise ConfigError(f"threshold must be finite, got {threshold}")
    score = p[:, 1]
    pred = (score >= thr).astype(int)
    both_present = np.unique(y).size == 2
    has_positive = bool(np.any(y == 1))
    counts = _binary_counts(y, pred)
    half = _binary_counts(y, (score >= DEFAULT_THRESHOLD).astype(int)) if at_half else None
    result = {
        **{k: v for k, v in counts.items() if k != "confusion_matrix"},
        "roc_auc": _float_or_none(skm.roc_auc_score(y, score)) if both_present else None,
        # Average precision is the area under the PR curve for the positive class: undefined
        # without positives, well defined (1.0) when every sample is positive.
        "pr_auc": _float_or_none(skm.average_precision_score(y, score)) if has_positive else None,
        "brier": float(skm.brier_score_loss(y, score, labels=[0, 1])),
        "threshold": thr,
        "confusion_matrix": counts["confusion_matrix"],
        "n": int(y.shape[0]),
        "class_names": class_names,
    }
    if half is not None:
        result["accuracy_at_0.5"] = half["accuracy"]
        result["at_0.5"] = {**{k: half[k] for k in AT_HALF}, "threshold": DEFAULT_THRESHOLD,
                            "confusion_matrix": half["confusion_matrix"]}
    return result, pred


def _per_class(y: np.ndarray, pred: np.ndarray, p: np.ndarray,
               class_names: list[str]) -> dict[str, dict[str, Any]]:
    """One-vs-rest figures of every class, each metric one sklearn call over all classes: the
    bootstrap repeats this hundreds of times, and sklearn's per-call checks dominate its cost."""
    labels = list(range(p.shape[1]))
    # K > 2 columns (label_binarize would give a single column for two classes).
    truth, called = label_binarize(y, classes=labels), label_binarize(pred, classes=labels)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        truth, called, average=None, zero_division=0)
    # A class's negatives are the binarised complement: their precision is its NPV and their
    # recall its specificity.
    npv, specificity, _, _ = skm.precision_recall_fscore_support(
        1 - truth, 1 - called, average=None, zero_division=0)
    both = (truth.sum(axis=0) > 0) & (truth.sum(axis=0) < truth.shape[0])
    roc = np.full(len(labels), np.nan)
    ap = np.full(len(labels), np.nan)
    if both.any():
        roc[both] = skm.roc_auc_score(truth[:, both], p[:, both], average=None)
        ap[both] = skm.average_precision_score(truth[:, both], p[:, both], average=None)
    # Average precision is defined (1.0) for a class that is every sample, not for an absent one.
    for c in np.flatnonzero(truth.all(axis=0)):
        ap[c] = skm.average_precision_score(truth[:, c], p[:, c])
    return {name: {"precision": float(precision[i]), "recall": float(recall[i]),
                   "specificity": float(specificity[i]), "npv": float(npv[i]),
                   "f1": float(f1[i]), "support": int(support[i]),
                   "roc_auc": _float_or_none(roc[i]), "pr_auc": _float_or_none(ap[i])}
            for i, name in enumerate(class_names)}


def _multiclass_metrics(
    y: np.ndarray, p: np.ndarray, class_names: list[str]
) -> tuple[dict[str, Any], np.ndarray]:
    k = p.shape[1]
    labels = list(range(k))
    pred = np.argmax(p, axis=1)
    per_class = _per_class(y, pred, p, class_names)

    def macro(metric: str) -> float | None:
        """sklearn's macro average: the unweighted mean over classes (None if one is undefined:
        one-vs-rest AUC of an absent class is undefined, and so is their mean)."""
        values = [c[metric] for c in per_class.values()]
        return None if None in values else float(np.mean(values))

    result = {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "precision": macro("precision"),
        "sensitivity": macro("recall"),
        "specificity": macro("specificity"),
        "npv": macro("npv"),
        "f1": macro("f1"),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "roc_auc": macro("roc_auc"),
        "pr_auc": macro("pr_auc") if np.unique(y).size == k else None,
        # Multiclass Brier sums over classes (range 0..2), sklearn's convention. sklearn wants
        # rows summing to 1 at float64 precision; float32 softmax rows are off by ~1e-7.
        "brier": float(skm.brier_score_loss(y, p / p.sum(axis=1, keepdims=True),
                                            labels=labels)),
        "confusion_matrix": _confusion(y, pred, k),
        "n": int(y.shape[0]),
        "class_names": class_names,
        "threshold": None,
        "per_class": per_class,
    }
    return result, pred


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> list[list[int]]:
    """Confusion matrix as nested ints, rows = true class, always K x K."""
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    return [[int(v) for v in row] for row in cm]
