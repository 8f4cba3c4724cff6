"""bench.folds: its tables pool every held-out image once and take each rule's threshold from
the fold's own model."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from bench import folds


def _run(fold: int, y: list[int], p: list[float], site: list[str], threshold: float) -> dict:
    return {"setup": "s", "variant": "v", "seed": 1, "fold": fold, "folds": 2, "val_auc": 0.9,
            "thresholds": {"youden": threshold, "balanced": 0.5}, "y_true": y,
            "prob_pneumonia": p, "site": site}


def test_out_of_fold_auc_pools_the_folds_and_rules_use_each_folds_threshold():
    first = _run(1, [0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], ["a", "b", "a", "b"], 0.3)
    second = _run(2, [0, 1, 0, 1], [0.2, 0.7, 0.3, 0.8], ["a", "a", "b", "b"], 0.75)
    table, rules = folds.summary([first, second], {("s", "v", 1): 0.5})
    y = np.r_[first["y_true"], second["y_true"]]
    p = np.r_[first["prob_pneumonia"], second["prob_pneumonia"]]
    row = table.loc[("s", "v")]
    assert row["out-of-fold AUC"] == pytest.approx(roc_auc_score(y, p))
    site_a = np.r_[first["site"], second["site"]] == "a"
    assert row["out-of-fold AUC a"] == pytest.approx(roc_auc_score(y[site_a], p[site_a]))
    assert row["worst fold AUC"] == pytest.approx(0.75)  # the first fold; the second is 1.0
    assert row["carve test_shifted AUC"] == 0.5
    youden = [balanced_accuracy_score(r["y_true"], np.asarray(r["prob_pneumonia"]) >= t)
              for r, t in ((first, 0.3), (second, 0.75))]
    got = rules.loc[("s", "v", "youden")]
    assert got["worst fold bal. acc."] == pytest.approx(min(youden))
    assert got["mean fold bal. acc."] == pytest.approx(np.mean(youden))
