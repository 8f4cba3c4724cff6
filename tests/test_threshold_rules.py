"""Threshold rules beside Youden's J (issue 33): balanced 0.5, Platt-calibrated 0.5, the best
worst-group balanced accuracy, a target sensitivity winning over each; how they are recorded,
described and offered. Scores are constructed so that each rule's threshold is known by hand."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungxray import cli, prevalence, shift
from lungxray.artifacts import GROUP_COLUMN, THRESHOLD_RULES, target_sensitivity_of
from lungxray.errors import ConfigError, DataError
from lungxray.metrics import (
    MIN_GROUP_SIZE,
    choose_threshold,
    operating_threshold,
    rates_at,
    rule_thresholds,
    threshold_rules_block,
    worst_group_accuracy,
)
from lungxray.modelcard import model_card
from lungxray.report import compare
from tests.test_modelcard import SUMMARY, trial
from tests.trial_helpers import make_trial, three_trials

# Calibrated scores of a skewed validation set: at level s, round(n * s) of n images are
# positive. 400 of 1300 positive (prevalence 0.308).
LEVELS = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
COUNTS = np.array([400, 300, 200, 100, 100, 50, 50, 50, 50])


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _skewed() -> tuple[np.ndarray, np.ndarray]:
    """Labels and the calibrated scores pushed towards the positive class, as a class-weighted
    model's are: score = sigmoid(logit(calibrated) / 2 + 1.5). A Platt fit undoes exactly that
    (slope 2, intercept -3), so its 0.5 lies at score sigmoid(1.5)."""
    y, s = [], []
    for level, n in zip(LEVELS, COUNTS, strict=True):
        positives = round(n * level)
        y += [1] * positives + [0] * (n - positives)
        s += [_sigmoid(_logit(level) / 2 + 1.5)] * n
    return np.array(y), np.array(s)


def test_each_rule_on_skewed_scores():
    y, s = _skewed()
    # Youden's J grows with each level whose calibrated P exceeds the prevalence (0.308): all
    # levels from 0.4 up are called positive, so the threshold is level 0.4's score.
    youden = _sigmoid(_logit(0.4) / 2 + 1.5)
    assert choose_threshold(y, s) == pytest.approx(youden)
    assert choose_threshold(y, s, rule="youden") == pytest.approx(youden)
    assert choose_threshold(y, s, rule="balanced") == 0.5
    platt = choose_threshold(y, s, rule="platt")
    assert platt == pytest.approx(_sigmoid(1.5), abs=2e-3)
    # ... the score where the validation-fitted Platt posterior is 0.5:
    calibration = prevalence.fit_calibration(y, s)
    assert calibration.posterior(np.array([platt]))[0] == pytest.approx(0.5)
    # Youden sits lower on skewed, class-weighted scores: there the calibrated P is 0.4.
    assert platt > youden + 0.03
    assert calibration.posterior(np.array([youden]))[0] == pytest.approx(0.4, abs=2e-3)
    # Without groups, worst_group is Youden's J (one group: balanced accuracy = (J + 1) / 2).
    assert rule_thresholds(y, s) == pytest.approx({"youden": youden, "balanced": 0.5,
                                                    "platt": platt, "worst_group": youden})


def test_balanced_does_not_depend_on_the_scores():
    for scores in (np.linspace(0, 0.2, 6), np.linspace(0.8, 1, 6)):
        assert choose_threshold(np.array([0, 1, 0, 1, 0, 1]), scores, rule="balanced") == 0.5


@pytest.mark.parametrize("rule", THRESHOLD_RULES)
def test_a_target_sensitivity_wins_over_every_rule(rule):
    y, s = _skewed()
    # Positives per level from the top: 45, 40, 35, 30, 50, 40 of 400: 0.55 needs level 0.4
    # (200/400 = 0.5 at level 0.5, 240/400 = 0.6 at 0.4).
    at_target = _sigmoid(_logit(0.4) / 2 + 1.5)
    assert choose_threshold(y, s, target_sensitivity=0.55, rule=rule) == pytest.approx(at_target)
    threshold, method = operating_threshold(y, s, rule, 0.55)
    assert threshold == pytest.approx(at_target) and method == "sensitivity>=0.55"
    assert operating_threshold(y, s, rule)[1] == rule


def test_a_bad_rule_name_is_one_config_error_line():
    with pytest.raises(ConfigError, match="^threshold rule 'median' is not one of youden, "
                                          "balanced, platt, worst_group$"):
        choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), rule="median")
    with pytest.raises(ConfigError, match="threshold rule"):
        operating_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "Youden")


def test_platt_without_a_fit_falls_back_to_youden():
    # Scores that fall with the positive class have no Platt slope > 0.
    y, s = np.array([1, 1, 1, 0, 0, 0]), np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert rule_thresholds(y, s)["platt"] is None
    threshold, method = operating_threshold(y, s, "platt")
    assert (threshold, method) == (choose_threshold(y, s), "youden")


def test_rates_and_the_rules_block_by_hand():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 0, 0, 0])
    s = np.array([0.9, 0.8, 0.6, 0.3, 0.7, 0.55, 0.1, 0.2, 0.4, 0.45])
    # At 0.5: TP 3, FN 1, FP 2, TN 4.
    assert rates_at(y, s, 0.5) == pytest.approx({"accuracy": 0.7, "sensitivity": 0.75,
                                                 "specificity": 4 / 6,
                                                 "balanced_accuracy": (0.75 + 4 / 6) / 2})
    block = threshold_rules_block({"youden": 0.6, "balanced": 0.5, "platt": None}, "test", y, s)
    assert set(block) == {"youden", "balanced", "platt"}
    # At 0.6: TP 3 (.9 .8 .6), FP 1 (.7): accuracy 8/10.
    assert block["youden"] == {"threshold": 0.6, "test": pytest.approx(
        {"accuracy": 0.8, "balanced_accuracy": (0.75 + 5 / 6) / 2, "sensitivity": 0.75,
         "specificity": 5 / 6})}
    assert block["platt"] == {"threshold": None, "test": None}


def test_the_model_card_says_each_rule_in_words():
    words = {"youden": "Youden's J (sensitivity + specificity - 1) maximised on validation",
             "balanced": "the class-balanced rule: 0.5",
             "platt": "Platt scaling fitted on validation: the score where the calibrated "
                      "P(positive) is 0.5",
             "worst_group": "the worst-group rule: the threshold with the highest lowest "
                            "balanced accuracy over validation's groups"}
    for method, text in words.items():
        card = model_card(trial(["val", "test"], threshold_method=method), SUMMARY)
        assert f"P(pneumonia) >= 0.4000, chosen by {text}" in card
    target = model_card(trial(["val", "test"], threshold_method="sensitivity>=0.9"), SUMMARY)
    assert "the highest threshold reaching sensitivity 0.9 on validation" in target
    for method in THRESHOLD_RULES:
        assert target_sensitivity_of({"threshold_method": method}) is None


@pytest.mark.parametrize("command", ["train", "compare"])
def test_the_cli_offers_the_rules(command):
    parser = cli.build_parser()
    base = {"train": ["train", "--data", "d", "--model", "SmallCNN", "--output", "o"],
            "compare": ["compare", "--trials", "t", "--output", "o"]}[command]
    assert parser.parse_args(base).threshold_rule == "youden"
    for rule in THRESHOLD_RULES:
        assert parser.parse_args([*base, "--threshold-rule", rule]).threshold_rule == rule
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--threshold-rule", "median"])


def test_the_ensembles_threshold_follows_the_rule(tmp_path: Path):
    out = tmp_path / "report"
    summary = compare(three_trials(tmp_path), out, threshold_rule="balanced")
    assert summary["ensemble"]["threshold"] == 0.5
    assert summary["ensemble"]["threshold_method"] == "balanced"
    assert "top 2 on val_roc_auc), threshold 0.5 (the balanced rule). Its members" in (
        out / "report.md").read_text()
    test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    # Test mean [.1, .525, .525, .7, .8, .9], labels [0, 0, 0, 1, 1, 1]: at 0.5 two false
    # positives; at Youden's 0.7 (val's perfect split) none.
    assert test["threshold"] == 0.5 and test["accuracy"] == pytest.approx(4 / 6)
    rules = test["threshold_rules"]
    assert set(rules) == set(THRESHOLD_RULES)
    assert rules["youden"]["threshold"] == pytest.approx(0.7)
    # The members' predictions.csv have no group column (as older ones): one group, Youden's.
    assert rules["worst_group"]["threshold"] == pytest.approx(0.7)
    assert rules["youden"]["test"]["accuracy"] == pytest.approx(1.0)
    assert rules["balanced"]["test"]["specificity"] == pytest.approx(1 / 3)
    with pytest.raises(ConfigError, match="threshold rule"):
        compare(three_trials(tmp_path / "again"), tmp_path / "r2", threshold_rule="median")


def _two_groups(b_size: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Group a (40 rows) is separated perfectly at 0.70; group b (``b_size`` rows) scores
    lower throughout, its positives at 0.40.. above its negatives at 0.10...
    Pooled Youden's J is best at 0.70 (0.8: all of a's positives, none of its negatives) and
    leaves b at balanced accuracy 0.5. At 0.42 b calls 3 of its 5 positives (0.8) and a keeps
    10 of 20 negatives (0.75), the best lowest: at 0.41 a keeps 9 (0.725), at 0.43 b calls 2
    (0.7)."""
    half = b_size // 2
    y = np.array([1] * 20 + [0] * 20 + [1] * half + [0] * half)
    s = np.concatenate([np.arange(70, 90) / 100, 0.2 + 0.024 * np.arange(20),
                        np.arange(40, 40 + half) / 100, np.arange(10, 10 + half) / 100])
    groups = np.array(["a"] * 40 + ["b"] * b_size)
    return y, s, groups


