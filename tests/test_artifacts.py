"""lungxray.artifacts: one set of file names and one metric table, and the modules agree with it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungxray import artifacts, metrics
from lungxray.artifacts import METRICS

SRC = Path(__file__).resolve().parents[1] / "src" / "lungxray"
GROUPS = {"CI_METRICS": artifacts.CI_METRICS, "AT_HALF": artifacts.AT_HALF,
          "EVAL_METRICS": artifacts.EVAL_METRICS, "EVAL_CI_METRICS": artifacts.EVAL_CI_METRICS,
          "TABLE_METRICS": artifacts.TABLE_METRICS,
          "HEADLINE_METRICS": artifacts.HEADLINE_METRICS, "BAR_METRICS": artifacts.BAR_METRICS}


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_every_group_names_metrics_of_the_table_once(group):
    names = GROUPS[group]
    assert len(set(names)) == len(names)
    assert set(names) <= set(METRICS)


def test_direction_and_selectability():
    lower, selectable = artifacts.LOWER_IS_BETTER, artifacts.SELECTABLE
    assert lower == {"brier", "ece", "robust_auc_drop", "latency_ms"}
    assert {"roc_auc", "brier", "robust_auc", "accuracy_at_0.5"} <= selectable
    assert not {"threshold", "n", "prevalence", "prevalence_em", "deploy_ppv"} & selectable
    assert selectable <= set(artifacts.TABLE_METRICS)


def test_labels_per_place():
    assert artifacts.label("precision") == "PPV (precision)"  # evaluate
    assert METRICS["precision"].short == "PPV"  # the comparison's headline table
    assert METRICS["brier"].card == "Brier score (lower is better)"  # the model card
    assert artifacts.label("balanced_accuracy") == "balanced_accuracy"
    assert artifacts.label("not_a_metric") == "not_a_metric"


def test_metrics_json_keys_follow_the_groups():
    y = np.array([0, 0, 0, 1, 1, 1])
    p = np.array([0.1, 0.2, 0.6, 0.4, 0.8, 0.9])
    result = metrics.compute_metrics(y, np.column_stack([1 - p, p]), ["a", "b"], 0.5,
                                     n_bootstrap=20)
    assert tuple(result["ci"]) == artifacts.CI_METRICS
    assert tuple(result["at_0.5"])[:len(artifacts.AT_HALF)] == artifacts.AT_HALF


def _string_constants(module: str) -> dict[str, str]:
    """Module-level NAME = "text" assignments, read without importing (train imports Keras)."""
    tree = ast.parse((SRC / f"{module}.py").read_text())
    return {node.targets[0].id: node.value.value for node in tree.body
            if isinstance(node, ast.Assign) and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name) and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)}


@pytest.mark.parametrize(("module", "names"), [
    ("train", {"MODEL_FILE", "INFO_FILE", "HISTORY_FILE"}),
    ("tune", {"BEST_FILE"}),
    ("data", {"MANIFEST", "FILES_INDEX"}),
    ("evaluate", {"METRICS_FILE", "PREDICTIONS_FILE", "ENSEMBLE_FILE", "MEMBERS_DIR",
                  "REPORT_FILE", "ROBUSTNESS_FILE", "ROC_FILE"}),
    ("predictor", {"ENSEMBLE_FILE", "MEMBERS_DIR", "MODEL_FILE"}),
    ("evaluation_report", {"REPORT_FILE"}),
])
def test_no_step_spells_a_shared_file_name_itself(module, names):
    """train, tune, data and evaluate take their file names from lungxray.artifacts (read
    without importing them: they import Keras)."""
    assert not names & set(_string_constants(module))


def test_writers_use_the_shared_names():
    from lungxray import champion, datareport, report, selection

    assert datareport.HTML_FILE == artifacts.DATA_REPORT_HTML
    assert champion.DECISION_FILE == artifacts.DECISION_FILE
    assert champion.RECORD_FILE == artifacts.CHAMPION_FILE
    assert selection.SELECT_SPLIT == artifacts.VAL_SPLIT
    assert report.compare.__module__ == "lungxray.report"


def test_artifacts_is_import_light():
    code = ("import sys, lungxray.artifacts, lungxray.pages; "
            "print(sorted(m for m in ('numpy', 'pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_split_order():
    names = ["test_shifted", "external", "test", "val"]
    assert sorted(names, key=artifacts.split_order) == ["val", "test", "external",
                                                        "test_shifted"]


def test_trained_splits_names_what_a_refit_learnt_from():
    assert artifacts.trained_splits({}) == {"train"}
    assert artifacts.trained_splits({"train_splits": ["train", "test_shifted"]}) == {
        "train", "test_shifted"}
    ensemble = {"ensemble": True, "refit": {"added_splits": {"test_shifted": 40}}}
    assert artifacts.trained_splits(ensemble) == {"train", "test_shifted"}
    assert artifacts.trained_splits({"refit": {"refit": False, "reason": "off"}}) == {"train"}
