"""Every plot writes a real, non-empty PNG and leaves no figure open."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import matplotlib.image as mpimg
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungxray.plots import (
    _phase_boundaries,
    plot_confusion_matrix,
    plot_history,
    plot_metric_bars,
    plot_roc,
)

CLASSES = ["normal", "pneumonia"]


def assert_png(path: Path, expected: Path) -> None:
    assert path == expected
    assert path.stat().st_size > 1000
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 100 and img.height > 100
    pixels = mpimg.imread(path)
    assert pixels.std() > 0  # something was drawn, not a blank canvas
    assert plt.get_fignums() == []


def test_backend_is_headless() -> None:
    assert matplotlib.get_backend().lower() == "agg"


def test_confusion_matrix_png(tmp_path: Path) -> None:
    out = tmp_path / "sub" / "cm.png"
    assert_png(plot_confusion_matrix([[4, 2], [1, 3]], CLASSES, out, "val"), out)


def test_confusion_matrix_rejects_wrong_shape(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        plot_confusion_matrix([[1, 2, 3]], CLASSES, tmp_path / "cm.png", "bad")


def test_binary_roc_png(tmp_path: Path) -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    out = tmp_path / "roc.png"
    assert_png(plot_roc(y, np.column_stack([1 - p1, p1]), CLASSES, out, threshold=0.35), out)


def test_roc_one_class_split_does_not_crash(tmp_path: Path) -> None:
    y = np.zeros(3, dtype=int)
    p1 = np.array([0.1, 0.7, 0.2])
    out = tmp_path / "roc.png"
    assert_png(plot_roc(y, np.column_stack([1 - p1, p1]), CLASSES, out), out)


def test_multiclass_roc_png(tmp_path: Path) -> None:
    y = np.array([0, 1, 2, 0, 1, 2])
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(3), size=6)
    out = tmp_path / "roc3.png"
    assert_png(plot_roc(y, probs, ["a", "b", "c"], out, title="3 classes"), out)


def test_history_png_with_phases(tmp_path: Path) -> None:
    history = {
        "loss": [0.9, 0.6, 0.4], "val_loss": [1.0, 0.7, 0.6],
        "accuracy": [0.5, 0.7, 0.8], "val_accuracy": [0.45, 0.65, 0.7],
    }
    phases = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 1}]
    out = tmp_path / "curves.png"
    assert_png(plot_history(history, phases, out, "VGG16"), out)


def test_phase_boundaries_sit_between_phases() -> None:
    phases = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 3},
              {"name": "polish", "epochs": 1}]
    assert _phase_boundaries(phases) == [(2.5, "finetune"), (5.5, "polish")]
    assert _phase_boundaries([{"name": "scratch", "epochs": 4}]) == []


def test_metric_bars_png_with_missing_value(tmp_path: Path) -> None:
    df = pd.DataFrame({
        "model_name": ["VGG16", "ResNet152V2", "InceptionV3"],
        "test_accuracy": [0.8, 0.85, 0.7],
        "test_roc_auc": [0.9, np.nan, 0.75],
    })
    out = tmp_path / "bars.png"
    assert_png(plot_metric_bars(df, ["test_accuracy", "test_roc_auc"], out), out)


def test_metric_bars_rejects_unknown_metric(tmp_path: Path) -> None:
    df = pd.DataFrame({"model_name": ["a"], "x": [1.0]})
    with pytest.raises(ValueError, match="nope"):
        plot_metric_bars(df, ["nope"], tmp_path / "bars.png")
