"""Every plot writes a real, non-empty PNG and leaves no figure open."""

from __future__ import annotations

import os
import subprocess
import sys
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
    plot_gradcam_grid,
    plot_history,
    plot_history_grid,
    plot_metric_bars,
    plot_pr,
    plot_reliability,
    plot_roc,
    plot_roc_overlay,
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
    # A desktop user's MPLBACKEND (a GUI backend) must not reach pipeline pods without a display.
    code = "import lungxray.plots, matplotlib; print(matplotlib.get_backend())"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "MPLBACKEND": "tkagg"}, check=True)
    assert result.stdout.strip().lower() == "agg"


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


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> dict[str, list]:
    """Record what the plots draw (Axes.plot and Axes.errorbar arguments)."""
    seen: dict[str, list] = {"plot": [], "errorbar": []}
    for name in seen:
        original = getattr(matplotlib.axes.Axes, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            seen[_name].append((args, kwargs))
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(matplotlib.axes.Axes, name, spy)
    return seen


def test_metric_bars_draw_ci_error_bars(tmp_path: Path, calls: dict) -> None:
    df = pd.DataFrame({
        "model_name": ["A", "B"],
        "test_roc_auc": [0.8, 0.9], "test_roc_auc_ci_lo": [0.7, 0.85],
        "test_roc_auc_ci_hi": [0.86, 0.97],
        "test_f1": [0.6, np.nan],  # no CI columns for this metric: no error bar
    })
    out = tmp_path / "bars.png"
    assert_png(plot_metric_bars(df, ["test_roc_auc", "test_f1"], out), out)
    assert len(calls["errorbar"]) == 2  # one per model, only for the metric with a CI
    (x, y), kwargs = calls["errorbar"][0]
    assert list(y) == pytest.approx([0.8])
    assert np.asarray(kwargs["yerr"]).ravel().tolist() == pytest.approx([0.1, 0.06])
    (_, y), kwargs = calls["errorbar"][1]
    assert np.asarray(kwargs["yerr"]).ravel().tolist() == pytest.approx([0.05, 0.07])


def test_pr_curve_marks_the_operating_point(tmp_path: Path, calls: dict) -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    p1 = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    out = tmp_path / "pr.png"
    assert_png(plot_pr(y, np.column_stack([1 - p1, p1]), CLASSES, out, threshold=0.35), out)
    # >= 0.35: 0.4 (FP), 0.35, 0.8, 0.9 (TP) -> recall 3/3, precision 3/4.
    points = [a for a, k in calls["plot"] if len(a) >= 3 and a[2] == "o"]
    assert [(float(a[0]), float(a[1])) for a in points] == [pytest.approx((1.0, 0.75))]


def test_pr_multiclass_and_no_positive(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    out = tmp_path / "pr3.png"
    assert_png(plot_pr(np.array([0, 1, 2, 0, 1, 2]), rng.dirichlet(np.ones(3), 6),
                       ["a", "b", "c"], out), out)
    p1 = np.array([0.1, 0.7])
    out = tmp_path / "pr0.png"
    assert_png(plot_pr(np.zeros(2, int), np.column_stack([1 - p1, p1]), CLASSES, out), out)


def test_reliability_diagram_plots_the_bins(tmp_path: Path, calls: dict) -> None:
    y = np.array([1, 0, 0, 1])
    p1 = np.array([0.62, 0.68, 0.1, 0.9])
    out = tmp_path / "rel.png"
    assert_png(plot_reliability(y, np.column_stack([1 - p1, p1]), CLASSES, out), out)
    model_line = [(a, k) for a, k in calls["plot"] if "ECE" in str(k.get("label", ""))]
    (xs, ys), kwargs = model_line[0]
    assert list(xs) == pytest.approx([0.1, 0.65, 0.9])
    assert list(ys) == pytest.approx([0.0, 0.5, 1.0])
    # ECE: half the images in a bin off by .15, two alone off by .1 each.
    assert "ECE = 0.125" in kwargs["label"]


def test_roc_overlay_binary_and_multiclass(tmp_path: Path, calls: dict) -> None:
    y = np.array([0, 0, 1, 1, 0, 1])
    good = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    poor = np.array([0.6, 0.2, 0.4, 0.9, 0.3, 0.7])
    curves = {"good": (y, np.column_stack([1 - good, good])),
              "poor": (y, np.column_stack([1 - poor, poor]))}
    out = tmp_path / "overlay.png"
    assert_png(plot_roc_overlay(curves, CLASSES, out, {"good": 0.5, "poor": 0.5}), out)
    labels = [k.get("label", "") for _, k in calls["plot"]]
    assert "good (AUC = 1.000)" in labels
    assert "poor (AUC = 0.889)" in labels  # positive .4 loses only to negative .6: 8 of 9
    # poor at 0.5: positives .9 .7 called (2/3), negative .6 called (1/3).
    dots = [a for a, _ in calls["plot"] if len(a) >= 3 and a[2] == "o"]
    assert [(float(a[0]), float(a[1])) for a in dots] == [
        pytest.approx((0.0, 1.0)), pytest.approx((1 / 3, 2 / 3))]
    y3 = np.array([0, 1, 2, 0, 1, 2])
    rng = np.random.default_rng(0)
    out = tmp_path / "overlay3.png"
    assert_png(plot_roc_overlay({"m": (y3, rng.dirichlet(np.ones(3), 6))}, ["a", "b", "c"],
                                out), out)
    with pytest.raises(ValueError, match="at least one"):
        plot_roc_overlay({}, CLASSES, out)


def test_history_grid_png(tmp_path: Path) -> None:
    history = {"loss": [0.9, 0.6], "val_loss": [1.0, 0.7], "accuracy": [0.5, 0.7],
               "val_accuracy": [0.45, 0.65]}
    phases = [{"name": "head", "epochs": 1}, {"name": "finetune", "epochs": 1}]
    out = tmp_path / "grid.png"
    assert_png(plot_history_grid({"A": (history, phases), "B": (history, [])}, out), out)


def test_gradcam_grid_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (2, 16, 16, 1)).astype(np.uint8)
    heat = rng.random((2, 16, 16))
    rows = [{"label": "true positive", "images": images, "heatmaps": heat,
             "captions": ["p=0.9", "p=0.8"]},
            {"label": "false negative", "images": images[:0], "heatmaps": heat[:0],
             "captions": []}]
    out = tmp_path / "cam.png"
    assert_png(plot_gradcam_grid(rows, out), out)
    with pytest.raises(ValueError):
        plot_gradcam_grid([], out)


def test_confusion_matrix_has_counts_and_normalised_panels(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    texts: list[str] = []
    original = matplotlib.axes.Axes.text

    def spy(self, x, y, s, *args, **kwargs):
        texts.append(s)
        return original(self, x, y, s, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "text", spy)
    out = tmp_path / "cm.png"
    assert_png(plot_confusion_matrix([[4, 2], [1, 3]], CLASSES, out), out)
    assert texts == ["4", "2", "1", "3", "67%", "33%", "25%", "75%"]
