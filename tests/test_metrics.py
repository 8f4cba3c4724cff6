"""Metrics checked against values counted by hand, never against sklearn itself."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest

from lungxray.metrics import choose_threshold, compute_metrics

CLASSES = ["normal", "pneumonia"]

# 4 positives then 6 negatives. At threshold 0.5: TP=3 (0.9, 0.8, 0.6), FN=1 (0.3),
# FP=2 (0.7, 0.55), TN=4 (0.1, 0.2, 0.4, 0.45).
Y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
P1 = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.1, 0.2, 0.4, 0.45])
PROBS = np.column_stack([1 - P1, P1])


def pair_auc(y: np.ndarray, s: np.ndarray) -> float:
    """AUC as P(score_pos > score_neg), ties counted half."""
    pos, neg = s[y == 1], s[y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def hand_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """Mean of the precision at the rank of each positive (scores have no ties here)."""
    order = np.argsort(-s)
    hits, total = 0, 0.0
    for rank, idx in enumerate(order, start=1):
        if y[idx] == 1:
            hits += 1
            total += hits / rank
    return total / y.sum()


def test_binary_metrics_match_hand_counts() -> None:
    m = compute_metrics(Y, PROBS, CLASSES, 0.5)
    tp, fn, fp, tn = 3, 1, 2, 4
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["precision"] == pytest.approx(3 / 5)
    assert m["sensitivity"] == pytest.approx(3 / 4)
    assert m["specificity"] == pytest.approx(4 / 6)
    assert m["npv"] == pytest.approx(4 / 5)
    assert m["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 1))
    assert m["balanced_accuracy"] == pytest.approx((3 / 4 + 4 / 6) / 2)
    assert m["mcc"] == pytest.approx((tp * tn - fp * fn) / math.sqrt(5 * 4 * 6 * 5))
    assert m["brier"] == pytest.approx(np.mean((P1 - Y) ** 2))
    # 24 (pos, neg) pairs; the positive wins all but 0.6<0.7, 0.3<0.7, 0.3<0.55, 0.3<0.4, 0.3<0.45.
    assert m["roc_auc"] == pytest.approx(19 / 24)
    assert m["roc_auc"] == pytest.approx(pair_auc(Y, P1))
    # Positives sit at ranks 1, 2, 4, 8 of the score order.
    assert m["pr_auc"] == pytest.approx((1 / 1 + 2 / 2 + 3 / 4 + 4 / 8) / 4)
    assert m["pr_auc"] == pytest.approx(hand_average_precision(Y, P1))
    assert m["threshold"] == 0.5
    assert m["accuracy_at_0.5"] == pytest.approx(0.7)
    assert m["n"] == 10
    assert m["class_names"] == CLASSES


def test_threshold_moves_predictions_but_not_auc_or_accuracy_at_half() -> None:
    m = compute_metrics(Y, PROBS, CLASSES, 0.65)
    # >= 0.65 positive: 0.9, 0.8 (TP), 0.7 (FP); everything else negative.
    assert m["confusion_matrix"] == [[5, 1], [2, 2]]
    assert m["accuracy"] == pytest.approx(7 / 10)
    assert m["sensitivity"] == pytest.approx(2 / 4)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["threshold"] == 0.65
    assert m["accuracy_at_0.5"] == pytest.approx(0.7)
    assert m["roc_auc"] == pytest.approx(19 / 24)


def test_threshold_is_inclusive() -> None:
    # A score exactly at the threshold is positive (same convention as roc_curve).
    m = compute_metrics(Y, PROBS, CLASSES, 0.6)
    assert m["confusion_matrix"][1][1] == 3


def test_none_threshold_means_half() -> None:
    m = compute_metrics(Y, PROBS, CLASSES, None)
    assert m["threshold"] == 0.5
    assert m["confusion_matrix"] == [[4, 2], [1, 3]]


def _assert_plain_json(value: object) -> None:
    """Only builtin JSON types, recursively (numpy scalars would slip past json.dumps checks)."""
    if isinstance(value, dict):
        for k, v in value.items():
            assert isinstance(k, str)
            _assert_plain_json(v)
    elif isinstance(value, list):
        for v in value:
            _assert_plain_json(v)
    else:
        assert value is None or type(value) in (int, float, str, bool), (value, type(value))


def test_results_are_plain_json() -> None:
    m = compute_metrics(Y, PROBS, CLASSES, 0.5)
    _assert_plain_json(m)
    assert json.loads(json.dumps(m)) == m


def test_one_class_split_sets_auc_to_none() -> None:
    y = np.zeros(4, dtype=int)
    p1 = np.array([0.1, 0.6, 0.2, 0.3])
    m = compute_metrics(y, np.column_stack([1 - p1, p1]), CLASSES, 0.5)
    assert m["roc_auc"] is None
    assert m["pr_auc"] is None
    assert m["confusion_matrix"] == [[3, 1], [0, 0]]
    assert m["specificity"] == pytest.approx(3 / 4)
    assert m["accuracy"] == pytest.approx(3 / 4)
    json.dumps(m, allow_nan=False)


def test_all_positive_split_keeps_pr_auc_but_not_roc_auc() -> None:
    y = np.ones(3, dtype=int)
    p1 = np.array([0.9, 0.4, 0.7])
    m = compute_metrics(y, np.column_stack([1 - p1, p1]), CLASSES, 0.5)
    assert m["roc_auc"] is None
    assert m["pr_auc"] == pytest.approx(1.0)  # every ranked sample is a hit
    assert m["sensitivity"] == pytest.approx(2 / 3)


# Three classes, 7 samples. argmax predictions: [0, 1, 0, 1, 2, 2, 1].
Y3 = np.array([0, 0, 0, 1, 1, 2, 2])
P3 = np.array([
    [0.7, 0.2, 0.1],
    [0.2, 0.5, 0.3],
    [0.6, 0.3, 0.1],
    [0.1, 0.8, 0.1],
    [0.2, 0.3, 0.5],
    [0.1, 0.1, 0.8],
    [0.3, 0.4, 0.3],
])
C3 = ["normal", "bacterial", "viral"]


def test_multiclass_matches_hand_counts() -> None:
    m = compute_metrics(Y3, P3, C3, None)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [0, 1, 1]]
    prec = [2 / 2, 1 / 3, 1 / 2]
    rec = [2 / 3, 1 / 2, 1 / 2]
    f1 = [2 * p * r / (p + r) for p, r in zip(prec, rec, strict=True)]
    assert m["accuracy"] == pytest.approx(4 / 7)
    assert m["balanced_accuracy"] == pytest.approx(sum(rec) / 3)
    assert m["precision"] == pytest.approx(sum(prec) / 3)
    assert m["sensitivity"] == pytest.approx(sum(rec) / 3)
    assert m["f1"] == pytest.approx(sum(f1) / 3)
    for i, name in enumerate(C3):
        assert m["per_class"][name]["precision"] == pytest.approx(prec[i])
        assert m["per_class"][name]["recall"] == pytest.approx(rec[i])
        assert m["per_class"][name]["f1"] == pytest.approx(f1[i])
    assert [m["per_class"][c]["support"] for c in C3] == [3, 2, 2]
    ovr = [pair_auc(np.equal(Y3, i).astype(int), P3[:, i]) for i in range(3)]
    assert m["roc_auc"] == pytest.approx(sum(ovr) / 3)
    assert m["threshold"] is None
    assert m["n"] == 7
    # Multiclass MCC (Gorodkin): (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)).
    c, s, t, p = 4, 7, [3, 2, 2], [2, 3, 2]
    num = c * s - sum(a * b for a, b in zip(p, t, strict=True))
    den = math.sqrt((s**2 - sum(a * a for a in p)) * (s**2 - sum(a * a for a in t)))
    assert m["mcc"] == pytest.approx(num / den)
    _assert_plain_json(m)


def test_multiclass_with_absent_class_has_no_auc() -> None:
    m = compute_metrics(Y3[:5], P3[:5], C3, None)
    assert m["roc_auc"] is None
    assert m["per_class"]["viral"]["support"] == 0


def test_choose_threshold_known_youden_optimum() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7, 0.8, 0.9])
    # At 0.6: TPR 4/5, FPR 0 -> J = 0.8; at 0.4: TPR 1, FPR 1/4 -> J = 0.75.
    assert choose_threshold(y, s) == pytest.approx(0.6)
    # Cross-check by brute force over every observed score.
    def j(t: float) -> float:
        pred = s >= t
        return pred[y == 1].mean() - pred[y == 0].mean()
    assert max(s, key=j) == pytest.approx(0.6)


def test_choose_threshold_separable_gives_perfect_split() -> None:
    y = np.array([0, 1, 0, 1])
    s = np.array([0.2, 0.7, 0.35, 0.9])
    t = choose_threshold(y, s)
    assert np.array_equal((s >= t).astype(int), y)
    assert t == pytest.approx(0.7)  # the most conservative of the perfect thresholds


def test_choose_threshold_is_clipped_into_unit_interval() -> None:
    # Inverted scores: no threshold beats "predict nothing", whose roc_curve threshold is inf.
    t = choose_threshold(np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9]))
    assert 0.0 <= t <= 1.0


def test_choose_threshold_rejects_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))


@pytest.mark.parametrize(
    ("y", "probs"),
    [
        (Y, P1),  # 1-D probs
        (Y[:5], PROBS),  # row mismatch
        (np.array([0, 1, 2, 0, 1, 0, 0, 0, 0, 0]), PROBS),  # label outside the classes
    ],
)
def test_compute_metrics_rejects_bad_input(y: np.ndarray, probs: np.ndarray) -> None:
    with pytest.raises(ValueError):
        compute_metrics(y, probs, CLASSES, 0.5)
