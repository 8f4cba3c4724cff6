"""Metrics checked against values counted by hand, never against sklearn itself."""

from __future__ import annotations

import itertools
import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from lungxray.artifacts import CI_METRICS
from lungxray.metrics import (
    binary_rates,
    bootstrap_indices,
    choose_threshold,
    compute_metrics,
    expected_calibration_error,
    reliability,
    roc_auc,
)

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


def step_average_precision(y: np.ndarray, s: np.ndarray) -> float:
    """AP with ties: one step per distinct score, precision of everything scoring >= it."""
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(s.tolist()), reverse=True):
        called = s >= t
        recall = (called & (y == 1)).sum() / (y == 1).sum()
        total += (recall - previous_recall) * (called & (y == 1)).sum() / called.sum()
        previous_recall = recall
    return total


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


def test_roc_auc_is_the_exact_auc_evaluation_reports() -> None:
    assert roc_auc(Y, PROBS) == pytest.approx(pair_auc(Y, P1))
    assert roc_auc(Y, PROBS) == compute_metrics(Y, PROBS, CLASSES, None)["roc_auc"]
    assert roc_auc(Y3, P3) == pytest.approx(compute_metrics(Y3, P3, C3, None)["roc_auc"])
    assert roc_auc(Y3[:5], P3[:5]) is None  # a class absent: undefined, like the report's
    with pytest.raises(ValueError, match="9 labels for 10 rows"):
        roc_auc(Y[:9], PROBS)
    with pytest.raises(ValueError, match="outside 0..1"):
        roc_auc(Y + 1, PROBS)


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


def test_choose_threshold_is_a_real_score_even_for_inverted_scores() -> None:
    # Inverted scores: no threshold beats "predict nothing" (roc_curve's +inf). Clipped to 1.0
    # that would mean "positive where P == 1": a score a softmax does reach.
    y, s = np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 1.0])
    t = choose_threshold(y, s)
    # The best real point is (1, 1), J = 0: everything positive, never "positive where P == 1".
    assert t == pytest.approx(0.1) and (s >= t).all()


def test_choose_threshold_rejects_one_class() -> None:
    with pytest.raises(ValueError, match="both classes"):
        choose_threshold(np.array([1, 1, 1]), np.array([0.2, 0.5, 0.9]))


@pytest.mark.parametrize(
    ("y", "probs", "message"),
    [
        (Y, P1, r"probs must be 2-D \(N, K\), got shape \(10,\)"),
        (Y[:5], PROBS, "y_true has 5 rows but probs has 10"),
        (np.array([0, 1, 2, 0, 1, 0, 0, 0, 0, 0]), PROBS, r"labels \[2\] outside 0..1"),
        (Y, np.column_stack([-P1, P1]), r"probs must lie in \[0, 1\]"),  # logits
        (Y, np.column_stack([P1, P1]), "rows must sum to 1"),
    ],
)
def test_compute_metrics_rejects_bad_input(y: np.ndarray, probs: np.ndarray,
                                           message: str) -> None:
    with pytest.raises(ValueError, match=message):
        compute_metrics(y, probs, CLASSES, 0.5)


# --------------------------------------------------------------------------- threshold targets


def test_choose_threshold_target_sensitivity() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.45, 0.4, 0.6, 0.7, 0.8, 0.9])
    # Positives score .9 .8 .7 .6 .4: sensitivity 4/5 is first reached at 0.6, 5/5 at 0.4.
    assert choose_threshold(y, s, target_sensitivity=0.8) == pytest.approx(0.6)
    assert choose_threshold(y, s, target_sensitivity=0.81) == pytest.approx(0.4)
    assert choose_threshold(y, s, target_sensitivity=1.0) == pytest.approx(0.4)
    assert choose_threshold(y, s, target_sensitivity=0.2) == pytest.approx(0.9)

    # Brute force: the highest observed score whose sensitivity reaches the target.
    def brute(target: float) -> float:
        return max(t for t in s if np.mean(s[y == 1] >= t) >= target)

    for target in (0.1, 0.35, 0.5, 0.79, 0.95):
        assert choose_threshold(y, s, target_sensitivity=target) == pytest.approx(brute(target))


@pytest.mark.parametrize("target", [0.0, -0.1, 1.01])
def test_choose_threshold_rejects_bad_target(target: float) -> None:
    with pytest.raises(ValueError, match="target_sensitivity"):
        choose_threshold(Y, P1, target_sensitivity=target)


