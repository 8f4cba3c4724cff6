"""PNG figures for training and evaluation (matplotlib, headless).

Every function draws one figure, saves it, closes it (pipelines draw hundreds; open figures leak
memory) and returns the path written.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any

import matplotlib

# Components run without a display; select the backend before pyplot is imported anywhere.
matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from lungxray.metrics import expected_calibration_error, reliability  # noqa: E402

DPI = 110


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_base64(path: Path | None) -> str | None:
    """Base64 of a PNG file, or None if it is missing or not a PNG."""
    if path is None or not Path(path).is_file():
        return None
    data = Path(path).read_bytes()
    return base64.b64encode(data).decode("ascii") if data.startswith(PNG_MAGIC) else None


def img_tag(b64: str, alt: str) -> str:
    """An <img> with the PNG embedded, for self-contained HTML reports."""
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


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
    """Two panels for a K x K confusion matrix (rows = true class): counts, and row-normalised
    rates (the diagonal is each class's sensitivity), so a rare class is as readable as a
    common one."""
    mat = np.asarray(cm, dtype=float)
    k = len(class_names)
    if mat.shape != (k, k):
        raise ValueError(f"confusion matrix shape {mat.shape} does not match {k} class names")
    row_sums = mat.sum(axis=1, keepdims=True)
    frac = np.divide(mat, row_sums, out=np.zeros_like(mat), where=row_sums > 0)
    size = max(3.5, 1.1 * k + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(2 * size + 0.5, size))
    panels = ((mat, "counts", mat.max() or 1.0, lambda i, j: f"{int(mat[i, j])}"),
              (frac, "normalised by true class", 1.0, lambda i, j: f"{frac[i, j]:.0%}"))
    for ax, (values, name, vmax, text) in zip(axes, panels, strict=True):
        ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
        for i in range(k):
            for j in range(k):
                colour = "white" if values[i, j] > 0.5 * vmax else "black"
                ax.text(j, i, text(i, j), ha="center", va="center", color=colour, fontsize=9)
        ax.set_xticks(range(k), labels=class_names, rotation=30, ha="right")
        ax.set_yticks(range(k), labels=class_names)
        ax.set_xlabel("Predicted")
        ax.set_title(name, fontsize=9)
    axes[0].set_ylabel("True")
    fig.subplots_adjust(wspace=0.45)  # room for the right panel's class names
    fig.suptitle(title)
    return _save(fig, path)


def _check_curve_input(
    y_true: Any, probs: Any, class_names: list[str]
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.ndim != 2 or p.shape[1] != len(class_names) or p.shape[0] != y.shape[0]:
        raise ValueError(
            f"probs shape {p.shape} does not fit {y.shape[0]} labels and {len(class_names)} classes"
        )
    return y, p


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
    y, p = _check_curve_input(y_true, probs, class_names)
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

    When the table has ``<metric>_ci_lo`` and ``<metric>_ci_hi`` columns, each bar carries its
    95% CI as an error bar. Missing values (NaN, e.g. AUC undefined) leave a gap rather than a
    misleading zero bar.
    """
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ValueError(f"metrics not in table: {missing}")
    names = df["model_name"].astype(str).tolist() if "model_name" in df.columns else [
        str(i) for i in df.index
    ]
    values = df[metrics].astype(float).to_numpy()
    lows, highs = np.full_like(values, np.nan), np.full_like(values, np.nan)
    for j, m in enumerate(metrics):
        if f"{m}_ci_lo" in df.columns and f"{m}_ci_hi" in df.columns:
            lows[:, j] = df[f"{m}_ci_lo"].astype(float).to_numpy()
            highs[:, j] = df[f"{m}_ci_hi"].astype(float).to_numpy()
    n_models, n_metrics = values.shape
    width = 0.8 / max(n_models, 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * n_metrics * max(1, n_models / 3)), 4.5))
    x = np.arange(n_metrics)
    for i, name in enumerate(names):
        pos = x + (i - (n_models - 1) / 2) * width
        ax.bar(pos, values[i], width, label=name)
        has_ci = np.isfinite(lows[i]) & np.isfinite(highs[i]) & np.isfinite(values[i])
        if has_ci.any():
            # Percentile intervals need not be symmetric, nor (rarely) contain the estimate.
            err = np.vstack([np.clip(values[i] - lows[i], 0, None),
                             np.clip(highs[i] - values[i], 0, None)])[:, has_ci]
            ax.errorbar(pos[has_ci], values[i][has_ci], yerr=err, fmt="none", ecolor="black",
                        elinewidth=1, capsize=3)
    ax.set_xticks(x, labels=metrics, rotation=30, ha="right")
    everything = np.concatenate([values.ravel(), highs.ravel(), lows.ravel()])
    finite = everything[np.isfinite(everything)]
    top = finite.max() if finite.size else 1.0
    ax.set_ylim(min(0.0, finite.min() if finite.size else 0.0), max(1.0, top) * 1.05)
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _operating_point(y: np.ndarray, score: np.ndarray, threshold: float | None) -> dict:
    """Where the deployed rule ``score >= threshold`` lands: fpr, tpr (= recall), precision."""
    thr = 0.5 if threshold is None else float(threshold)
    tn, fp, fn, tp = skm.confusion_matrix(y, (score >= thr).astype(int), labels=[0, 1]).ravel()
    return {"threshold": thr, "fpr": fp / max(fp + tn, 1), "tpr": tp / max(tp + fn, 1),
            "precision": tp / (tp + fp) if tp + fp else np.nan}


