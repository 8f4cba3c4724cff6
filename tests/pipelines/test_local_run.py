"""The whole pipeline through kfp.local on a small real subset (two models, one epoch)."""

from __future__ import annotations

import json
import re

import numpy as np

from bench.run import accuracy
from lungxray.artifacts import trained_splits
from pipelines.local import run_local
from pipelines.profiles import resolve_params

# SmallCNN learns something in one epoch on 120 images, so the pick has calibratable
# validation scores and the target-prevalence step has an estimate to make.
MODELS = ["VGG16", "SmallCNN"]


def test_pipeline_runs_end_to_end_locally(shared_npz, tmp_path):
    with np.load(shared_npz) as npz:  # a "target site": 50 unlabelled val images
        np.savez(tmp_path / "target.npz", images=npz["val_images"][:50])
    params = resolve_params("quick", {
        "data_source": str(shared_npz), "weights": "none", "base_models": MODELS,
        "image_size": 32, "max_per_split": 120, "epochs": 1, "tune_trials": 1, "tune_epochs": 1,
        "champion_uri": str(tmp_path / "champion"), "robustness_samples": 40,
        "target_data": str(tmp_path / "target.npz"), "shift_folds": 2,
    })
    report = run_local(params, tmp_path / "root")
    run_dir = report.parent.parent  # <root>/<run>/refit/report
    html = report.read_text()
    for name in MODELS:
        assert name in html
    # Per model: curves + 3 splits (val, test, test_shifted) x (confusion, ROC, PR, reliability,
    # robustness, Grad-CAM) + shift_folds' confusion, ROC, PR, reliability; the ensemble's 3 x 5
    # + 4 (no curves, no Grad-CAM); bar chart, 4 ROC overlays, 3 robustness overlays, training
    # curves side by side.
    assert html.count("data:image/png;base64,") == len(MODELS) * (1 + 3 * 6 + 4) + 3 * 5 + 4 + 9
    assert "<h2>Shift folds</h2>" in html

    # One tune -> train -> evaluate chain per model, each with real outputs.
    val_auc, folds_auc = {}, {}
    for iteration in sorted(run_dir.glob("for-loop-*-iteration-*")):
        info = json.loads((iteration / "train" / "model" / "model_info.json").read_text())
        best = json.loads((iteration / "tune" / "tuning" / "best_hparams.json").read_text())
        assert best["model_name"] == info["model_name"] and best["trials"] == 1
        val = json.loads((iteration / "evaluate" / "evaluation" / "val" / "metrics.json")
                         .read_text())
        test = json.loads((iteration / "evaluate" / "evaluation" / "test" / "metrics.json")
                          .read_text())
        assert val["n"] == 120 and test["n"] == 120
        assert val["threshold"] == test["threshold"] == info["threshold"]
        val_auc[info["model_name"]] = val["roc_auc"]
        # crossfold: every image of train + test_shifted predicted once, by the recipe trained
        # on the other fold; evaluate carries it as the split shift_folds.
        folds = json.loads((iteration / "evaluate" / "evaluation" / "shift_folds" /
                            "metrics.json").read_text())
        pool = json.loads((run_dir / "preprocess" / "dataset" / "manifest.json").read_text())
        assert folds["n"] == pool["splits"]["train"]["n"] + pool["splits"]["test_shifted"]["n"]
        assert folds["folds"]["folds"] == 2 and folds["model_name"] == info["model_name"]
        folds_auc[info["model_name"]] = folds["roc_auc"]
        assert not list((iteration / "tune").rglob("checkpoint*"))
    assert sorted(val_auc) == sorted(MODELS)

    # The pick (a single model or the ensemble candidate) has the highest validation AUC,
    # unless candidates are tied there (paired bootstrap CI covers 0): then compare's summary
    # names the tied and the one with the better out-of-fold AUC on the shift folds wins.
    best_info = json.loads((run_dir / "compare" / "best_model" / "model_info.json").read_text())
    expected = best_info["model_name"]
    executor = json.loads((run_dir / "compare" / "executor_output.json").read_text())
    best_artifact = executor["artifacts"]["best_model"]["artifacts"][0]
    assert best_artifact["metadata"]["model_name"] == expected
    pick_val_auc = best_artifact["metadata"]["val_roc_auc"]
    tie = re.search(r"Tied on validation AUC: (.+?) \(paired.*?the tie is broken on "
                    r"shift_folds_roc_auc \(.*?\): ([\w-]+)\.",
                    (run_dir / "compare" / "summary").read_text())
    if tie:
        tied = tie.group(1).split(", ")
        assert expected == tie.group(2) and expected in tied
        assert all(folds_auc[expected] >= folds_auc[name] for name in tied
                   if name in folds_auc and expected in folds_auc)
    else:
        assert pick_val_auc == max([pick_val_auc, *val_auc.values()])
        assert expected in val_auc or expected.startswith("Ensemble")

    # make bench's accuracy table reads the same run: a row per model, and the pick,
    # re-evaluated from compare/best_model, reproduces what compare measured (its evaluate
    # step's numbers for a single model).
    table = accuracy(run_dir, tmp_path / "bench")
    rows = {row["model"]: row for row in table["models"]}
    assert sorted(rows) == sorted(MODELS)
    assert table["pick"]["model"] == expected
    assert abs(table["pick"]["val"]["auc"] - pick_val_auc) < 1e-6
    for split in ("val", "test", "test_shifted"):
        # The same corruption suite on the same images gives the same robust AUC.
        assert table["pick"][split]["robust_auc"] is not None
        if expected in rows:  # an ensemble pick has no evaluate step of its own
            for key in ("auc", "acc", "robust_auc"):
                assert abs(table["pick"][split][key] - rows[expected][split][key]) < 1e-6
    assert table["pick"]["val"]["n"] == table["pick"]["test"]["n"] == 120

    # The shipped model: the pick refit on train + test_shifted, scored only where it did not
    # learn, beside the pick as measured in the report's refit section.
    shipped = json.loads((run_dir / "refit" / "model" / "model_info.json").read_text())
    assert shipped["model_name"] == expected
    assert trained_splits(shipped) == {"train", "test_shifted"}
    assert abs(shipped["refit"]["scores"]["measured"]["val"]["roc_auc"] - pick_val_auc) < 1e-6
    assert sorted(table["shipped"]) == ["model", "test", "threshold", "val"]
    assert "Refit: the shipped model" in html
    refit_step = json.loads((run_dir / "refit" / "executor_output.json").read_text())
    logged = refit_step["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert logged["refit"] == 1.0 and logged["refit_added_images"] > 0
    assert {"measured_test_shifted_roc_auc", "refit_val_roc_auc", "refit_test_roc_auc"} <= set(
        logged) and "refit_test_shifted_roc_auc" not in logged  # it learnt those images

    # No champion yet: challenge says promote, and promote (under dsl.If) makes the pick the
    # champion, with the model card and the decision beside it.
    decision = json.loads((run_dir / "challenge" / "decision" / "decision.json").read_text())
    assert decision["decision"] == "promote" and decision["reason"] == "no champion yet"
    home = tmp_path / "champion"
    record = json.loads((home / "champion.json").read_text())
    assert record["run_id"] == decision["run_id"] and record["model_name"] == expected
    entry = home / record["history"]
    champion_info = json.loads((entry / "model" / "model_info.json").read_text())
    assert trained_splits(champion_info) == trained_splits(shipped)  # the shipped model
    assert champion_info["refit"] == shipped["refit"]
    assert "## Champion vs challenger" in (entry / "model_card.md").read_text()

    # The shipped model predicted the target site's images and estimated their prevalence.
    target = run_dir / "predict" / "predictions"
    assert len((target / "predictions.csv").read_text().splitlines()) == 51
    assert shipped["calibration"] is not None, val_auc
    estimate = json.loads((target / "prevalence.json").read_text())
    assert estimate["n"] == 50 and estimate["ci"][0] <= estimate["estimate"] <= estimate["ci"][1]
    assert estimate["validation_prevalence"] == shipped["calibration"]["prior"]