def test_worst_group_trades_pooled_j_for_the_worst_group():
    y, s, groups = _two_groups()
    youden = choose_threshold(y, s, rule="youden", groups=groups)  # youden ignores groups
    worst = choose_threshold(y, s, rule="worst_group", groups=groups)
    assert (youden, worst) == pytest.approx((0.70, 0.42))
    assert worst_group_accuracy(y, s, youden, groups) == pytest.approx(0.5)
    assert worst_group_accuracy(y, s, worst, groups) == pytest.approx(0.75)
    assert worst_group_accuracy(y, s, 0.41, groups) == pytest.approx(0.725)
    # ... paid for with pooled balanced accuracy: (23/25 + 15/25) / 2 = 0.76 vs 0.9 at Youden's.
    assert rates_at(y, s, worst)["balanced_accuracy"] == pytest.approx(0.76)
    assert rates_at(y, s, youden)["balanced_accuracy"] == pytest.approx(0.9)
    assert rule_thresholds(y, s, groups)["worst_group"] == pytest.approx(0.42)
    assert operating_threshold(y, s, "worst_group", groups=groups) == (
        pytest.approx(0.42), "worst_group")
    # A target sensitivity still wins: 0.8 is reached first at 0.70.
    assert choose_threshold(y, s, 0.8, "worst_group", groups) == pytest.approx(0.70)


