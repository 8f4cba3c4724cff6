"""Evaluate a trained model (or a saved ensemble) on splits of a prepared dataset or any raw source.

The decision threshold is the one saved with the model (chosen on validation at training time),
never one fitted to the split being evaluated. A source from elsewhere (another hospital) may name
its classes differently: ``class_map`` maps its class names onto the model's.
"""

from __future__ import annotations

import json
import logging
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

from lungxray import (
    data,
    gradcam,
    integrity,
    metrics,
    model_loader,
    plots,
    prepare,
    prevalence,
    safeio,
    schema,
    shift,
    site_metrics,
    staging,
)
from lungxray import robustness as suite  # module name; `robustness` is an option below
from lungxray.artifacts import EVAL_REPORT_FILE as REPORT_FILE
from lungxray.artifacts import (
    GROUP_COLUMN,
    METRICS_FILE,
    PREDICTIONS_FILE,
    ROBUSTNESS_FILE,
    ROC_FILE,
    split_order,
    trained_splits,
)
from lungxray.errors import ConfigError, DataError, quote, quote_repr
from lungxray.evaluation_report import write_report
from lungxray.predictor import PREDICT_BATCH, Predictor, device_name

log = logging.getLogger(__name__)
EXTERNAL_SPLIT = "external"
MAX_ROC_POINTS = 200  # the KFP UI renders every point; a few hundred draw the same curve
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
    prepare.preprocess(source, prepared, image_size=info["image_size"], channels=info["channels"],
                       class_names=None if own_classes else info["class_names"],
                       carve_missing=False, cache_dir=cache_dir)
    return prepared


def dataset_splits(data_dir: str | Path) -> list[str]:
    """The splits of a prepared dataset to evaluate: every one but ``train``, val first, then
    test, then the others (a shifted proxy, ...) by name."""
    names = [s for s in integrity.read_manifest(Path(data_dir))["splits"] if s != "train"]
    return sorted(names, key=split_order)


