"""The shift folds' table in the comparison report and their Kubeflow metrics."""

from __future__ import annotations

from types import SimpleNamespace

from lungxray import fold_report


def test_the_report_table_shows_each_model_with_folds_in_rank_order():
    def candidate(name: str, metrics: dict | None) -> SimpleNamespace:
        splits = {"shift_folds": SimpleNamespace(metrics=metrics)} if metrics else {}
        return SimpleNamespace(model_name=name, splits=splits)

    block = {"folds": 3, "mean_fold_roc_auc": 0.9, "worst_fold_roc_auc": 0.8,
             "rules": {"youden": {"mean": 0.85, "worst": 0.75},
                       "platt": {"mean": None, "worst": None}}}
    candidates = [candidate("A", {"roc_auc": 0.91, "folds": block}),
                  candidate("Ensemble-top2", {"roc_auc": 0.93}),  # averaged: no folds of its own
                  candidate("B", None)]
    header, body = fold_report.table(candidates, ["Ensemble-top2", "B", "A"])
    assert header[-2:] == ["youden bal. acc.", "platt bal. acc."]
    assert body == [["A", "3", "0.9100", "0.9000", "0.8000", "0.8500 / 0.7500", "— / —"]]
    assert fold_report.table([candidate("B", None)], ["B"]) == ([], [])
    assert fold_report.scalar_metrics({"roc_auc": 0.91, "folds": block}) == {
        "shift_folds_roc_auc": 0.91, "shift_folds_worst_fold_roc_auc": 0.8}
    assert fold_report.scalar_metrics(None) == {}
