"""The crossfold component: off, a record saying so; on, the out-of-fold split that evaluate
adds to the model's evaluation, and its AUCs logged."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Metrics, Model

from tests.component_helpers import artifact, run_evaluate


def _run(carved: Path, pick: Path, tmp_path: Path, shift_folds: int) -> dict:
    from components.crossfold import crossfold

    outputs = {"folds": artifact(Artifact, tmp_path, f"folds{shift_folds}"),
               "metrics": artifact(Metrics, tmp_path, f"metrics{shift_folds}")}
    crossfold(dataset=Dataset(name="dataset", uri=str(carved)),
              model=Model(name="model", uri=str(pick)), shift_folds=shift_folds, epochs=1,
              **outputs)
    return outputs


def test_off_writes_only_a_record_and_evaluate_adds_nothing(carved, pick, tmp_path):
    out = _run(carved, pick, tmp_path, 0)
    folds = Path(out["folds"].path)
    assert [p.name for p in folds.iterdir()] == ["folds.json"]
    assert json.loads((folds / "folds.json").read_text()) == {"folds": 0}
    assert out["metrics"].metadata == {}


def test_on_the_folds_split_reaches_the_evaluation_and_the_metrics(carved, pick, tmp_path):
    out = _run(carved, pick, tmp_path, 2)
    folds = Path(out["folds"].path)
    record = json.loads((folds / "folds.json").read_text())
    assert record["folds"] == 2 and len(record["per_fold"]) == 2
    logged = out["metrics"].metadata
    assert set(logged) == {"shift_folds_roc_auc", "shift_folds_worst_fold_roc_auc"}
    evaluated = run_evaluate(Model(name="model", uri=str(pick)),
                             Dataset(name="dataset", uri=str(carved)), tmp_path, "on",
                             folds=out["folds"], robustness=False)
    evaluation = Path(evaluated["evaluation"].path)
    split = json.loads((evaluation / "shift_folds" / "metrics.json").read_text())
    assert split["folds"] == record
    assert evaluated["metrics"].metadata["shift_folds_roc_auc"] == logged["shift_folds_roc_auc"]
    assert "test_shifted_roc_auc" in evaluated["metrics"].metadata