def test_worst_group_without_groups_or_with_small_groups_is_youden():
    y, s, groups = _two_groups(b_size=MIN_GROUP_SIZE - 2)  # b too small to decide on
    youden = choose_threshold(y, s)
    assert choose_threshold(y, s, rule="worst_group", groups=groups) == youden
    assert choose_threshold(y, s, rule="worst_group") == youden
    rng = np.random.default_rng(0)
    for _ in range(5):
        y, s = rng.integers(0, 2, 60), rng.random(60).round(2)  # many ties
        assert choose_threshold(y, s, rule="worst_group") == choose_threshold(y, s)
    with pytest.raises(DataError, match="groups shape"):
        choose_threshold(y, s, rule="worst_group", groups=np.array(["a"] * 3))


def test_a_one_class_group_counts_its_own_recall():
    # Group a: positives 0.70..0.89, negatives 0.20..0.656. Group c: 12 negatives only,
    # 0.72..0.83, among a's positives: c's value is its specificity.
    y = np.array([1] * 20 + [0] * 20 + [0] * 12)
    s = np.concatenate([np.arange(70, 90) / 100, 0.2 + 0.024 * np.arange(20),
                        np.arange(72, 84) / 100])
    groups = np.array(["a"] * 40 + ["c"] * 12)
    assert choose_threshold(y, s) == pytest.approx(0.70)  # c: specificity 0
    assert worst_group_accuracy(y, s, 0.70, groups) == 0.0
    # At 0.81: c keeps 9 of 12 negatives (0.75), a calls 9 of 20 positives (0.725); at 0.82
    # c 10/12 but a 8/20 (0.70); at 0.80 c 8/12 (0.667).
    assert choose_threshold(y, s, rule="worst_group", groups=groups) == pytest.approx(0.81)
    assert worst_group_accuracy(y, s, 0.81, groups) == pytest.approx(0.725)


