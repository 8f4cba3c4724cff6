"""PNG figures for training and evaluation (matplotlib, headless).

Every function draws one figure, saves it, closes it (pipelines draw hundreds; open figures leak
memory) and returns the path written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

# Components run without a display; select the backend before pyplot is imported anywhere.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

DPI = 110


def _save(fig: plt.Figure, path: Path | str) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(out, dpi=DPI, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return out


def plot_confusion_matrix(
    cm: Any, class_names: list[str], path: Path | str, title: str = "Confusion matrix"
) -> Path:
    """Heatmap of a K x K confusion matrix (rows = true class) with counts and row percentages."""
    mat = np.asarray(cm, dtype=float)
    k = len(class_names)
    if mat.shape != (k, k):
        raise ValueError(f"confusion matrix shape {mat.shape} does not match {k} class names")
    row_sums = mat.sum(axis=1, keepdims=True)
    # Row-normalise for the colour scale so a rare class is as readable as a common one.
    frac = np.divide(mat, row_sums, out=np.zeros_like(mat), where=row_sums > 0)
    size = max(3.5, 1.1 * k + 1.5)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(frac, cmap="Blues", vmin=0.0, vmax=1.0)
    for i in range(k):
        for j in range(k):
            colour = "white" if frac[i, j] > 0.5 else "black"
            ax.text(j, i, f"{int(mat[i, j])}\n{frac[i, j]:.0%}", ha="center", va="center",
                    color=colour, fontsize=9)
    ax.set_xticks(range(k), labels=class_names, rotation=30, ha="right")
    ax.set_yticks(range(k), labels=class_names)
    ax.set_xlabel("Predicted")
    ax.set_ylabel("True")
    ax.set_title(title)
    return _save(fig, path)


def plot_roc(
    y_true: Any,
    probs: Any,
    class_names: list[str],
    path: Path | str,
    threshold: float | None = None,
    title: str = "ROC curve",
) -> Path:
    """ROC curve(s): binary with the operating point marked, multiclass one-vs-rest per class.

    A split where a curve is undefined (one class present) still gets a figure saying so, so that
    evaluation never crashes on a tiny split.
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] != len(class_names) or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs shape {p.shape} does not fit {y.shape[0]} labels and {len(class_names)} classes"
        )
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="chance")
    if p.shape[1] == 2:
        _draw_binary_roc(ax, y, p[:, 1], class_names, threshold)
    else:
        _draw_ovr_roc(ax, y, p, class_names)
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("False positive rate (1 - specificity)")
    ax.set_ylabel("True positive rate (sensitivity)")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _undefined(ax: plt.Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"{what} undefined:\nonly one class present", ha="center", va="center",
            transform=ax.transAxes)


def _draw_binary_roc(
    ax: plt.Axes, y: np.ndarray, score: np.ndarray, class_names: list[str], threshold: float | None
) -> None:
    if np.unique(y).size < 2:
        _undefined(ax, "ROC")
        return
    fpr, tpr, _ = skm.roc_curve(y, score)
    auc = skm.roc_auc_score(y, score)
    ax.plot(fpr, tpr, label=f"{class_names[1]} vs {class_names[0]} (AUC = {auc:.3f})")
    thr = 0.5 if threshold is None else float(threshold)
    # The operating point is where the deployed rule (score >= thr) actually lands.
    tn, fp, fn, tp = skm.confusion_matrix(y, (score >= thr).astype(int), labels=[0, 1]).ravel()
    ax.plot(fp / (fp + tn), tp / (tp + fn), "o", color="red", markersize=8,
            label=f"threshold = {thr:.3f}")


def _draw_ovr_roc(ax: plt.Axes, y: np.ndarray, p: np.ndarray, class_names: list[str]) -> None:
    drawn = 0
    for i, name in enumerate(class_names):
        positives = y == i
        if positives.all() or not positives.any():
            continue  # one-vs-rest curve undefined for this class on this split
        fpr, tpr, _ = skm.roc_curve(positives.astype(int), p[:, i])
        auc = skm.roc_auc_score(positives.astype(int), p[:, i])
        ax.plot(fpr, tpr, label=f"{name} vs rest (AUC = {auc:.3f})")
        drawn += 1
    if drawn == 0:
        _undefined(ax, "ROC")


def _phase_boundaries(phases: list[dict]) -> list[tuple[float, str]]:
    """x positions (between epochs) where each phase after the first starts, with its name."""
    bounds = []
    done = 0
    for i, phase in enumerate(phases):
        if i > 0:
            bounds.append((done + 0.5, str(phase.get("name", f"phase {i + 1}"))))
        done += int(phase.get("epochs", 0))
    return bounds


def plot_history(
    history: dict[str, list[float]],
    phases: list[dict],
    path: Path | str,
    title: str = "Training curves",
) -> Path:
    """Accuracy and loss per epoch, train vs validation, with dashed lines at phase changes."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, metric in zip(axes, ("accuracy", "loss"), strict=True):
        for key, label in ((metric, "train"), (f"val_{metric}", "val")):
            values = history.get(key)
            if values:
                ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=label)
        for x, name in _phase_boundaries(phases or []):
            ax.axvline(x, linestyle="--", color="grey", linewidth=1)
            ax.text(x, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top",
                    fontsize=8, color="grey")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.suptitle(title)
    return _save(fig, path)


def plot_metric_bars(
    df: Any, metrics: list[str], path: Path | str, title: str = "Model comparison"
) -> Path:
    """Grouped bars: one group per metric, one bar per model (``model_name`` column or index).

    Missing values (NaN, e.g. AUC undefined) leave a gap rather than a misleading zero bar.
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metrics not in table: {missing}")
    names = df["model_name"].astype(str).tolist() if "model_name" in df.columns else [
        str(i) for i in df.index
    ]
    values = df[metrics].astype(float).to_numpy()
    n_models, n_metrics = values.shape
    width = 0.8 / max(n_models, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * n_metrics * max(1, n_models / 3)), 4.5))
    x = np.arange(n_metrics)
    for i, name in enumerate(names):
        ax.bar(x + (i - (n_models - 1) / 2) * width, values[i], width, label=name)
    ax.set_xticks(x, labels=metrics, rotation=30, ha="right")
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    ax.set_ylim(min(0.0, np.nanmin(values) if np.isfinite(values).any() else 0.0),
                max(1.0, top) * 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
