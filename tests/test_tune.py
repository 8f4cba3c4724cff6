"""keras-tuner search on real data: outputs, resume."""

from __future__ import annotations

import json

import pandas as pd

from lungxray import tune


def test_search_writes_best_hparams_and_trials_and_resumes(small_dataset, tmp_path):
    output = tmp_path / "tune"
    best = tune.tune(small_dataset, "VGG16", output, max_trials=2, epochs=1, seed=5)
    assert best["trials"] == 2 and best["objective"] == "val_auc"
    assert set(best["hparams"]) == {"learning_rate", "dropout"}
    assert 1e-5 <= best["hparams"]["learning_rate"] <= 1e-3  # the from-scratch range
    on_disk = json.loads((output / tune.BEST_FILE).read_text())
    assert on_disk == best
    trials = pd.read_csv(output / tune.TRIALS_FILE)
    assert len(trials) == 2 and set(trials["status"]) == {"COMPLETED"}
    assert trials["score"].max() == best["best_score"]
    assert tune.read_best_hparams(output / tune.BEST_FILE) == best["hparams"]

    # Same output again: the finished search is resumed from its state, not rerun.
    again = tune.tune(small_dataset, "VGG16", output, max_trials=2, epochs=1, seed=5)
    assert again["hparams"] == best["hparams"]
    assert again["search_seconds"] < best["search_seconds"] / 3
