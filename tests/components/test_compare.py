"""The compare component on two evaluated trials (one with its tuning run): the report, its
Markdown, the model card and a copy of the best model."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import HTML, Artifact, Markdown, Metrics, Model

from components.compare import compare
from tests.component_helpers import artifact


def test_compare_picks_the_best_and_writes_report_card_and_model(evaluated_trials, tmp_path):
    tuning = artifact(Artifact, tmp_path, "tuning")  # NetA was tuned, NetB was not
    Path(tuning.path).mkdir()
    (Path(tuning.path) / "best_hparams.json").write_text(
        json.dumps({"model_name": "NetA", "hparams": {"learning_rate": 1e-4}}))
    report, summary = artifact(HTML, tmp_path, "report"), artifact(Markdown, tmp_path, "summary")
    card, best = artifact(Markdown, tmp_path, "card"), artifact(Model, tmp_path, "best")
    scores = artifact(Metrics, tmp_path, "scores")
    compare(models=[m for m, _ in evaluated_trials],
            evaluations=[o["evaluation"] for _, o in evaluated_trials], tunings=[tuning],
            select_metric="val_roc_auc", report=report, summary=summary, model_card=card,
            best_model=best, metrics=scores, ensemble_k=2, threshold_rule="balanced")
    page = Path(report.path).read_text()
    assert "NetA" in page and "external (n=20" in page and "Ensemble-top2" in page
    assert Path(summary.path).read_text().startswith("# lungxray model comparison")
    assert "threshold 0.5 (the balanced rule)" in Path(summary.path).read_text()  # the ensemble's
    text = Path(card.path).read_text()
    assert "Not a medical device" in text
    assert "Evaluated on data from elsewhere: external" in text
    assert "## Robustness to acquisition shift" in text
    assert "| external | " in text  # in the prevalence table
    # Identical members tie the ensemble; the single model wins the tie (simpler).
    assert best.metadata["model_name"] == "NetA" and best.metadata["ensemble"] is False
    assert (Path(best.path) / "model.keras").is_file()
    val = json.loads((Path(evaluated_trials[0][1]["evaluation"].path) / "val" / "metrics.json")
                     .read_text())
    assert scores.metadata["best_val_roc_auc"] == val["roc_auc"]
    assert scores.metadata["n_models"] == 3