# --------------------------------------------------------------------------- at 0.5


def test_metrics_at_half_sit_beside_the_chosen_threshold() -> None:
    m = compute_metrics(Y, PROBS, CLASSES, 0.65)
    half = m["at_0.5"]
    # At 0.5 (see the top of this file): TP=3, FN=1, FP=2, TN=4.
    assert half["confusion_matrix"] == [[4, 2], [1, 3]]
    assert half["threshold"] == 0.5
    assert half["sensitivity"] == pytest.approx(3 / 4)
    assert half["specificity"] == pytest.approx(4 / 6)
    assert half["precision"] == pytest.approx(3 / 5)
    assert half["npv"] == pytest.approx(4 / 5)
    assert half["accuracy"] == pytest.approx(0.7) == m["accuracy_at_0.5"]
    assert half["mcc"] == pytest.approx((3 * 4 - 2 * 1) / math.sqrt(5 * 4 * 6 * 5))
    assert m["sensitivity"] == pytest.approx(2 / 4)  # the chosen threshold's own figures


# --------------------------------------------------------------------------- calibration


def test_ece_by_hand() -> None:
    # One sample per bin: ECE = mean |outcome - p|.
    y = np.array([0, 0, 1, 1])
    p1 = np.array([0.05, 0.35, 0.65, 0.95])
    ece = expected_calibration_error(y, np.column_stack([1 - p1, p1]))
    assert ece == pytest.approx((0.05 + 0.35 + 0.35 + 0.05) / 4)
    # Two samples share the 0.6-0.7 bin: observed 1/2 vs mean confidence .65 -> gap .15 for
    # half of the samples; the other two are alone: gaps .1 and .1.
    y = np.array([1, 0, 0, 1])
    p1 = np.array([0.62, 0.68, 0.1, 0.9])
    ece = expected_calibration_error(y, np.column_stack([1 - p1, p1]))
    assert ece == pytest.approx(0.5 * 0.15 + 0.25 * 0.1 + 0.25 * 0.1)
    # Perfect calibration: everything at 0.5, half positive.
    flat = np.full((4, 2), 0.5)
    assert expected_calibration_error(np.array([0, 1, 0, 1]), flat) == pytest.approx(0.0)
    assert compute_metrics(Y, PROBS, CLASSES, 0.5)["ece"] == pytest.approx(
        expected_calibration_error(Y, PROBS))


def test_ece_multiclass_uses_top_label_confidence() -> None:
    # P3 top-label confidences .7 .5 .6 .8 .5 .8 .4; right: yes no yes yes no yes no.
    # Bins: [.3,.4]: .4 wrong; (.4,.5]: .5 wrong, .5 wrong; (.5,.6]: .6 right; (.6,.7]: .7 right;
    # (.7,.8]: .8, .8 right.
    expected = (abs(0 - 0.4) + 2 * abs(0 - 0.5) + abs(1 - 0.6) + abs(1 - 0.7)
                + 2 * abs(1 - 0.8)) / 7
    assert expected_calibration_error(Y3, P3) == pytest.approx(expected)
    assert compute_metrics(Y3, P3, C3, None)["ece"] == pytest.approx(expected)


def test_reliability_bins() -> None:
    y = np.array([1, 0, 0, 1])
    p1 = np.array([0.62, 0.68, 0.1, 0.9])
    bins = reliability(y, np.column_stack([1 - p1, p1]))
    assert bins["count"] == [1, 2, 1]
    assert bins["confidence"] == pytest.approx([0.1, 0.65, 0.9])
    assert bins["observed"] == pytest.approx([0.0, 0.5, 1.0])


# --------------------------------------------------------------------------- multiclass extras


def test_multiclass_specificity_npv_brier_by_hand() -> None:
    m = compute_metrics(Y3, P3, C3, None)
    # Confusion [[2,1,0],[0,1,1],[0,1,1]]: per class (TN, FP, FN): normal (4, 0, 1),
    # bacterial (3, 2, 1), viral (4, 1, 1).
    spec = [4 / 4, 3 / 5, 4 / 5]
    npv = [4 / 5, 3 / 4, 4 / 5]
    for i, name in enumerate(C3):
        assert m["per_class"][name]["specificity"] == pytest.approx(spec[i])
        assert m["per_class"][name]["npv"] == pytest.approx(npv[i])
        truth = (i == Y3).astype(int)
        assert m["per_class"][name]["roc_auc"] == pytest.approx(pair_auc(truth, P3[:, i]))
        assert m["per_class"][name]["pr_auc"] == pytest.approx(
            step_average_precision(truth, P3[:, i]))
    assert m["specificity"] == pytest.approx(np.mean(spec))
    assert m["npv"] == pytest.approx(np.mean(npv))
    onehot = np.eye(3)[Y3]
    assert m["brier"] == pytest.approx(np.mean(((P3 - onehot) ** 2).sum(axis=1)))
    assert m["pr_auc"] == pytest.approx(np.mean(
        [step_average_precision((i == Y3).astype(int), P3[:, i]) for i in range(3)]))