def test_val_groups_are_clusters_and_sites_and_reproducible():
    # Ten copies each of four exposures of one gradient: the clusters find them.
    ramp = np.broadcast_to(np.linspace(0, 40, 16)[None, None, :, None], (10, 16, 16, 1))
    images = np.concatenate([level + ramp for level in (30, 90, 160, 200)]).astype(np.uint8)
    groups = shift.val_groups(images)
    assert len(set(groups)) == 4
    assert all(len(set(groups[i:i + 10])) == 1 for i in range(0, 40, 10))
    assert np.array_equal(groups, shift.val_groups(images.copy()))
    one_site = shift.val_groups(images, np.array(["x"] * 40, dtype=object))
    assert np.array_equal(one_site, groups)  # a single site adds nothing
    sites = np.array(["x", "y"] * 20, dtype=object)
    both = shift.val_groups(images, sites)
    assert set(both) == {f"{site}/{g}" for site, g in zip(sites, groups, strict=True)}
    assert len(set(both)) == 8


def test_the_ensembles_worst_group_threshold_uses_the_members_groups(tmp_path: Path):
    y, s, groups = _two_groups()
    root = tmp_path / "trials"
    dirs = [make_trial(root, name, {"val": s, "test": s}, labels={"val": y, "test": y})
            for name in ("A", "B")]
    # (Without the column the rows are one group: test_the_ensembles_threshold_follows_the_rule.)
    for trial_dir in dirs:
        path = trial_dir / "eval" / "val" / "predictions.csv"
        table = pd.read_csv(path)
        table[GROUP_COLUMN] = groups
        table.to_csv(path, index=False)
    out = compare(dirs, tmp_path / "report", threshold_rule="worst_group")
    assert out["ensemble"]["threshold"] == pytest.approx(0.42)
    assert out["ensemble"]["threshold_method"] == "worst_group"
    val = pd.read_csv(tmp_path / "report" / "ensemble" / "val" / "predictions.csv")
    assert val[GROUP_COLUMN].tolist() == groups.tolist()
    test = json.loads((tmp_path / "report" / "ensemble" / "test" / "metrics.json").read_text())
    assert test["threshold_rules"]["worst_group"]["threshold"] == pytest.approx(0.42)
    assert test["threshold_rules"]["youden"]["threshold"] == pytest.approx(0.70)
    assert "the worst-group rule" in (tmp_path / "report" / "report.md").read_text()
