"""Evaluate a trained model on splits of a prepared dataset or of any raw source.

The decision threshold is the one saved with the model (chosen on validation at training time),
never one fitted to the split being evaluated.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from lungxray import data, metrics, models, plots
from lungxray.train import MODEL_FILE, read_model_info

METRICS_FILE = "metrics.json"
ROC_FILE = "roc_curve.json"
PREDICTIONS_FILE = "predictions.csv"
MAX_ROC_POINTS = 200  # the KFP UI renders every point; a few hundred draw the same curve


def roc_points(y_true: np.ndarray, scores: np.ndarray) -> dict[str, list[float]] | None:
    """A thinned ROC curve (fpr, tpr, threshold) of the positive class, JSON-safe."""
    if len(np.unique(y_true)) < 2:
        return None
    fpr, tpr, thresholds = roc_curve(y_true, scores)
    thresholds = np.clip(thresholds, 0.0, 1.0)  # the first one is +inf by sklearn's convention
    if len(fpr) > MAX_ROC_POINTS:
        keep = np.unique(np.linspace(0, len(fpr) - 1, MAX_ROC_POINTS).round().astype(int))
        fpr, tpr, thresholds = fpr[keep], tpr[keep], thresholds[keep]
    return {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "thresholds": thresholds.tolist()}


def resolve_data(source: str, info: dict, workdir: Path,
                 cache_dir: Path | None = None) -> Path:
    """A prepared dataset dir as-is, or a raw source prepared with the model's own settings
    (size, channels, classes) and its splits kept as given."""
    if data.is_prepared(source):
        return Path(source)
    prepared = workdir / "prepared"
    data.preprocess(source, prepared, image_size=info["image_size"], channels=info["channels"],
                    class_names=info["class_names"], carve_missing=False, cache_dir=cache_dir)
    return prepared


def evaluate_split(model, info: dict, split: data.Split, split_name: str, output: Path) -> dict:
    """Predict one split and write its metrics, predictions, ROC points and plots."""
    class_names = info["class_names"]
    probs = model.predict(split.images.astype(np.float32), batch_size=64, verbose=0)
    result = metrics.compute_metrics(split.labels, probs, class_names, info["threshold"])
    result.update({"split": split_name, "model_name": info["model_name"]})
    output.mkdir(parents=True, exist_ok=True)
    predictions = pd.DataFrame({"y_true": split.labels})
    for i, name in enumerate(class_names):
        predictions[f"prob_{name}"] = probs[:, i]
    predictions.to_csv(output / PREDICTIONS_FILE, index=False)
    if len(class_names) == 2:
        (output / ROC_FILE).write_text(json.dumps(roc_points(split.labels, probs[:, 1])))
    title = f"{info['model_name']} — {split_name}"
    plots.plot_confusion_matrix(result["confusion_matrix"], class_names,
                                output / "confusion_matrix.png", title=title)
    plots.plot_roc(split.labels, probs, class_names, output / "roc.png",
                   threshold=info["threshold"], title=title)
    (output / METRICS_FILE).write_text(json.dumps(result, indent=2))
    return result


def evaluate(model_dir: Path, source: str, output: Path, splits: list[str] | None = None,
             cache_dir: Path | None = None) -> dict[str, dict]:
    """Evaluate ``model_dir`` on ``splits`` (default: test) of ``source``; writes
    ``<output>/<split>/metrics.json`` and plots. Returns {split: metrics}."""
    info = read_model_info(model_dir)
    model = models.load_model(Path(model_dir) / MODEL_FILE)
    splits = splits or ["test"]
    with tempfile.TemporaryDirectory(prefix="lungxray-eval-") as workdir:
        data_dir = resolve_data(source, info, Path(workdir), cache_dir)
        manifest = data.read_manifest(data_dir)
        if manifest["class_names"] != info["class_names"]:
            raise data.DataError(f"{source}: classes {manifest['class_names']} differ from the "
                                 f"model's {info['class_names']}")
        missing = [s for s in splits if s not in manifest["splits"]]
        if missing:
            raise data.DataError(f"{source}: no split(s) {missing} "
                                 f"(available: {', '.join(manifest['splits'])})")
        return {name: evaluate_split(model, info, data.load_split(data_dir, name), name,
                                     Path(output) / name)
                for name in splits}


SCALARS = ("accuracy", "roc_auc", "precision", "sensitivity", "specificity", "f1", "threshold")


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
    """``<split>_<metric>`` for a fixed list of metrics, so every trial logs the same names."""
    return {f"{split}_{name}": float(values[name])
            for split, values in results.items() for name in SCALARS
            if values.get(name) is not None}


def describe(results: dict[str, dict]) -> str:
    """A Markdown table of the headline metrics per split."""
    model_name = next(iter(results.values()))["model_name"]
    lines = [f"# {model_name}", "", "| split | n | " + " | ".join(SCALARS) + " |",
             "|---|---:|" + "---:|" * len(SCALARS)]
    for split, values in results.items():
        cells = ["" if values.get(k) is None else f"{values[k]:.4f}" for k in SCALARS]
        lines.append(f"| {split} | {values['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