# --------------------------------------------------------------------------- bootstrap CIs


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None) -> dict:
    """The headline metrics of one materialised resample, straight from sklearn (and ECE from
    its definition), independently of lungxray.metrics."""
    k = p.shape[1]
    if k == 2:
        pred = (p[:, 1] >= threshold).astype(int)
        out = {
            "roc_auc": skm.roc_auc_score(y, p[:, 1]),
            "pr_auc": skm.average_precision_score(y, p[:, 1]),
            "precision": skm.precision_score(y, pred, zero_division=0),
            "sensitivity": skm.recall_score(y, pred, zero_division=0),
            "specificity": skm.recall_score(y, pred, pos_label=0, zero_division=0),
            "npv": skm.precision_score(y, pred, pos_label=0, zero_division=0),
            "f1": skm.f1_score(y, pred, zero_division=0),
            "brier": skm.brier_score_loss(y, p[:, 1]),
        }
        conf, hit = p[:, 1], (y == 1)
    else:
        pred = p.argmax(axis=1)
        binar = np.eye(k)[y]
        out = {
            "roc_auc": skm.roc_auc_score(y, p, multi_class="ovr"),
            "pr_auc": skm.average_precision_score(binar, p, average="macro"),
            "precision": skm.precision_score(y, pred, average="macro", zero_division=0),
            "sensitivity": skm.recall_score(y, pred, average="macro", zero_division=0),
            "specificity": np.mean([skm.recall_score(y != c, pred != c) for c in range(k)]),
            "npv": np.mean([skm.precision_score(y != c, pred != c, zero_division=0)
                            for c in range(k)]),
            "f1": skm.f1_score(y, pred, average="macro", zero_division=0),
            "brier": np.mean(((p - binar) ** 2).sum(axis=1)),
        }
        conf, hit = p.max(axis=1), (pred == y)
    out["accuracy"] = skm.accuracy_score(y, pred)
    out["balanced_accuracy"] = skm.balanced_accuracy_score(y, pred)
    out["mcc"] = skm.matthews_corrcoef(y, pred)
    # Ten equal-width bins, right-closed, with calibration_curve's float edges.
    bins = np.searchsorted(np.linspace(0.0, 1.0, 11)[1:-1], conf)
    out["ece"] = sum(abs(hit[bins == b].sum() - conf[bins == b].sum()) for b in range(10)) / len(y)
    return out


@pytest.mark.parametrize("multiclass", [False, True])
def test_bootstrap_ci_equals_percentiles_of_sklearn_on_each_resample(multiclass: bool) -> None:
    rng = np.random.default_rng(3)
    n, k = 90, 3 if multiclass else 2
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    # Rounded to 2 decimals so scores tie, as real softmax outputs often do.
    p = np.round(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True), 2)
    p[:, -1] = 1 - p[:, :-1].sum(axis=1)
    p = np.clip(p, 0, 1)
    threshold = None if multiclass else 0.42
    b, seed = 60, 11
    m = compute_metrics(y, p, ["a", "b", "c"][:k], threshold, n_bootstrap=b, seed=seed)
    resamples = list(bootstrap_indices(y, b, seed))
    assert len(resamples) == b and all(len(idx) == n for idx in resamples)
    replicates = [_sklearn_metrics(y[idx], p[idx], threshold) for idx in resamples]
    for metric in CI_METRICS:
        if metric == "ece":  # biased upwards on every resample: no percentile interval
            assert m["ci"][metric] is None
            continue
        values = np.array([r[metric] for r in replicates], dtype=float)
        assert m["ci"][metric] == pytest.approx(np.percentile(values, [2.5, 97.5])), metric
    assert m["n_bootstrap"] == b and m["bootstrap_seed"] == seed and m["ci_level"] == 0.95
    if multiclass:
        for c, name in enumerate("abc"):
            recalls = [skm.recall_score(y[idx] == c, p[idx].argmax(1) == c)
                       for idx in resamples]
            assert m["per_class"][name]["ci"]["recall"] == pytest.approx(
                np.percentile(recalls, [2.5, 97.5]))


