"""Evaluate a trained model (or a saved ensemble) on splits of a prepared dataset or any raw source.

The decision threshold is the one saved with the model (chosen on validation at training time),
never one fitted to the split being evaluated. A source from elsewhere (another hospital) may name
its classes differently: ``class_map`` maps its class names onto the model's.
"""

from __future__ import annotations

import html
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import roc_curve

from lungxray import data, gradcam, integrity, metrics, models, plots, safeio, schema, staging
from lungxray.errors import ConfigError, ModelError, quote, quote_repr
from lungxray.train import MODEL_FILE, read_model_info

METRICS_FILE = "metrics.json"
ROC_FILE = "roc_curve.json"
PREDICTIONS_FILE = "predictions.csv"
REPORT_FILE = "report.html"
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
EXTERNAL_SPLIT = "external"
PLOT_FILES = ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png", "gradcam.png")
MAX_ROC_POINTS = 200  # the KFP UI renders every point; a few hundred draw the same curve
PREDICT_BATCH = 64
PREDICT_CHUNK = 1024  # images converted to float32 at a time
DROP = "-"  # class_map target that leaves a source class out of the evaluation
GRADCAM_PER_CATEGORY = 4


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


# --------------------------------------------------------------------------- models


@dataclass
class Predictor:
    """One saved model, or the members of a saved ensemble whose probabilities are averaged."""

    info: dict[str, Any]
    members: list[Any]  # keras.Model objects

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1 or bool(self.info.get("ensemble"))

    def predict(self, images: np.ndarray) -> tuple[np.ndarray, float]:
        """(probabilities, wall-clock ms per image) over the whole array, members in turn.

        Each member first predicts one batch untimed (graph tracing, memory allocation), so the
        time is the steady-state cost a deployment would see.
        """
        n = len(images)
        total, elapsed = None, 0.0
        for model in self.members:
            model.predict(np.asarray(images[:PREDICT_BATCH], dtype=np.float32),
                          batch_size=PREDICT_BATCH, verbose=0)
            parts = []
            start = time.perf_counter()
            # Slices of a (memory-mapped) split: float32 copies of a whole large set would not
            # fit in memory. Converting them is part of the cost a deployment pays, so timed.
            for first in range(0, n, PREDICT_CHUNK):
                x = np.asarray(images[first:first + PREDICT_CHUNK], dtype=np.float32)
                parts.append(model.predict(x, batch_size=PREDICT_BATCH, verbose=0))
            elapsed += time.perf_counter() - start
            probs = np.concatenate(parts).astype(np.float64)
            total = probs if total is None else total + probs
        return total / len(self.members), 1000.0 * elapsed / max(n, 1)


def _device() -> str:
    import tensorflow as tf  # the Keras backend; already loaded with the model

    gpus = tf.config.list_physical_devices("GPU")
    return f"GPU x{len(gpus)}" if gpus else "CPU"


def load_predictor(model_dir: Path | str) -> Predictor:
    """A `lungxray train` output dir, or a dir with ``ensemble.json`` and ``members/<name>/``."""
    model_dir = Path(model_dir)
    spec_path = model_dir / ENSEMBLE_FILE
    if not spec_path.is_file():
        return Predictor(read_model_info(model_dir), [models.load_model(model_dir / MODEL_FILE)])
    spec = safeio.load_json_object(spec_path, "ensemble spec", error=ModelError)
    names = spec.get("members")
    if not isinstance(names, list) or not 2 <= len(names) <= schema.MAX_MODELS:
        raise ModelError(f"{spec_path}: 'members' must list at least two member model dirs")
    members_root = (model_dir / MEMBERS_DIR).resolve()
    loaded = []
    for name in names:
        member_dir = model_dir / MEMBERS_DIR / str(name)
        # The spec is input like any other: a member cannot point outside members/.
        if str(name) in {"", "."} or members_root not in member_dir.resolve().parents:
            raise ModelError(f"{spec_path}: member {quote(str(name), 60)} is not a directory in "
                             f"{model_dir / MEMBERS_DIR}")
        info = read_model_info(member_dir)
        for key in ("class_names", "image_size", "channels"):
            if info.get(key) != spec.get(key):
                raise ModelError(f"{spec_path}: member {name} has {key}="
                                 f"{quote_repr(info.get(key), 80)}, the ensemble "
                                 f"{quote_repr(spec.get(key), 80)}")
        loaded.append(models.load_model(member_dir / MODEL_FILE))
    return Predictor({**spec, "ensemble": True}, loaded)


# --------------------------------------------------------------------------- data