def _eval_sets(source: str, info: dict, workdir: Path, splits: list[str],
               class_map: dict[str, str], cache_dir: Path | None,
               merge_as: str | None) -> dict[str, tuple[data.Split, dict, np.ndarray | None]]:
    """{name: (split with the model's labels, provenance for metrics.json, the site of each
    row or None for a dataset without sites)}.

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
    site_of = {name: site_metrics.site_rows(manifest, name, str(source)) for name in wanted}
    if merge_as:
        loaded = {merge_as: data.Split(np.concatenate([s.images for s in loaded.values()]),
                                       np.concatenate([s.labels for s in loaded.values()]))}
        parts = list(site_of.values())
        site_of = {merge_as: None if any(p is None for p in parts) else np.concatenate(parts)}
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
        sites = site_of[name]
        sets[name] = (data.Split(images, labels[keep]), prov,
                      None if sites is None else sites[keep])
    return sets


# --------------------------------------------------------------------------- options


@dataclass(frozen=True)
class EvalOptions:
    """What evaluate adds to the metrics at the model's threshold.

    ``robustness``: AUC under the corruption suite of :mod:`lungxray.robustness` on a stratified
    subset of ``robustness_samples`` images per split (0 = all). ``tta``: also report the AUC of
    the mean over test-time views (the headline metrics stay those of the plain predictions,
    whose threshold validation chose). ``deployment_prevalence``: 0 keeps today's rule; in
    (0, 1) adds the Bayes operating point at that prevalence, with PPV/NPV there. ``reference``:
    an earlier evaluation dir whose ``val/predictions.csv`` calibrates the scores when val is
    not among the splits evaluated now.
    """

    robustness: bool = False  # the CLI and the pipeline turn it on by default
    robustness_samples: int = suite.DEFAULT_SAMPLES
    tta: bool = False
    deployment_prevalence: float = 0.0
    reference: Path | None = None
    seed: int = 0

    def check(self) -> EvalOptions:
        schema.check_range("--robustness-samples", self.robustness_samples, 0, schema.MAX_COUNT)
        if self.deployment_prevalence:
            prevalence.check_prevalence(self.deployment_prevalence, "--deployment-prevalence")
        return self


# --------------------------------------------------------------------------- calibration


def _val_scores_from(reference: Path, model_name: str
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
    """(labels, positive-class scores, groups) of ``reference/val/predictions.csv`` written
    for ``model_name``, or None when there is none; groups None when it has no group column
    (written before the worst_group rule: one group)."""
    val_dir = reference / "val"
    if not (val_dir / PREDICTIONS_FILE).is_file() or not (val_dir / METRICS_FILE).is_file():
        return None
    info = safeio.load_json_object(val_dir / METRICS_FILE, "validation metrics", error=DataError)
    if info.get("model_name") != model_name:
        raise DataError(f"{val_dir / METRICS_FILE}: validation predictions of model "
                        f"{quote(str(info.get('model_name')), 60)}, not {model_name!r}")
    table = pd.read_csv(val_dir / PREDICTIONS_FILE)
    classes = info.get("class_names") or []
    column = f"prob_{classes[1]}" if len(classes) == 2 else None
    if column not in table.columns or "y_true" not in table.columns:
        raise DataError(f"{val_dir / PREDICTIONS_FILE} lacks y_true or {column}")
    groups = table[GROUP_COLUMN].astype(str).to_numpy() if GROUP_COLUMN in table else None
    return table["y_true"].to_numpy(), table[column].to_numpy(), groups


def _validation_scores(info: dict, probs: dict[str, np.ndarray],
                       labels: dict[str, np.ndarray], options: EvalOptions, output: Path,
                       groups: np.ndarray | None = None
                       ) -> tuple[np.ndarray, np.ndarray, str, np.ndarray | None] | None:
    """(labels, positive-class scores, where, groups) of a two-class model's validation
    predictions: the val split evaluated now (``groups``: its rows' groups), else
    ``reference`` (or an earlier evaluation in ``output``) with the groups saved there.
    None for multi-class models or without validation data; an error then only if a
    deployment prevalence was asked for."""
    if len(info["class_names"]) != 2:
        if options.deployment_prevalence:
            raise ConfigError("--deployment-prevalence needs a two-class model")
        return None
    if "val" in probs:
        return labels["val"], probs["val"][:, 1], "split 'val'", groups
    for ref in (options.reference, output):
        found = _val_scores_from(Path(ref), info["model_name"]) if ref is not None else None
        if found is not None:
            return found[0], found[1], f"{ref}/val/{PREDICTIONS_FILE}", found[2]
    if options.reference is not None:
        raise ConfigError(f"--reference {options.reference}: no val/{PREDICTIONS_FILE} there")
    if options.deployment_prevalence:
        raise ConfigError("--deployment-prevalence needs validation predictions: evaluate "
                          "--split val too, or give --reference EVAL_DIR (an evaluation with "
                          "val/)")
    return None


# --------------------------------------------------------------------------- evaluation


def _robustness(predictor: Predictor, split: data.Split, split_name: str, output: Path,
                options: EvalOptions, title: str) -> dict:
    """The corruption suite on one split: summary for metrics.json, the per-image table and
    the AUC-vs-severity chart written into ``output``."""
    class_names = list(predictor.info["class_names"])
    summary, table = suite.evaluate_robustness(
        predictor.probabilities, split.images, split.labels, class_names,
        samples=options.robustness_samples, seed=options.seed)
    table.to_csv(output / ROBUSTNESS_FILE, index=False)
    plots.plot_robustness(summary, output / "robustness.png", title=title)
    return summary


def _tta(predictor: Predictor, split: data.Split, probs: np.ndarray) -> dict:
    """AUC of the mean over test-time views next to the plain one."""
    start = time.perf_counter()
    tta_probs = suite.predict_tta(predictor.probabilities, split.images)
    auc, plain = metrics.roc_auc(split.labels, tta_probs), metrics.roc_auc(split.labels, probs)
    return {"views": list(suite.TTA_VIEWS), "roc_auc": auc, "roc_auc_plain": plain,
            "gain": None if auc is None or plain is None else auc - plain,
            "seconds": round(time.perf_counter() - start, 2),
            "note": "headline metrics use the plain predictions (the threshold was chosen on "
                    "plain validation predictions)"}


def _prevalence_blocks(result: dict, split: data.Split, split_name: str, scores: np.ndarray,
                       calibration: prevalence.Calibration | None, options: EvalOptions,
                       threshold: float | None) -> None:
    """Operating point at the deployment prevalence and, off validation, the EM estimate of
    the split's prevalence (labels unused), into ``result``."""
    if calibration is None:
        return
    result["prevalence"] = float(np.mean(split.labels == 1))
    result["calibration"] = calibration.as_dict()
    if options.deployment_prevalence:
        point = prevalence.operating_point(calibration, split.labels, scores,
                                           options.deployment_prevalence, threshold)
        result["operating_point"] = point
        result.update({f"deploy_{k}": point[k] for k in ("threshold", "sensitivity",
                                                         "specificity", "ppv", "npv")})
    if split_name != "val":
        estimate = prevalence.estimate_prevalence(calibration, scores, split.labels,
                                                  seed=options.seed)
        result["prevalence_estimate"] = estimate
        result["prevalence_em"] = estimate["estimate"]
        if estimate["ci"]:
            result.setdefault("ci", {})["prevalence_em"] = estimate["ci"]


def evaluate_split(predictor: Predictor, split: data.Split, split_name: str, output: Path,
                   extra: dict | None = None, explain: bool = True,
                   options: EvalOptions = EvalOptions(),
                   predicted: tuple[np.ndarray, float] | None = None,
                   calibration: prevalence.Calibration | None = None,
                   sites: np.ndarray | None = None,
                   rule_thresholds: dict[str, float | None] | None = None,
                   groups: np.ndarray | None = None) -> dict:
    """Predict one split (unless ``predicted`` gives (probabilities, latency)) and write its
    metrics, predictions, ROC points and plots, plus robustness, TTA and prevalence evidence as
    ``options`` ask. ``sites`` (the site of each row) adds per-site numbers
    (:mod:`lungxray.site_metrics`) when the split holds more than one site.
    ``rule_thresholds`` (each threshold rule's threshold on validation) adds
    ``threshold_rules``: the split's accuracy, balanced accuracy, sensitivity and specificity
    at each, the evidence for choosing a rule; the headline metrics stay at the model's own.
    ``groups`` (val's rows' groups for the worst_group rule) become predictions.csv's
    ``group`` column, so compare chooses an ensemble's threshold on the same groups."""
    info = predictor.info
    class_names = list(info["class_names"])
    probs, latency_ms = predicted if predicted is not None else predictor.predict(split.images)
    result = metrics.compute_metrics(split.labels, probs, class_names, info["threshold"])
    result.update({"split": split_name, "model_name": info["model_name"],
                   "threshold_method": info.get("threshold_method"),
                   "latency_ms": latency_ms, "latency_batch_size": PREDICT_BATCH,
                   "latency_device": device_name(), **(extra or {})})
    site_metrics.add_per_site(result, split.labels, probs, sites, class_names,
                              info["threshold"], info.get(site_metrics.SITE_THRESHOLDS))
    output.mkdir(parents=True, exist_ok=True)
    predictions = pd.DataFrame({"y_true": split.labels})
    for i, name in enumerate(class_names):
        predictions[f"prob_{name}"] = probs[:, i]
    if sites is not None:
        predictions[site_metrics.SITE_COLUMN] = sites
    if groups is not None:
        predictions[GROUP_COLUMN] = groups
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
    result["robustness"] = None
    if options.robustness:
        result["robustness"] = _robustness(predictor, split, split_name, output, options, title)
        result.update({"robust_auc": result["robustness"]["mean_corrupted_auc"],
                       "worst_corrupted_auc": result["robustness"]["worst_corrupted_auc"],
                       "robust_auc_drop": result["robustness"]["drop"]})
    if options.tta:
        result["tta"] = _tta(predictor, split, probs)
        result["tta_roc_auc"] = result["tta"]["roc_auc"]
    if len(class_names) == 2:
        _prevalence_blocks(result, split, split_name, probs[:, 1], calibration, options,
                           threshold)
        if rule_thresholds:
            result["threshold_rules"] = metrics.threshold_rules_block(
                rule_thresholds, split_name, split.labels, probs[:, 1])
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
             explain: bool = True, options: EvalOptions = EvalOptions(),
             external: str | None = None,
             external_class_map: str | dict[str, str] | None = None) -> dict[str, dict]:
    """Evaluate ``model_dir`` on ``splits`` (default: test) of ``source``; writes
    ``<output>/<split>/metrics.json``, plots and ``<output>/report.html``. Returns
    {split: metrics}. ``class_map`` ("SRC=model_class,...") relabels a source whose classes are
    named differently; ``explain`` draws the Grad-CAM grid (single models only); ``options``:
    robustness, TTA and prevalence (:class:`EvalOptions`). ``external`` (another labelled
    source; empty = none) is evaluated after them as one more split, ``external``
    (:func:`evaluate_external`, ``external_class_map`` relabelling it), and the one report
    shows every split."""
    options = options.check()
    maps = parse_class_map(class_map), parse_class_map(external_class_map)  # refused up front
    results = _run(model_dir, source, Path(output), splits or ["test"], cache_dir, maps[0],
                   None, explain, options, report=not external)
    if external:
        # Calibrated on the val predictions just written into ``output`` (or the reference's).
        results.update(_run(model_dir, external, Path(output), [], cache_dir, maps[1],
                            EXTERNAL_SPLIT, explain, options, report=False))
        with staging.stop_on_signals():
            write_report(results, Path(output))
    return results