def plot_pr(
    y_true: Any,
    probs: Any,
    class_names: list[str],
    path: Path | str,
    threshold: float | None = None,
    title: str = "Precision-recall curve",
) -> Path:
    """Precision-recall curve(s) with the prevalence baseline: binary with the operating point
    marked, multiclass one-vs-rest per class."""
    y, p = _check_curve_input(y_true, probs, class_names)
    fig, ax = plt.subplots(figsize=(5, 5))
    targets = [1] if p.shape[1] == 2 else list(range(p.shape[1]))
    drawn = 0
    for c in targets:
        truth = (y == c).astype(int)
        if not truth.any():
            continue  # no positives: the curve is undefined
        precision, recall, _ = skm.precision_recall_curve(truth, p[:, c])
        ap = skm.average_precision_score(truth, p[:, c])
        label = (f"{class_names[1]} (AP = {ap:.3f})" if p.shape[1] == 2
                 else f"{class_names[c]} vs rest (AP = {ap:.3f})")
        line = ax.step(recall, precision, where="post", label=label)[0]
        ax.axhline(truth.mean(), linestyle=":", color=line.get_color(), linewidth=1)
        drawn += 1
    if drawn == 0:
        _undefined(ax, "PR curve")
    elif p.shape[1] == 2:
        point = _operating_point(y, p[:, 1], threshold)
        ax.plot(point["tpr"], point["precision"], "o", color="red", markersize=8,
                label=f"threshold = {point['threshold']:.3f}")
    ax.set_xlim(-0.01, 1.01)
    ax.set_ylim(-0.01, 1.01)
    ax.set_xlabel("Recall (sensitivity)")
    ax.set_ylabel("Precision (PPV)")
    ax.set_title(f"{title}\n(dotted: prevalence = a random classifier)", fontsize=10)
    if drawn:
        ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def plot_reliability(
    y_true: Any,
    probs: Any,
    class_names: list[str],
    path: Path | str,
    n_bins: int = 10,
    title: str = "Reliability diagram",
) -> Path:
    """Observed frequency against mean predicted probability per confidence bin, with the
    expected calibration error; below, how many images fall in each bin. Binary: P(positive);
    multiclass: the top-label confidence."""
    y, p = _check_curve_input(y_true, probs, class_names)
    bins = reliability(y, p, n_bins)
    ece = expected_calibration_error(y, p, n_bins)
    fig, (ax, hist) = plt.subplots(2, 1, figsize=(5, 6), sharex=True,
                                   gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], linestyle=":", color="grey", label="perfectly calibrated")
    ax.plot(bins["confidence"], bins["observed"], marker="o", label=f"model (ECE = {ece:.3f})")
    ax.set_ylim(-0.01, 1.01)
    binary = p.shape[1] == 2
    ax.set_ylabel(f"observed share of {class_names[1]}" if binary else "observed accuracy")
    ax.set_title(title)
    ax.legend(loc="upper left", fontsize=8)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    confidence = p[:, 1] if binary else p.max(axis=1)
    hist.hist(np.clip(confidence, 0, 1), bins=edges, color="grey")
    hist.set_xlim(-0.01, 1.01)
    hist.set_xlabel(f"predicted P({class_names[1]})" if binary else "top-label confidence")
    hist.set_ylabel("images")
    return _save(fig, path)


