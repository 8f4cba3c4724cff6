"""The tuning page of a small two-phase search: the plot drawn with a panel per searched value,
and one self-contained page with the choice, every trial and the spaces, every name escaped."""

from __future__ import annotations

import pandas as pd
from PIL import Image

from lungxray import tune_report

TRIALS = pd.DataFrame([
    {"phase": "head", "trial_id": "0000", "status": "COMPLETED", "score": 0.81, "epochs": 2,
     "dense_units": 128, "dropout": 0.2, "learning_rate": 1e-3, "label_smoothing": 0.0,
     "class_weighting": True},
    {"phase": "head", "trial_id": "0001", "status": "COMPLETED", "score": 0.86, "epochs": 2,
     "dense_units": 64, "dropout": 0.4, "learning_rate": 3e-3, "label_smoothing": 0.05,
     "class_weighting": False},
    {"phase": "fine_tune", "trial_id": "0000", "status": "COMPLETED", "score": 0.88,
     "epochs": 2, "unfreeze": 0.2, "fine_tune_learning_rate": 1e-5, "augment": 0.5,
     "intensity_augment": 0.0},
])
BEST = {"model_name": "VGG16<script>", "objective": "val_auc", "best_score": 0.88, "trials": 3,
        "algorithm": "hyperband", "max_trials": 2, "epochs": 2, "fine_tune_trials": 1,
        "phases": {"head": {"trials": 2, "best_score": 0.86},
                   "fine_tune": {"trials": 1, "best_score": 0.88}},
        "hparams": {"dense_units": 64, "dropout": 0.4, "unfreeze": 0.2}}


def test_the_searched_columns_come_in_trains_order_and_only_when_tried():
    columns = tune_report.hparam_columns(TRIALS)
    assert set(columns) == set(TRIALS.columns) - {"phase", "trial_id", "status", "score",
                                                  "epochs"}
    assert tune_report.hparam_columns(TRIALS[TRIALS.columns[::-1]]) == columns  # train's order
    assert "standardize" not in tune_report.hparam_columns(TRIALS.assign(standardize=None))


def test_the_plot_and_the_page_of_a_two_phase_search(tmp_path):
    plot = tmp_path / "plots" / "tuning.png"
    tune_report.plot_trials(TRIALS, plot, title="VGG16")
    with Image.open(plot) as image:  # one row for the scores, then 4 panels a row
        width, height = image.size
        assert width == 4 * 4 * 90 and height == int(3.2 * 4 * 90)
    page = tune_report.summary_html(BEST, TRIALS, plot, ["head", "fine_tune"])
    assert "<h1>Tuning VGG16&lt;script&gt;</h1>" in page and "<script>" not in page
    assert "<b>0.8800</b>" in page and "(3 trials in all" in page
    assert 'src="data:image/png;base64,' in page  # the plot is embedded: one file to share
    assert page.count("fine_tune_learning_rate") >= 2  # a trial's value and its space's row
