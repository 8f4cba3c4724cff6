"""The whole pipeline through kfp.local on a small real subset (two models, one epoch)."""

from __future__ import annotations

import json
import re

import numpy as np

from bench.run import accuracy
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
        "target_data": str(tmp_path / "target.npz"),
    })
    report = run_local(params, tmp_path / "root")
    run_dir = report.parent.parent  # <root>/<run>/refit/report
    html = report.read_text()
    for name in MODELS:
        assert name in html
    # Per model: curves + 3 splits (val, test, test_shifted) x (confusion, ROC, PR, reliability,
    # robustness, Grad-CAM); the ensemble's 3 x 5 (no curves, no Grad-CAM); bar chart, 3 ROC
    # overlays, 3 robustness overlays, training curves side by side.
    assert html.count("data:image/png;base64,") == len(MODELS) * (1 + 3 * 6) + 3 * 5 + 8

    # One tune -> train -> evaluate chain per model, each with real outputs.
    val_auc, shifted_auc = {}, {}
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
        shifted_auc[info["model_name"]] = json.loads(
            (iteration / "evaluate" / "evaluation" / "test_shifted" / "metrics.json")
            .read_text())["roc_auc"]
        assert not list((iteration / "tune").rglob("checkpoint*"))
    assert sorted(val_auc) == sorted(MODELS)

    # The best model has the highest validation AUC, unless candidates are tied there (paired
    # bootstrap CI covers 0): then compare's summary names the tied and the one with the better
    # shift-proxy AUC wins.
    best_info = json.loads((run_dir / "compare" / "best_model" / "model_info.json").read_text())
    leader = sorted(val_auc, key=lambda name: (-val_auc[name], name))[0]
    expected = best_info["model_name"]
    tie = re.search(r"Tied on validation AUC: (.+?) \(paired.*?the tie is broken on "
                    r"test_shifted_roc_auc \(.*?\): ([\w-]+)\.",
                    (run_dir / "compare" / "summary").read_text())
    if tie:
        tied = tie.group(1).split(", ")
        assert leader in tied and expected == tie.group(2) and expected in tied
        assert all(shifted_auc[expected] >= shifted_auc[name] for name in tied
                   if name in shifted_auc and expected in shifted_auc)
    else:
        assert expected == leader
    executor = json.loads((run_dir / "compare" / "executor_output.json").read_text())
    best_artifact = executor["artifacts"]["best_model"]["artifacts"][0]
    assert best_artifact["metadata"]["model_name"] == expected

    # make bench's accuracy table reads the same run: a row per model, and the pick,
    # re-evaluated from compare/best_model, reproduces what its own evaluate step measured.
    table = accuracy(run_dir, tmp_path / "bench")
    rows = {row["model"]: row for row in table["models"]}
    assert sorted(rows) == sorted(MODELS)
    assert rows[expected]["val"]["auc"] == val_auc[expected]
    assert table["pick"]["model"] == expected
    for split in ("val", "test", "test_shifted"):
        assert abs(table["pick"][split]["auc"] - rows[expected][split]["auc"]) < 1e-6
        assert abs(table["pick"][split]["acc"] - rows[expected][split]["acc"]) < 1e-6
        # The same corruption suite on the same images gives the same robust AUC.
        assert table["pick"][split]["robust_auc"] is not None
        assert abs(table["pick"][split]["robust_auc"] - rows[expected][split]["robust_auc"]) < 1e-6
    assert table["pick"]["val"]["n"] == table["pick"]["test"]["n"] == 120

    # The shipped model: the pick refit on train + test_shifted, scored only where it did not
    # learn, beside the pick as measured in the report's refit section.
    shipped = json.loads((run_dir / "refit" / "model" / "model_info.json").read_text())
    assert shipped["model_name"] == expected
    assert shipped["train_splits"] == ["train", "test_shifted"]
    assert shipped["refit"]["scores"]["measured"]["val"]["roc_auc"] == val_auc[expected]
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
    assert champion_info["train_splits"] == shipped["train_splits"]  # the shipped model
    assert "## Champion vs challenger" in (entry / "model_card.md").read_text()

    # The shipped model predicted the target site's images and estimated their prevalence.
    target = run_dir / "predict" / "predictions"
    assert len((target / "predictions.csv").read_text().splitlines()) == 51
    assert shipped["calibration"] is not None, val_auc
    estimate = json.loads((target / "prevalence.json").read_text())
    assert estimate["n"] == 50 and estimate["ci"][0] <= estimate["estimate"] <= estimate["ci"][1]
    assert estimate["validation_prevalence"] == shipped["calibration"]["prior"]