def plot_roc_overlay(
    curves: dict[str, tuple[Any, Any]],
    class_names: list[str],
    path: Path | str,
    thresholds: dict[str, float | None] | None = None,
    title: str = "ROC curves",
) -> Path:
    """All models' ROC curves in one figure, ``curves = {model: (y_true, probs)}``: binary in one
    panel with each model's operating point; multiclass one panel per class (one-vs-rest)."""
    if not curves:
        raise ValueError("plot_roc_overlay needs at least one model")
    k = len(class_names)
    panels = [1] if k == 2 else list(range(k))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, c in zip(axes[0], panels, strict=True):
        ax.plot([0, 1], [0, 1], linestyle=":", color="grey")
        drawn = 0
        for name, (y_true, probs) in curves.items():
            y, p = _check_curve_input(y_true, probs, class_names)
            truth = (y == c).astype(int)
            if truth.all() or not truth.any():
                continue  # undefined for this model's split
            fpr, tpr, _ = skm.roc_curve(truth, p[:, c])
            auc = skm.roc_auc_score(truth, p[:, c])
            line = ax.plot(fpr, tpr, label=f"{name} (AUC = {auc:.3f})")[0]
            drawn += 1
            if k == 2:
                point = _operating_point(y, p[:, 1], (thresholds or {}).get(name))
                ax.plot(point["fpr"], point["tpr"], "o", color=line.get_color(), markersize=7)
        if drawn == 0:
            _undefined(ax, "ROC")
        else:
            ax.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("False positive rate (1 - specificity)")
        ax.set_ylabel("True positive rate (sensitivity)")
        ax.set_title(class_names[1] if k == 2 else f"{class_names[c]} vs rest", fontsize=10)
    fig.suptitle(title + (" (dots: operating points)" if k == 2 else ""))
    return _save(fig, path)


def plot_history_grid(
    histories: dict[str, tuple[dict[str, list[float]], list[dict]]],
    path: Path | str,
    title: str = "Training curves",
) -> Path:
    """Accuracy (top) and loss (bottom) per model side by side, train vs validation, with shared
    y axes per row so the models compare at a glance."""
    if not histories:
        raise ValueError("plot_history_grid needs at least one model")
    n = len(histories)
    fig, axes = plt.subplots(2, n, figsize=(min(4.0 * n, 24), 6.5), squeeze=False,
                             sharey="row")
    for col, (name, (history, phases)) in enumerate(histories.items()):
        for row, metric in enumerate(("accuracy", "loss")):
            ax = axes[row][col]
            for key, label in ((metric, "train"), (f"val_{metric}", "val")):
                values = history.get(key)
                if values:
                    ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3,
                            label=label)
            for x, _ in _phase_boundaries(phases or []):
                ax.axvline(x, linestyle="--", color="grey", linewidth=1)
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(metric)
            ax.set_xlabel("epoch")
            ax.xaxis.get_major_locator().set_params(integer=True)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle(title + " (dashed: start of fine-tuning)")
    return _save(fig, path)


