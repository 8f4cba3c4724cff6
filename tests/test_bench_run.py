"""bench.run: its command line refuses a mistyped section; its accuracy table's derived figures;
the heading of a `make local` section names its sites."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score

from bench import run
from lungxray import metrics


def test_unknown_section_or_profile_is_refused_before_anything_is_written(tmp_path, capsys):
    for argv in (["--only", "tune"], ["--only", "local", "--profiles", "fast"]):
        with pytest.raises(SystemExit) as exit_info:
            run.main([*argv, "--output", str(tmp_path / "bench")])
        assert exit_info.value.code == 2
        assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


def test_official_mix_accuracy_reweights_the_classes_to_the_official_test_counts():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(30, int), np.ones(90, int)]  # train/val-like: 25% normal
    scores = np.clip(0.35 * y + rng.uniform(0.0, 0.65, size=y.size), 0.0, 1.0)
    probs = np.column_stack([1 - scores, scores])
    result = metrics.compute_metrics(y, probs, ["normal", "pneumonia"], 0.5)
    # The same accuracy by sample weights: each class weighted to its share of 234 / 390.
    weight = np.where(y == 1, 390 / 90, 234 / 30)
    expected = accuracy_score(y, scores >= 0.5, sample_weight=weight)
    assert run.official_mix_accuracy(result) == pytest.approx(expected)
    assert run.official_mix_accuracy(result) != pytest.approx(result["accuracy"])
    other = metrics.compute_metrics(y, probs, ["benign", "malignant"], 0.5)
    assert run.official_mix_accuracy(other) is None  # only for PneumoniaMNIST's classes


def test_a_make_local_section_names_the_sites_it_ran_with():
    machine = {"cpu": "cpu", "cores": 2, "gpus": 0, "python": "3.11", "tensorflow": "2.21",
               "date": "today"}
    run_entry = {"weights": "none", "started": "now", "wall_seconds": 1470.0,
                 "peak_rss_mib": 2300, "data": "d.npz", "params": {}}
    page = run.markdown({"machine": machine, "make_local": {
        "full": {**run_entry, "sites": "nih=m.csv"}, "quick": run_entry}})
    assert "## `make local PROFILE=full WEIGHTS=none SITES=nih=m.csv`" in page
    assert "## `make local PROFILE=quick WEIGHTS=none`\n" in page  # no sites: as before
    assert "**24.5 min**" in page
