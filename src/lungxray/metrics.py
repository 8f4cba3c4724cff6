"""Classification metrics and operating-threshold choice (scikit-learn only).

Every number here comes from scikit-learn so that what the report shows is what a reviewer can
reproduce with a one-liner; this module only validates inputs, picks the right sklearn call and
turns the results into plain JSON-serialisable Python values.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
from sklearn import metrics as skm
from sklearn.exceptions import UndefinedMetricWarning

DEFAULT_THRESHOLD = 0.5


def _as_labels(y_true: np.ndarray, n_classes: int) -> np.ndarray:
    """Return y_true as a 1-D int array, checking every label is in [0, n_classes)."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    if y.size == 0:
        raise ValueError("y_true is empty")
    if not np.all(np.equal(np.mod(y, 1), 0)):
        raise ValueError("y_true must hold integer class indices")
    y = y.astype(int)
    bad = sorted(set(np.unique(y).tolist()) - set(range(n_classes)))
    if bad:
        raise ValueError(f"y_true holds labels {bad} outside 0..{n_classes - 1}")
    return y


def _float_or_none(value: float) -> float | None:
    """Plain float, or None for NaN/inf (JSON has no NaN)."""
    value = float(value)
    return value if math.isfinite(value) else None


def choose_threshold(y_true: np.ndarray, scores: np.ndarray) -> float:
    """Pick the decision threshold maximising Youden's J (TPR - FPR) on the ROC curve.

    ``scores`` are P(positive); a sample is predicted positive when ``score >= threshold``, which is
    the convention ``roc_curve`` uses, so the returned value reproduces the chosen ROC point.
    """
    y = _as_labels(y_true, 2)
    s = np.asarray(scores, dtype=float)
    if s.shape != y.shape:
        raise ValueError(f"scores shape {s.shape} does not match y_true shape {y.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("scores contain NaN or inf")
    if np.unique(y).size < 2:
        raise ValueError(
            "choose_threshold needs both classes in y_true (only "
            f"class {int(y[0])} present): Youden's J is undefined"
        )
    # Keep every point: dropping collinear ones never removes the optimum, but keeping them makes
    # the tie-break (first = highest threshold = most conservative) independent of sklearn's
    # pruning heuristics.
    fpr, tpr, thresholds = skm.roc_curve(y, s, drop_intermediate=False)
    best = int(np.argmax(tpr - fpr))
    # thresholds[0] is +inf ("predict nothing positive"); a probability threshold lives in [0, 1].
    return float(np.clip(thresholds[best], 0.0, 1.0))


def _check_probs(probs: np.ndarray, class_names: list[str]) -> np.ndarray:
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, K), got shape {p.shape}")
    if p.shape[1] != len(class_names):
        raise ValueError(
            f"probs has {p.shape[1]} columns but {len(class_names)} class_names {class_names}"
        )
    if len(class_names) < 2:
        raise ValueError("need at least two classes")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contain NaN or inf")
    return p


def compute_metrics(
    y_true: np.ndarray,
    probs: np.ndarray,
    class_names: list[str],
    threshold: float | None,
) -> dict[str, Any]:
    """Compute the evaluation metrics for one split.

    Binary (K == 2): class 1 is positive and ``probs[:, 1] >= threshold`` (0.5 when None) is the
    prediction. Multiclass (K > 2): argmax prediction, macro averages and a per-class breakdown.
    Metrics that are undefined on the split (AUC with a single class present) are None; ratios with
    an empty denominator (e.g. precision with no positive prediction) follow sklearn's
    ``zero_division=0`` convention.
    """
    p = _check_probs(probs, class_names)
    y = _as_labels(y_true, p.shape[1])
    if y.shape[0] != p.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} rows but probs has {p.shape[0]}")
    # Undefined-metric warnings are expected on tiny/one-class splits and are handled explicitly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        if p.shape[1] == 2:
            return _binary_metrics(y, p, list(class_names), threshold)
        return _multiclass_metrics(y, p, list(class_names))


def _binary_metrics(
    y: np.ndarray, p: np.ndarray, class_names: list[str], threshold: float | None
) -> dict[str, Any]:
    thr = DEFAULT_THRESHOLD if threshold is None else float(threshold)
    if not math.isfinite(thr):
        raise ValueError(f"threshold must be finite, got {threshold}")
    score = p[:, 1]
    pred = (score >= thr).astype(int)
    both_present = np.unique(y).size == 2
    has_positive = bool(np.any(y == 1))
    labels = [0, 1]

    def prec(pos: int) -> float:
        return float(skm.precision_score(y, pred, labels=labels, pos_label=pos, zero_division=0))

    def rec(pos: int) -> float:
        return float(skm.recall_score(y, pred, labels=labels, pos_label=pos, zero_division=0))

    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "roc_auc": _float_or_none(skm.roc_auc_score(y, score)) if both_present else None,
        # Average precision is the area under the PR curve for the positive class: undefined
        # without positives, well defined (1.0) when every sample is positive.
        "pr_auc": _float_or_none(skm.average_precision_score(y, score)) if has_positive else None,
        "precision": prec(1),
        "sensitivity": rec(1),
        "specificity": rec(0),
        "npv": prec(0),
        "f1": float(skm.f1_score(y, pred, labels=labels, pos_label=1, zero_division=0)),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "brier": float(skm.brier_score_loss(y, score, labels=labels)),
        "threshold": thr,
        "accuracy_at_0.5": float(skm.accuracy_score(y, (score >= 0.5).astype(int))),
        "confusion_matrix": _confusion(y, pred, 2),
        "n": int(y.shape[0]),
        "class_names": class_names,
    }


def _multiclass_metrics(y: np.ndarray, p: np.ndarray, class_names: list[str]) -> dict[str, Any]:
    k = p.shape[1]
    labels = list(range(k))
    pred = np.argmax(p, axis=1)
    prec, rec, f1, support = skm.precision_recall_fscore_support(
        y, pred, labels=labels, zero_division=0
    )
    macro_p, macro_r, macro_f1, _ = skm.precision_recall_fscore_support(
        y, pred, labels=labels, average="macro", zero_division=0
    )
    # One-vs-rest AUC of an absent class is undefined, and so is their macro mean.
    all_present = np.unique(y).size == k
    roc_auc = None
    if all_present:
        roc_auc = _float_or_none(
            skm.roc_auc_score(y, p, multi_class="ovr", average="macro", labels=labels)
        )
    per_class = {
        name: {
            "precision": float(prec[i]),
            "recall": float(rec[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    }
    return {
        "accuracy": float(skm.accuracy_score(y, pred)),
        "balanced_accuracy": float(skm.balanced_accuracy_score(y, pred)),
        "precision": float(macro_p),
        "sensitivity": float(macro_r),
        "f1": float(macro_f1),
        "mcc": float(skm.matthews_corrcoef(y, pred)),
        "roc_auc": roc_auc,
        "confusion_matrix": _confusion(y, pred, k),
        "n": int(y.shape[0]),
        "class_names": class_names,
        "threshold": None,
        "per_class": per_class,
    }


def _confusion(y: np.ndarray, pred: np.ndarray, k: int) -> list[list[int]]:
    """Confusion matrix as nested ints, rows = true class, always K x K."""
    cm = skm.confusion_matrix(y, pred, labels=list(range(k)))
    return [[int(v) for v in row] for row in cm]