@pytest.mark.parametrize("counts", [c for c in itertools.product(range(3), repeat=4) if sum(c)])
def test_binary_rates_are_sklearns_on_every_small_confusion(counts: tuple[int, ...]) -> None:
    """The bootstrap's rates from confusion counts equal sklearn's, zero divisions and one-class
    splits included."""
    tn, fp, fn, tp = counts
    y = np.array([0] * (tn + fp) + [1] * (fn + tp))
    pred = np.array([0] * tn + [1] * fp + [0] * fn + [1] * tp)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = {
            "accuracy": skm.accuracy_score(y, pred),
            "balanced_accuracy": skm.balanced_accuracy_score(y, pred),
            "precision": skm.precision_score(y, pred, zero_division=0),
            "sensitivity": skm.recall_score(y, pred, zero_division=0),
            "specificity": skm.recall_score(1 - y, 1 - pred, zero_division=0),
            "npv": skm.precision_score(1 - y, 1 - pred, zero_division=0),
            "f1": skm.f1_score(y, pred, zero_division=0),
            "mcc": skm.matthews_corrcoef(y, pred)}
    assert binary_rates(*counts) == pytest.approx(expected, abs=1e-12)


def test_bootstrap_is_stratified_and_seeded() -> None:
    y = np.array([0] * 7 + [1] * 3)
    resamples = np.array(list(bootstrap_indices(y, 200, seed=5)))
    assert ((y[resamples] == 0).sum(axis=1) == 7).all()  # class counts fixed in every resample
    assert np.array_equal(resamples, np.array(list(bootstrap_indices(y, 200, seed=5))))
    assert not np.array_equal(resamples, np.array(list(bootstrap_indices(y, 200, seed=6))))
    a = compute_metrics(Y, PROBS, CLASSES, 0.5, n_bootstrap=200, seed=1)
    assert a == compute_metrics(Y, PROBS, CLASSES, 0.5, n_bootstrap=200, seed=1)
    assert a["ci"] != compute_metrics(Y, PROBS, CLASSES, 0.5, n_bootstrap=200, seed=2)["ci"]


def test_ci_narrows_with_more_data_and_brackets_the_estimate() -> None:
    rng = np.random.default_rng(0)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = rng.integers(0, 2, n)
        s = np.clip(0.5 + (y - 0.5) * 0.4 + rng.normal(0, 0.25, n), 0, 1)
        return y, np.column_stack([1 - s, s])

    widths = []
    for n in (100, 1600):
        y, p = sample(n)
        m = compute_metrics(y, p, CLASSES, 0.5)
        lo, hi = m["ci"]["roc_auc"]
        assert lo <= m["roc_auc"] <= hi
        widths.append(hi - lo)
        assert m["n_bootstrap"] == 200  # the default
    # Width shrinks like 1/sqrt(n): 16x the data, about a quarter of the width.
    assert widths[1] < widths[0] / 2.5


def test_no_bootstrap_and_undefined_cis() -> None:
    assert compute_metrics(Y, PROBS, CLASSES, 0.5, n_bootstrap=0)["ci"] == {}
    y = np.zeros(4, dtype=int)
    p1 = np.array([0.1, 0.6, 0.2, 0.3])
    m = compute_metrics(y, np.column_stack([1 - p1, p1]), CLASSES, 0.5)
    assert m["ci"]["roc_auc"] is None and m["ci"]["pr_auc"] is None
    assert m["ci"]["specificity"] is not None
    json.dumps(m, allow_nan=False)
    _assert_plain_json(m)
    with pytest.raises(ValueError, match="n_bootstrap"):
        compute_metrics(Y, PROBS, CLASSES, 0.5, n_bootstrap=1)


def test_multiclass_is_plain_json_with_cis() -> None:
    m = compute_metrics(Y3, P3, C3, None)
    _assert_plain_json(m)
    assert set(m["ci"]) == set(CI_METRICS)
    assert "at_0.5" not in m  # argmax has no threshold to vary
    assert set(m["per_class"]["viral"]["ci"]) >= {"recall", "specificity", "roc_auc"}