def parse_class_map(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"COVID-19=pneumonia,NORMAL=normal,Lung_Opacity=-"`` -> {source class: model class}.

    ``-`` as the target leaves that source class out. An empty string or None is no mapping.
    """
    if not text:
        return {}
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    mapping: dict[str, str] = {}
    for item in str(text).split(","):
        if not item.strip():
            continue
        source, sep, target = item.partition("=")
        source, target = source.strip(), target.strip()
        if not sep or not source or not target:
            raise ConfigError(f"class map entry {quote(item.strip(), 60)} is not SOURCE=TARGET "
                              f"(e.g. 'COVID-19=pneumonia', or 'Other=-' to leave a class out)")
        if source in mapping and mapping[source] != target:
            raise ConfigError(f"class map maps {quote(source, 60)} twice "
                              f"({quote(mapping[source], 60)}, {quote(target, 60)})")
        mapping[source] = target
    return mapping


def label_lookup(source_classes: list[str], model_classes: list[str],
                 class_map: dict[str, str]) -> np.ndarray:
    """Source label index -> model label index (-1: left out). A source class the map does not
    name keeps its label only when the model has a class of exactly that name."""
    unknown = sorted(set(class_map) - set(source_classes))
    if unknown:
        raise data.DataError(f"class map names {quote_repr(unknown, 200)}, which are not classes "
                             f"of the source "
                             f"(its classes: {source_classes})")
    bad = sorted({t for t in class_map.values() if t != DROP and t not in model_classes})
    if bad:
        raise data.DataError(f"class map targets {quote_repr(bad, 200)} are not classes of the "
                             f"model "
                             f"({model_classes}; '{DROP}' leaves a class out)")
    lookup, unmapped = [], []
    for name in source_classes:
        target = class_map.get(name, name if name in model_classes else None)
        if target is None:
            unmapped.append(name)
        lookup.append(-1 if target in (None, DROP) else model_classes.index(target))
    if unmapped:
        raise data.DataError(
            f"source classes {unmapped} have no counterpart among the model's classes "
            f"{model_classes}; map them with --class-map 'SOURCE=MODEL_CLASS,...' (or "
            f"'SOURCE={DROP}' to leave them out)")
    return np.asarray(lookup, dtype=np.int64)


def resolve_data(source: str, info: dict, workdir: Path, cache_dir: Path | None = None,
                 own_classes: bool = False) -> Path:
    """A prepared dataset dir as-is, or a raw source prepared with the model's own settings
    (size, channels; classes unless ``own_classes``) and its splits kept as given."""
    if data.is_prepared(source):
        return Path(source)
    prepared = workdir / "prepared"
    data.preprocess(source, prepared, image_size=info["image_size"], channels=info["channels"],
                    class_names=None if own_classes else info["class_names"],
                    carve_missing=False, cache_dir=cache_dir)
    return prepared


def _eval_sets(source: str, info: dict, workdir: Path, splits: list[str],
               class_map: dict[str, str], cache_dir: Path | None,
               merge_as: str | None) -> dict[str, tuple[data.Split, dict]]:
    """{name: (split with the model's labels, provenance for metrics.json)}.

    ``merge_as``: evaluate one set of that name, the source's ``test`` split when it has one,
    else all its splits together (an external dataset is unseen data as a whole).
    """
    if (Path(source) / data.MANIFEST).exists():
        integrity.read_manifest(Path(source))  # bounded, before is_prepared reads it whole
    data_dir = resolve_data(source, info, workdir, cache_dir, own_classes=bool(class_map))
    manifest = integrity.read_manifest(data_dir)
    model_classes = list(info["class_names"])
    if not class_map and manifest["class_names"] != model_classes:
        raise data.DataError(f"{source}: classes {manifest['class_names']} differ from the "
                             f"model's {model_classes}; map them with --class-map")
    lookup = label_lookup(list(manifest["class_names"]), model_classes, class_map)
    available = list(manifest["splits"])
    if merge_as:
        wanted = ["test"] if "test" in available else available
    else:
        wanted = splits
        missing = [s for s in splits if s not in available]
        if missing:
            raise data.DataError(f"{source}: no split(s) {missing} "
                                 f"(available: {', '.join(available)})")
    # Labels in range, shapes and sha256 as the manifest recorded: a tampered split is refused.
    loaded = {name: integrity.load_checked_split(data_dir, name, manifest) for name in wanted}
    if merge_as:
        loaded = {merge_as: data.Split(np.concatenate([s.images for s in loaded.values()]),
                                       np.concatenate([s.labels for s in loaded.values()]))}
    provenance: dict[str, Any] = {"data_source": source}
    if class_map:
        provenance.update({"class_map": class_map,
                           "source_class_names": list(manifest["class_names"])})
    if merge_as:
        provenance["source_splits"] = wanted
    sets = {}
    for name, split in loaded.items():
        labels = lookup[split.labels]
        keep = labels >= 0
        if not keep.any():
            raise data.DataError(f"{source}: split {name!r} has no image left after the class map")
        prov = dict(provenance)
        if class_map:
            prov["dropped"] = int((~keep).sum())
        # Indexing copies a memory-mapped split into memory: only when images are left out.
        images = split.images if keep.all() else split.images[keep]
        sets[name] = (data.Split(images, labels[keep]), prov)
    return sets


# --------------------------------------------------------------------------- evaluation


def evaluate_split(predictor: Predictor, split: data.Split, split_name: str, output: Path,
                   extra: dict | None = None, explain: bool = True) -> dict:
    """Predict one split and write its metrics, predictions, ROC points and plots."""
    info = predictor.info
    class_names = list(info["class_names"])
    probs, latency_ms = predictor.predict(split.images)
    result = metrics.compute_metrics(split.labels, probs, class_names, info["threshold"])
    result.update({"split": split_name, "model_name": info["model_name"],
                   "threshold_method": info.get("threshold_method"),
                   "latency_ms": latency_ms, "latency_batch_size": PREDICT_BATCH,
                   "latency_device": _device(), **(extra or {})})
    output.mkdir(parents=True, exist_ok=True)
    predictions = pd.DataFrame({"y_true": split.labels})
    for i, name in enumerate(class_names):
        predictions[f"prob_{name}"] = probs[:, i]
    predictions.to_csv(output / PREDICTIONS_FILE, index=False)
    if len(class_names) == 2:
        (output / ROC_FILE).write_text(json.dumps(roc_points(split.labels, probs[:, 1])))
    title = f"{info['model_name']} — {split_name}"
    threshold = info["threshold"]
    plots.plot_confusion_matrix(result["confusion_matrix"], class_names,
                                output / "confusion_matrix.png", title=title)
    plots.plot_roc(split.labels, probs, class_names, output / "roc.png",
                   threshold=threshold, title=title)
    plots.plot_pr(split.labels, probs, class_names, output / "pr.png", threshold=threshold,
                  title=title)
    plots.plot_reliability(split.labels, probs, class_names, output / "reliability.png",
                           title=title)
    result["gradcam"] = None
    if explain and not predictor.is_ensemble:
        result["gradcam"] = gradcam.gradcam_grid(
            predictor.members[0], split.images, split.labels, probs, class_names, threshold,
            output / "gradcam.png", per_category=GRADCAM_PER_CATEGORY, title=title)
        result["gradcam"]["path"] = "gradcam.png"  # relative: the dir may be moved or uploaded
    (output / METRICS_FILE).write_text(json.dumps(result, indent=2))
    return result


def evaluate(model_dir: Path, source: str, output: Path, splits: list[str] | None = None,
             cache_dir: Path | None = None, class_map: str | dict[str, str] | None = None,
             explain: bool = True) -> dict[str, dict]:
    """Evaluate ``model_dir`` on ``splits`` (default: test) of ``source``; writes
    ``<output>/<split>/metrics.json``, plots and ``<output>/report.html``. Returns
    {split: metrics}. ``class_map`` ("SRC=model_class,...") relabels a source whose classes are
    named differently; ``explain`` draws the Grad-CAM grid (single models only)."""
    return _run(model_dir, source, Path(output), splits or ["test"], cache_dir,
                parse_class_map(class_map), None, explain)


def evaluate_external(model_dir: Path, source: str, output: Path,
                      class_map: str | dict[str, str] | None = None,
                      cache_dir: Path | None = None, name: str = EXTERNAL_SPLIT,
                      explain: bool = True) -> dict[str, dict]:
    """Evaluate on another dataset as one set called ``name`` (its test split if it has one,
    else all of it): ``<output>/<name>/``. Returns {name: metrics}."""
    return _run(model_dir, source, Path(output), [], cache_dir, parse_class_map(class_map),
                name, explain)


def _run(model_dir: Path, source: str, output: Path, splits: list[str],
         cache_dir: Path | None, class_map: dict[str, str], merge_as: str | None,
         explain: bool) -> dict[str, dict]:
    predictor = load_predictor(model_dir)
    with staging.stop_on_signals(), tempfile.TemporaryDirectory(prefix="lungxray-eval-") as workdir:
        # Everything is loaded and checked before the first output is written.
        sets = _eval_sets(str(source), predictor.info, Path(workdir), splits, class_map,
                          cache_dir, merge_as)
        output.mkdir(parents=True, exist_ok=True)
        # Written into a staging dir and moved into place once complete: a failure leaves no
        # half-evaluated split, a re-run no stale file (an old Grad-CAM grid).
        # Removed on SIGTERM/SIGINT too; a SIGKILLed run's one is swept by the next run.
        with staging.staging_dir(output, ".eval-build-", "lungxray evaluate") as build:
            results = {name: evaluate_split(predictor, split, name, Path(build) / name, prov,
                                            explain)
                       for name, (split, prov) in sets.items()}
            write_report(results, Path(build))
            for name in [*results, REPORT_FILE]:  # the report, which lists them, last
                if (output / name).is_dir():
                    shutil.rmtree(output / name)
                os.replace(Path(build) / name, output / name)
    return results


# --------------------------------------------------------------------------- summaries

SCALARS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision", "sensitivity",
           "specificity", "npv", "f1", "mcc", "brier", "ece", "threshold", "latency_ms")
SCALAR_CIS = ("roc_auc", "sensitivity", "specificity")
LABELS = {"precision": "PPV (precision)", "sensitivity": "sensitivity (recall)",
          "npv": "NPV", "roc_auc": "ROC AUC", "pr_auc": "PR AUC (AP)", "mcc": "MCC",
          "ece": "ECE", "brier": "Brier", "f1": "F1", "latency_ms": "latency ms/image"}


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
    """``<split>_<metric>`` (and ``_ci_lo``/``_ci_hi`` for a few) for a fixed list of metrics,
    so every trial logs the same names; undefined values are left out."""
    out = {}
    for split, values in results.items():
        for name in SCALARS:
            if values.get(name) is not None:
                out[f"{split}_{name}"] = float(values[name])
        for name in SCALAR_CIS:
            ci = (values.get("ci") or {}).get(name)
            if ci:
                out[f"{split}_{name}_ci_lo"], out[f"{split}_{name}_ci_hi"] = map(float, ci)
    return out


def format_value(values: dict, name: str) -> str:
    """``0.9123 [0.8901, 0.9302]``: the value with its 95% CI when there is one."""
    value = values.get(name)
    if value is None:
        return "—"
    ci = (values.get("ci") or {}).get(name)
    text = f"{value:.4f}" if name != "latency_ms" else f"{value:.2f}"
    return f"{text} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else text


def describe(results: dict[str, dict]) -> str:
    """A Markdown table of the headline metrics (with 95% CIs) per split."""
    model_name = next(iter(results.values()))["model_name"]
    names = list(results)
    lines = [f"# {model_name}", "",
             "Metrics at the threshold chosen on validation; 95% stratified bootstrap CIs.", "",
             "| metric | " + " | ".join(f"{s} (n={results[s]['n']})" for s in names) + " |",
             "|---|" + "---:|" * len(names)]
    for name in SCALARS:
        if any(results[s].get(name) is not None for s in names):
            cells = [format_value(results[s], name) for s in names]
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    at_half = [s for s in names if results[s].get("at_0.5")]
    if at_half:
        lines += ["", "At threshold 0.5 (for comparison with published MedMNIST numbers):", "",
                  "| metric | " + " | ".join(at_half) + " |", "|---|" + "---:|" * len(at_half)]
        for name in metrics.AT_HALF:
            cells = [f"{results[s]['at_0.5'][name]:.4f}" for s in at_half]
            lines.append(f"| {LABELS.get(name, name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _png_tag(path: Path, alt: str) -> str:
    b64 = plots.png_base64(path)
    return plots.img_tag(b64, alt) if b64 else ""


def report_html(results: dict[str, dict], output: Path) -> str:
    """A self-contained HTML page (images embedded) of one model's evaluation."""
    model_name = str(next(iter(results.values()))["model_name"])
    rows = "".join(
        f"<tr><td>{html.escape(LABELS.get(m, m))}</td>"
        + "".join(f"<td>{html.escape(format_value(results[s], m))}</td>" for s in results)
        + "</tr>"
        for m in SCALARS if any(results[s].get(m) is not None for s in results))
    head = "".join(f"<th>{html.escape(s)} (n={results[s]['n']})</th>" for s in results)
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(model_name)} evaluation</title>",
        "<style>body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;"
        "padding:3px 6px}img{max-width:100%;margin:4px}</style></head><body>",
        f"<h1>{html.escape(model_name)}</h1>",
        "<p>Metrics at the decision threshold chosen on validation (never on the split shown), "
        "with 95% stratified bootstrap confidence intervals.</p>",
        f"<table><tr><th>metric</th>{head}</tr>{rows}</table>",
    ]
    for split, values in results.items():
        parts.append(f"<h2>{html.escape(split)}</h2>")
        for name in PLOT_FILES:
            parts.append(_png_tag(output / split / name, f"{model_name} {split} {name[:-4]}"))
        if values.get("gradcam") is None:
            parts.append("<p>No Grad-CAM grid: not drawn for ensembles (no single feature map) "
                         "or when explanations are switched off.</p>")
    parts.append("<p>Research software, not a medical device.</p></body></html>")
    return "\n".join(parts) + "\n"


def write_report(results: dict[str, dict], output: Path) -> Path:
    """``<output>/report.html`` for the splits just evaluated."""
    path = Path(output) / REPORT_FILE
    path.write_text(report_html(results, Path(output)), encoding="utf-8")
    return path