def evaluate_external(model_dir: Path, source: str, output: Path,
                      class_map: str | dict[str, str] | None = None,
                      cache_dir: Path | None = None, name: str = EXTERNAL_SPLIT,
                      explain: bool = True,
                      options: EvalOptions = EvalOptions()) -> dict[str, dict]:
    """Evaluate on another dataset as one set called ``name`` (its test split if it has one,
    else all of it): ``<output>/<name>/``. Returns {name: metrics}. Its prevalence is also
    estimated without its labels, from scores calibrated on ``options.reference``'s (default:
    ``output``'s) val predictions when there are any."""
    return _run(model_dir, source, Path(output), [], cache_dir, parse_class_map(class_map),
                name, explain, options.check())


def _check_not_trained_on(info: dict, splits: list[str], model_dir: Path) -> None:
    """A split the model learnt from (beside train: what a refit added) is refused: its score
    there would read as an estimate and is none."""
    learnt = sorted((set(splits) & trained_splits(info)) - {"train"})
    if learnt:
        raise ConfigError(f"{quote(str(model_dir))} was trained on split {learnt[0]!r} (a "
                          f"refit); its score there is no estimate: leave it out of --split")


def _run(model_dir: Path, source: str, output: Path, splits: list[str],
         cache_dir: Path | None, class_map: dict[str, str], merge_as: str | None,
         explain: bool, options: EvalOptions = EvalOptions(),
         report: bool = True) -> dict[str, dict]:
    """Evaluate and publish the sets of one source; ``report``: also its report.html (else
    the caller writes one report of every source, and an older one is removed first)."""
    predictor = model_loader.load(model_dir)
    _check_not_trained_on(predictor.info, splits if merge_as is None else [], model_dir)
    with staging.stop_on_signals(), tempfile.TemporaryDirectory(prefix="lungxray-eval-") as workdir:
        # Everything is loaded and checked before the first output is written.
        sets = _eval_sets(str(source), predictor.info, Path(workdir), splits, class_map,
                          cache_dir, merge_as)
        # Predicted first: validation's scores calibrate every split's prevalence evidence.
        predicted = {name: predictor.predict(split.images) for name, (split, _, _) in sets.items()}
        # Val's groups (site x image-statistics cluster) for the worst_group rule.
        groups = (shift.val_groups(sets["val"][0].images, sets["val"][2])
                  if "val" in sets and len(predictor.info["class_names"]) == 2 else None)
        val = _validation_scores(predictor.info, {n: p[0] for n, p in predicted.items()},
                                 {n: s.labels for n, (s, _, _) in sets.items()}, options,
                                 output, groups)
        calibration = prevalence.calibration_or_none(*val[:3]) if val else None
        # Every threshold rule chosen on the same validation scores, for the rules' evidence.
        rules = metrics.rule_thresholds(val[0], val[1], val[3]) if val else None
        output.mkdir(parents=True, exist_ok=True)
        # Written into a staging dir and moved into place once complete: a failure leaves no
        # half-evaluated split, a re-run no stale file (an old Grad-CAM grid).
        # Removed on SIGTERM/SIGINT too; a SIGKILLed run's one is swept by the next run.
        with staging.staging_dir(output, ".eval-build-", "lungxray evaluate") as build:
            results = {name: evaluate_split(predictor, split, name, Path(build) / name, prov,
                                            explain, options, predicted[name], calibration,
                                            sites, rules, groups if name == "val" else None)
                       for name, (split, prov, sites) in sets.items()}
            if report:
                write_report(results, Path(build))
            else:  # it would show the splits about to be replaced
                (output / REPORT_FILE).unlink(missing_ok=True)
            for name in [*results, *([REPORT_FILE] if report else [])]:  # the report last
                if (output / name).is_dir():
                    shutil.rmtree(output / name)
                os.replace(Path(build) / name, output / name)
    return results
