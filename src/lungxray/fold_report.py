"""The shift folds' evidence in the comparison report and the Kubeflow metrics: what
:mod:`lungxray.crossfold` wrote into the ``shift_folds`` split's ``metrics.json``; computes
nothing new (and imports no TensorFlow)."""

from __future__ import annotations

from typing import Any

from lungxray.artifacts import FOLDS_KEY
from lungxray.artifacts import FOLDS_SPLIT as SPLIT

FOLD_NOTE = ("Shift folds: each model's recipe trained once per fold on the other "
             "image-statistics folds of train + test_shifted, predicting the fold it left out. "
             "Per threshold "
             "rule: the balanced accuracy each fold model reaches at its own validation "
             "threshold on the fold it never saw, mean / worst fold.")


def table(candidates: list[Any], order: list[str]) -> tuple[list[str], list[list[str]]]:
    """The report's shift-folds table: per model with folds (in ``order``), the out-of-fold,
    mean and worst fold AUC and each rule's mean / worst fold balanced accuracy; empty when
    no model ran folds."""
    found = {c.model_name: c.splits[SPLIT].metrics for c in candidates
             if SPLIT in c.splits and FOLDS_KEY in c.splits[SPLIT].metrics}
    if not found:
        return [], []
    rules = list(next(iter(found.values()))[FOLDS_KEY].get("rules") or {})
    header = ["model", "folds", "out-of-fold AUC", "mean fold AUC", "worst fold AUC",
              *(f"{rule} bal. acc." for rule in rules)]

    def num(value: Any) -> str:
        return "—" if value is None else f"{float(value):.4f}"

    body = []
    for name in [n for n in order if n in found]:
        block = found[name][FOLDS_KEY]
        body.append([name, str(block["folds"]), num(found[name].get("roc_auc")),
                     num(block.get("mean_fold_roc_auc")), num(block.get("worst_fold_roc_auc")),
                     *(f"{num(block['rules'].get(r, {}).get('mean'))} / "
                       f"{num(block['rules'].get(r, {}).get('worst'))}" for r in rules)])
    return header, body


def scalar_metrics(result: dict | None) -> dict[str, float]:
    """What the pipeline logs: the out-of-fold AUC and the worst fold's."""
    if not result:
        return {}
    block = result[FOLDS_KEY]
    found = {f"{SPLIT}_roc_auc": result.get("roc_auc"),
             f"{SPLIT}_worst_fold_roc_auc": block.get("worst_fold_roc_auc")}
    return {k: float(v) for k, v in found.items() if v is not None}