def plot_gradcam_grid(
    rows: list[dict[str, Any]],
    path: Path | str,
    title: str = "Grad-CAM",
) -> Path:
    """A grid of images with their Grad-CAM heatmaps overlaid, one row per case category.

    Each row is ``{"label", "images" (m, H, W, C), "heatmaps" (m, H, W) in 0..1, "captions"}``;
    a row with no image says so (e.g. no false negatives on this split).
    """
    if not rows:
        raise ValueError("plot_gradcam_grid needs at least one row")
    cols = max(1, max(len(r["images"]) for r in rows))
    fig, axes = plt.subplots(len(rows), cols, figsize=(2.0 * cols + 1.2, 2.1 * len(rows)),
                             squeeze=False)
    for r, row in enumerate(rows):
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(row["label"], fontsize=9)
            if c >= len(row["images"]):
                if c == 0:
                    ax.text(0.5, 0.5, "none on this split", ha="center", va="center",
                            transform=ax.transAxes, fontsize=8)
                for spine in ax.spines.values():
                    spine.set_visible(c == 0)
                continue
            image = np.asarray(row["images"][c], dtype=float)
            grey = image.mean(axis=-1) if image.ndim == 3 else image
            ax.imshow(grey, cmap="gray")
            ax.imshow(np.asarray(row["heatmaps"][c]), cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0,
                      extent=(-0.5, grey.shape[1] - 0.5, grey.shape[0] - 0.5, -0.5))
            if row.get("captions"):
                ax.set_title(row["captions"][c], fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def plot_robustness(summary: dict[str, Any], path: Path | str,
                    title: str = "Robustness to acquisition shift") -> Path:
    """ROC AUC against corruption severity, one line per corruption (``robustness.summarize``
    output), the clean AUC as a dashed line at severity 0; sanity-only corruptions dotted."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    clean = summary.get("clean_auc")
    severities = [0, *summary.get("severities", [])]
    excluded = set(summary.get("excluded_from_summary") or [])
    cmap = plt.get_cmap("tab20")
    for i, (name, levels) in enumerate((summary.get("auc") or {}).items()):
        ys = [clean] + [levels.get(str(s)) for s in severities[1:]]
        values = np.array([np.nan if v is None else v for v in ys], dtype=float)
        ax.plot(severities, values, marker="o", markersize=3, color=cmap(i % 20),
                linestyle=":" if name in excluded else "-",
                label=f"{name} (not in mean)" if name in excluded else name)
    if clean is not None:
        ax.axhline(clean, color="black", linestyle="--", linewidth=1, label="clean")
    if summary.get("mean_corrupted_auc") is not None:
        ax.axhline(summary["mean_corrupted_auc"], color="red", linestyle="-.", linewidth=1,
                   label=f"mean corrupted ({summary['mean_corrupted_auc']:.3f})")
    ax.set_xticks(severities, labels=["clean", *map(str, severities[1:])])
    ax.set_xlabel("severity")
    ax.set_ylabel("ROC AUC")
    ax.set_title(f"{title} (n={summary.get('n')})", fontsize=10)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_robustness_overlay(summaries: dict[str, dict[str, Any]], path: Path | str,
                            title: str = "Mean ROC AUC under corruption") -> Path:
    """Per model, the clean AUC and the AUC of each corruption averaged over its severities,
    as grouped bars (``{model: robustness summary}``)."""
    if not summaries:
        raise ValueError("plot_robustness_overlay needs at least one model")
    names = list(summaries)
    corruptions = ["clean", *dict.fromkeys(c for s in summaries.values()
                                           for c in (s.get("mean_by_corruption") or {}))]
    values = np.array([[summaries[m].get("clean_auc") if c == "clean"
                        else (summaries[m].get("mean_by_corruption") or {}).get(c)
                        for c in corruptions] for m in names], dtype=float)
    width = 0.8 / len(names)
    x = np.arange(len(corruptions))
    fig, ax = plt.subplots(figsize=(max(7.0, 0.6 * len(corruptions) * max(1, len(names) / 2)),
                                    4.5))
    for i, name in enumerate(names):
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values[i], width, label=name)
    ax.set_xticks(x, labels=corruptions, rotation=30, ha="right")
    finite = values[np.isfinite(values)]
    ax.set_ylim(min(0.4, finite.min() - 0.05) if finite.size else 0.0, 1.0)
    ax.set_ylabel("ROC AUC (mean over severities)")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
