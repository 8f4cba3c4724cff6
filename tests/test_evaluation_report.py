"""An evaluation rendered from its results alone: the logged scalars (with CI bounds), the
Markdown summary and the self-contained page, undefined values shown as a dash, never invented."""

from __future__ import annotations

from lungxray import evaluation_report

RESULTS = {
    "val": {"model_name": "VGG16 <b>", "n": 50, "roc_auc": 0.9, "accuracy": 0.8,
            "sensitivity": None, "latency_ms": 1.234, "ci": {"roc_auc": [0.85, 0.95]},
            "gradcam": None},
    "test": {"model_name": "VGG16 <b>", "n": 60, "roc_auc": 0.8, "accuracy": 0.75,
             "sensitivity": 0.7, "ci": {}, "gradcam": None,
             "at_0.5": dict.fromkeys(evaluation_report.AT_HALF, 0.5),
             "tta": {"views": ["a", "b"], "roc_auc": 0.82, "roc_auc_plain": 0.8, "gain": 0.02}},
}


def test_scalars_keep_defined_values_and_ci_bounds_only():
    scalars = evaluation_report.scalar_metrics(RESULTS)
    assert scalars["val_roc_auc"] == 0.9 and scalars["test_sensitivity"] == 0.7
    assert (scalars["val_roc_auc_ci_lo"], scalars["val_roc_auc_ci_hi"]) == (0.85, 0.95)
    assert "val_sensitivity" not in scalars and "test_roc_auc_ci_lo" not in scalars


def test_values_are_formatted_with_their_ci_or_a_dash():
    assert evaluation_report.format_value(RESULTS["val"], "roc_auc") == "0.9000 [0.8500, 0.9500]"
    assert evaluation_report.format_value(RESULTS["val"], "sensitivity") == "—"
    assert evaluation_report.format_value(RESULTS["val"], "latency_ms") == "1.23"


def test_summary_and_page_show_every_split_and_escape_the_model_name(tmp_path):
    summary = evaluation_report.describe(RESULTS)
    assert summary.startswith("# VGG16 <b>\n")
    assert "| metric | val (n=50) | test (n=60) |" in summary
    assert "| ROC AUC | 0.9000 [0.8500, 0.9500] | 0.8000 |" in summary
    assert "At threshold 0.5" in summary and "| test |" in summary  # only test has it
    assert "- **test**: Test-time augmentation (2 views" in summary
    page = evaluation_report.write_report(RESULTS, tmp_path).read_text()
    assert "<h1>VGG16 &lt;b&gt;</h1>" in page and "<b>" not in page
    assert page.count("No Grad-CAM grid") == 2 and "<h2>test</h2>" in page
