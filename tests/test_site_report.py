"""Per-site tables for the evaluation page, the comparison report and the model card: one row
per site with its CIs, cells escaped, nothing for a split of one site, and the held-out site's
estimate named as such (issue 33)."""

from __future__ import annotations

from lungxray import selection, site_report
from tests.trial_helpers import SITE_Y, site_trial

SPLIT = {"n": 10, "worst_site_auc": 0.5, "per_site": {
    "a": {"n": 5, "prevalence": 0.2, "roc_auc": 0.5, "accuracy": 0.8, "sensitivity": None,
          "specificity": 1.0, "ci": {"roc_auc": [0.25, 0.75], "specificity": [0.9, 1.0]}},
    "b|c": {"n": 5, "prevalence": 0.8, "roc_auc": 1.0, "accuracy": 1.0, "sensitivity": 1.0,
            "specificity": 1.0, "ci": {},
            "at_site_threshold": {"threshold": 0.25, "balanced_accuracy": 0.875}}}}


def test_one_row_per_site_with_its_cis_and_none_for_one_site():
    assert site_report.rows(SPLIT) == [
        ["a", "5", "0.2000", "0.5000 [0.2500, 0.7500]", "0.8000", "—", "1.0000 [0.9000, 1.0000]",
         "—"],
        ["b|c", "5", "0.8000", "1.0000", "1.0000", "1.0000", "1.0000", "0.2500: 0.8750"]]
    assert site_report.rows({"n": 10, "roc_auc": 0.9}) == []
    lines = site_report.evaluation_markdown({"val": SPLIT, "test": {"n": 3}})
    assert lines[1] == "Per site on **val** (worst-site ROC AUC 0.5000):"
    assert lines[-1].startswith("| b\\|c | 5 |")  # a '|' in a site name cannot break the table
    assert not any("test" in line for line in lines)
    page = "".join(site_report.evaluation_html({"val": SPLIT}))
    assert "<td>b|c</td>" in page and page.count("<tr>") == 3


def test_a_held_out_sites_split_is_named_as_the_off_site_estimate():
    assert site_report.split_role("test_site_nih").startswith("held-out site nih: never trained")
    assert site_report.split_role("test") is None


def test_the_model_card_of_a_run_of_several_sites(tmp_path):
    from lungxray.modelcard import model_card

    trial = selection.load_trial(site_trial(tmp_path, "Y", SITE_Y, held=False))
    card = model_card(trial, {"select_metric": "val_worst_site_auc", "select_value": 1.0,
                              "n_models": 1})
    assert "## Performance per site" in card and "On `val`:" in card
    assert "Trained and evaluated on several sites" in card
    assert "Not externally validated" not in card and "Held-out site" not in card

