"""Compare trained trials and write the report that tells the user which model to trust.

A *trial dir* holds ``model/`` (train output), ``eval/<split>/`` (evaluate output) and optionally
``tune/``. :func:`compare` reads several trials, adds an ensemble candidate (mean probability of
the top-k models on the selection metric), ranks everything on a validation metric only, and
writes ``results.csv``, ``results.md`` (full table), ``report.md`` and a self-contained
``report.html`` (headline metrics with 95% CIs, charts, per-model plots), ``model_card.md``,
``summary.json`` and ``best_model/`` (a copy of the winner's ``model/``; for an ensemble,
``ensemble.json`` + ``model_info.json`` + ``members/<name>/``, which ``lungxray evaluate`` reads).
"""

from __future__ import annotations

import html
import json
import math
import os
import shutil
import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import metrics as metrics_lib
from lungxray import prevalence, robustness, safeio, staging
from lungxray.errors import ConfigError, DataError, quote, quote_repr
from lungxray.modelcard import model_card, target_sensitivity_of
from lungxray.plots import (
    img_tag,
    plot_confusion_matrix,
    plot_history,
    plot_history_grid,
    plot_metric_bars,
    plot_pr,
    plot_reliability,
    plot_robustness,
    plot_robustness_overlay,
    plot_roc,
    plot_roc_overlay,
    png_base64,
)

# Per-split metrics copied into the table, in display order (absent ones are skipped).
TABLE_METRICS = (
    "accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision", "sensitivity",
    "specificity", "npv", "f1", "mcc", "brier", "ece", "accuracy_at_0.5", "threshold", "n",
    "robust_auc", "worst_corrupted_auc", "robust_auc_drop", "tta_roc_auc", "deploy_threshold",
    "deploy_sensitivity", "deploy_specificity", "deploy_ppv", "deploy_npv", "prevalence",
    "prevalence_em",
)
# Metrics a model may be selected on: scores of the model. Thresholds, sizes, prevalences and
# the figures at a chosen deployment prevalence describe the split or the setting instead.
SELECTABLE = frozenset(TABLE_METRICS) - {
    "threshold", "n", "prevalence", "prevalence_em", "deploy_threshold", "deploy_sensitivity",
    "deploy_specificity", "deploy_ppv", "deploy_npv"}
LOWER_IS_BETTER = frozenset({"brier", "ece", "robust_auc_drop"})
BAR_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")
# The headline table: each with its 95% CI.
HEADLINE_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "npv",
                    "balanced_accuracy", "f1", "mcc", "brier", "ece", "robust_auc",
                    "robust_auc_drop")
HEADLINE_LABELS = {"roc_auc": "ROC AUC", "pr_auc": "PR AUC", "sensitivity": "sensitivity",
                   "specificity": "specificity", "precision": "PPV", "npv": "NPV",
                   "balanced_accuracy": "bal. accuracy", "f1": "F1", "mcc": "MCC",
                   "brier": "Brier", "ece": "ECE", "robust_auc": "robust AUC",
                   "robust_auc_drop": "AUC drop (shift)"}
SELECT_SPLIT = "val"
# Files whose presence marks an existing directory as an earlier report we may replace.
REPORT_MARKERS = ("summary.json", "report.html")
SPLIT_PLOTS = ("confusion_matrix", "roc", "pr", "reliability", "robustness", "gradcam")
ROBUSTNESS_FILE = "robustness_predictions.csv"  # lungxray.evaluate writes it
ENSEMBLE_DIR = "ensemble"
ENSEMBLE_FILE = "ensemble.json"  # same names as lungxray.evaluate, which reads them
MEMBERS_DIR = "members"


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, trial_dir: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} ({path}) in trial dir {trial_dir}")
    return safeio.load_json_object(path, path.name)


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object, read within the limits."""
    return safeio.load_json_object(path, path.name)


def _split_order(name: str) -> tuple[int, str]:
    """val first, then test, then any other split alphabetically."""
    return ({"val": 0, "test": 1}.get(name, 2), name)


def _load_split(split_dir: Path, trial_dir: Path, info: dict) -> dict[str, Any]:
    metrics = _read_json(split_dir / "metrics.json", trial_dir)
    name = info["model_name"]
    if metrics.get("model_name", name) != name:
        raise DataError(
            f"{split_dir / 'metrics.json'} is for model "
            f"{quote(str(metrics.get('model_name')), 60)}, "
            f"but trial dir {trial_dir} holds {name!r}"
        )
    if metrics.get("split", split_dir.name) != split_dir.name:
        raise DataError(
            f"{split_dir / 'metrics.json'} says split {quote(str(metrics.get('split')), 40)} "
            f"but lives in {split_dir.name!r}"
        )
    if "confusion_matrix" not in metrics:
        raise DataError(f"{split_dir / 'metrics.json'} lacks 'confusion_matrix'")
    if list(metrics.get("class_names", info["class_names"])) != list(info["class_names"]):
        raise DataError(f"class_names in {split_dir / 'metrics.json'} differ from model_info.json")
    pred_path = split_dir / "predictions.csv"
    if not pred_path.is_file():
        raise FileNotFoundError(f"missing predictions.csv ({pred_path}) in trial dir {trial_dir}")
    preds = pd.read_csv(pred_path)
    wanted = ["y_true"] + [f"prob_{c}" for c in info["class_names"]]
    lacking = [c for c in wanted if c not in preds.columns]
    if lacking:
        raise DataError(f"{pred_path} lacks columns {lacking} (trial dir {trial_dir})")
    if "n" in metrics and int(metrics["n"]) != len(preds):
        raise DataError(
            f"{pred_path} has {len(preds)} rows but metrics.json says n={metrics['n']}"
        )
    robust = split_dir / ROBUSTNESS_FILE
    return {"dir": split_dir, "metrics": metrics, "predictions": preds,
            "robustness": pd.read_csv(robust) if robust.is_file() else None}


def load_trial(trial_dir: Path) -> dict[str, Any]:
    """Read one trial dir: model info, history and every evaluated split.

    Returns ``{"trial_dir", "model_dir", "eval_dir", "tune_dir" (or None), "model_info",
    "history", "phases", "splits": {split: {"dir", "metrics", "predictions" (DataFrame)}}}``
    with splits ordered val, test, then others. Raises FileNotFoundError naming the missing file.
    """
    trial_dir = Path(trial_dir)
    model_dir, eval_dir, tune_dir = trial_dir / "model", trial_dir / "eval", trial_dir / "tune"
    info = _read_json(model_dir / "model_info.json", trial_dir)
    for key in ("model_name", "class_names"):
        if key not in info:
            raise DataError(f"model_info.json in trial dir {trial_dir} lacks {key!r}")
    if not (model_dir / "model.keras").exists():
        raise FileNotFoundError(f"missing model.keras ({model_dir / 'model.keras'}) "
                                f"in trial dir {trial_dir}")
    hist = _read_json(model_dir / "history.json", trial_dir)
    if not isinstance(hist, dict) or not isinstance(hist.get("history"), dict):
        raise DataError(f"history.json in trial dir {trial_dir} lacks a 'history' mapping")
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"missing eval/ directory ({eval_dir}) in trial dir {trial_dir}")
    split_dirs = sorted((d for d in eval_dir.iterdir() if d.is_dir()),
                        key=lambda d: _split_order(d.name))
    if not split_dirs:
        raise FileNotFoundError(f"no eval/<split>/ directory in trial dir {trial_dir}")
    return {
        "trial_dir": trial_dir,
        "model_dir": model_dir,
        "eval_dir": eval_dir,
        "tune_dir": tune_dir if tune_dir.is_dir() else None,
        "model_info": info,
        "history": hist["history"],
        "phases": list(hist.get("phases") or []),
        "splits": {d.name: _load_split(d, trial_dir, info) for d in split_dirs},
    }


# --------------------------------------------------------------------------- pairing


def _eval_model_name(eval_dir: Path) -> str:
    found = [_json_object(p).get("model_name")
             for p in sorted(Path(eval_dir).glob("*/metrics.json"))]
    if not found:
        raise FileNotFoundError(f"no <split>/metrics.json in eval dir {eval_dir}")
    names = {n if isinstance(n, str) else None for n in found}
    if len(names) != 1 or None in names:
        raise DataError(f"eval dir {eval_dir} mixes or lacks model names: "
                        f"{quote_repr(sorted(map(str, names)), 200)}")
    return names.pop()


def _tune_model_name(tune_dir: Path) -> str:
    # tune writes best_hparams.json with the model name; other top-level JSON files are a fallback
    # so that a renamed file still pairs.
    paths = sorted(Path(tune_dir).glob("*.json"), key=lambda p: (p.name != "best_hparams.json", p))
    for path in paths:
        data = safeio.load_json(path, path.name)
        if isinstance(data, dict) and data.get("model_name"):
            return str(data["model_name"])
    raise DataError(f"no top-level *.json with a 'model_name' in tune dir {tune_dir}")


def _by_name(dirs: list[Path], namer: Any, kind: str) -> dict[str, Path]:
    named: dict[str, list[Path]] = {}
    for d in dirs:
        name = namer(Path(d))
        if not isinstance(name, str):
            raise DataError(f"{kind} dir {quote(str(d))}: model_name must be a string, got "
                            f"{type(name).__name__}")
        named.setdefault(name, []).append(Path(d))
    dupes = {n: [str(p) for p in ps] for n, ps in named.items() if len(ps) > 1}
    if dupes:
        raise DataError(f"duplicate model names among {kind} dirs: {quote_repr(dupes, 300)}")
    return {n: ps[0] for n, ps in named.items()}


def _check_dir_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"model name {quote(name, 60)} cannot be used as a directory name")


def pair_trials(
    model_dirs: list[Path],
    eval_dirs: list[Path],
    tune_dirs: list[Path] | None,
    workdir: Path,
) -> list[Path]:
    """Pair model/eval(/tune) outputs by ``model_name`` and lay them out as trial dirs.

    KFP's ``dsl.Collected`` gives separate lists whose order need not match; this links
    ``workdir/<model_name>/{model,eval,tune}`` to the matching inputs (symlinks, nothing copied) and
    returns the trial dirs sorted by model name. Duplicate or unmatched names raise ValueError.
    """
    models = _by_name(
        model_dirs, lambda d: _read_json(d / "model_info.json", d)["model_name"], "model"
    )
    evals = _by_name(eval_dirs, _eval_model_name, "eval")
    tunes = _by_name(tune_dirs or [], _tune_model_name, "tune")
    problems = []
    if set(models) - set(evals):
        problems.append(f"models without evaluation: {sorted(set(models) - set(evals))}")
    if set(evals) - set(models):
        problems.append(f"evaluations without model: {sorted(set(evals) - set(models))}")
    if set(tunes) - set(models):
        problems.append(f"tuning runs without model: {sorted(set(tunes) - set(models))}")
    if problems:
        raise DataError("cannot pair trials: " + quote("; ".join(problems), 400)[1:-1])
    for name in models:
        _check_dir_name(name)  # all names first, so a bad one leaves no partial layout
    workdir = Path(workdir)
    trials = []
    for name in sorted(models):
        trial = workdir / name
        trial.mkdir(parents=True, exist_ok=False)
        (trial / "model").symlink_to(models[name].resolve(), target_is_directory=True)
        (trial / "eval").symlink_to(evals[name].resolve(), target_is_directory=True)
        if name in tunes:
            (trial / "tune").symlink_to(tunes[name].resolve(), target_is_directory=True)
        trials.append(trial)
    return trials


# --------------------------------------------------------------------------- table & ranking


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}_{key}", sub, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(value)  # keep one cell per hparam so the CSV stays rectangular
    else:
        out[prefix] = value


def _held_out_value(trial: dict[str, Any], key: str) -> Any:
    """A per-split fact (latency) from the test split, else the first split."""
    splits = trial["splits"]
    return splits["test" if "test" in splits else next(iter(splits))]["metrics"].get(key)


def _model_size_mb(trial: dict[str, Any]) -> float | None:
    if trial.get("members"):
        return trial["model_info"].get("size_mb")
    path = Path(trial["model_dir"]) / "model.keras"
    return round(path.stat().st_size / 1e6, 3) if path.is_file() else None


def _row(trial: dict[str, Any]) -> dict[str, Any]:
    info = trial["model_info"]
    row: dict[str, Any] = {
        "model_name": info["model_name"],
        "members": "+".join(trial.get("members") or []),
        "weights": info.get("weights"),
        "params": info.get("params"),
        "size_mb": _model_size_mb(trial),
        "train_seconds": info.get("train_seconds"),
        "epochs": info.get("epochs"),
        "latency_ms": _held_out_value(trial, "latency_ms"),
        "latency_device": _held_out_value(trial, "latency_device"),
    }
    hp: dict[str, Any] = {}
    _flatten("hp", info.get("hparams") or {}, hp)
    row.update(hp)
    for split, data in trial["splits"].items():
        cis = data["metrics"].get("ci") or {}
        for metric in TABLE_METRICS:
            if metric in data["metrics"]:
                value = data["metrics"][metric]
                row[f"{split}_{metric}"] = np.nan if value is None else value
            if metric in cis:
                lo, hi = cis[metric] or (np.nan, np.nan)
                row[f"{split}_{metric}_ci_lo"], row[f"{split}_{metric}_ci_hi"] = lo, hi
    return row


FIXED_COLUMNS = ["model_name", "members", "weights", "params", "size_mb", "train_seconds",
                 "epochs", "latency_ms", "latency_device"]


def build_table(trials: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial: identity, size and speed, hparams (``hp_*``) and ``<split>_<metric>``
    columns, each followed by ``_ci_lo``/``_ci_hi`` where the metric has a CI."""
    rows = [_row(t) for t in trials]
    hp_cols = sorted({k for r in rows for k in r if k.startswith("hp_")})
    splits = sorted({s for t in trials for s in t["splits"]}, key=_split_order)
    metric_cols = [c for s in splits for m in TABLE_METRICS
                   for c in (f"{s}_{m}", f"{s}_{m}_ci_lo", f"{s}_{m}_ci_hi")
                   if any(c in r for r in rows)]
    return pd.DataFrame(rows, columns=FIXED_COLUMNS + hp_cols + metric_cols)


def check_select_metric(select_metric: str) -> str:
    """The metric name inside ``select_metric`` (``val_<metric>``); refuses test_* and unknowns."""
    if not select_metric.startswith(f"{SELECT_SPLIT}_"):
        if select_metric.startswith("test_"):
            raise ConfigError(
                f"select_metric={quote(select_metric, 60)}: never select on the test split; "
                "use a val_* metric"
            )
        raise ConfigError(f"select_metric={quote(select_metric, 60)} must start with 'val_'")
    metric = select_metric[len(SELECT_SPLIT) + 1:]
    if metric not in SELECTABLE:
        raise ConfigError(f"select_metric={quote(select_metric, 60)}: {quote(metric, 60)} is "
                          f"not one of "
                          f"{sorted(SELECTABLE)}")
    return metric


def rank_models(table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """Sort best first on ``select_metric``; undefined values last; ties go to a single model
    over an ensemble (simpler and faster for the same score), then by model name."""
    metric = check_select_metric(select_metric)
    if select_metric not in table.columns:
        raise ConfigError(f"no trial reports {select_metric!r}; columns: {list(table.columns)}")
    values = pd.to_numeric(table[select_metric], errors="coerce").astype(float)
    if values.isna().all():
        raise ConfigError(f"{select_metric!r} is undefined for every trial; cannot select")
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    members = table["members"] if "members" in table.columns else pd.Series("", table.index)
    key = pd.DataFrame({"missing": values.isna(), "score": sign * values.fillna(0.0),
                        "ensemble": members.fillna("").astype(str) != "",
                        "name": table["model_name"].astype(str)})
    order = key.sort_values(["missing", "score", "ensemble", "name"], kind="mergesort").index
    ranked = table.loc[order].reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


# --------------------------------------------------------------------------- validation


def _validate_trials(trials: list[dict[str, Any]], select_metric: str) -> None:
    names = [t["model_info"]["model_name"] for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate model names across trial dirs: {dupes}")
    classes = {json.dumps(list(t["model_info"]["class_names"])) for t in trials}
    if len(classes) > 1:
        raise ConfigError(f"trials disagree on class_names: {sorted(classes)}; not comparable")
    lacking = [t["model_info"]["model_name"] for t in trials if SELECT_SPLIT not in t["splits"]]
    if lacking:
        raise ConfigError(f"{select_metric!r} needs a {SELECT_SPLIT!r} split; "
                          f"missing for {quote_repr(lacking, 200)}")
    # Scores are only comparable on the same data: every split must have the same label counts.
    splits = {s for t in trials for s in t["splits"]}
    for split in sorted(splits):
        counts = {
            t["model_info"]["model_name"]: json.dumps(
                t["splits"][split]["predictions"]["y_true"].value_counts().sort_index()
                .astype(int).to_dict()
            )
            for t in trials if split in t["splits"]
        }
        if len(set(counts.values())) > 1:
            raise DataError(f"split {split!r} has different labels per model {counts}; "
                             "models were not evaluated on the same data")


# --------------------------------------------------------------------------- ensemble


class EnsembleSkipped(ValueError):
    """Why no ensemble candidate could be built (reported, not fatal)."""


def _common_target_sensitivity(infos: list[dict], given: float | None) -> float | None:
    """The target sensitivity for the ensemble's threshold: the one given, else the members'
    own when they all used the same, else None (Youden's J)."""
    if given:
        return float(given)
    targets = {target_sensitivity_of(info) for info in infos}
    return targets.pop() if len(targets) == 1 else None


def build_ensemble(trials: list[dict[str, Any]], ranked: pd.DataFrame, select_metric: str,
                   k: int = 2, target_sensitivity: float | None = None,
                   n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
                   seed: int = metrics_lib.DEFAULT_SEED) -> dict[str, Any]:
    """An ensemble candidate shaped like a loaded trial (no files yet).

    Members: the ``k`` best single models on ``select_metric`` (validation). Probabilities: the
    members' mean, from their saved predictions.csv. Threshold: chosen on the ensemble's own
    validation predictions, like any trial's. Raises EnsembleSkipped with the reason when it
    cannot be built.
    """
    if k < 2:
        raise EnsembleSkipped(f"ensemble_k={k}: an ensemble needs at least 2 members")
    defined = ranked[pd.to_numeric(ranked[select_metric], errors="coerce").notna()]
    if len(defined) < 2:
        raise EnsembleSkipped(f"fewer than 2 models with a defined {select_metric}")
    names = [str(n) for n in defined["model_name"].head(k)]
    by_name = {t["model_info"]["model_name"]: t for t in trials}
    members = [by_name[n] for n in names]
    infos = [m["model_info"] for m in members]
    classes = list(infos[0]["class_names"])
    for key in ("image_size", "channels"):
        if len({json.dumps(i.get(key)) for i in infos}) > 1:
            raise EnsembleSkipped(f"members differ in {key}: "
                                  f"{ {i['model_name']: i.get(key) for i in infos} }")
    splits = [s for s in members[0]["splits"] if all(s in m["splits"] for m in members)]
    labels = {s: members[0]["splits"][s]["predictions"]["y_true"].to_numpy() for s in splits}
    for member in members[1:]:
        for s in splits:
            if not np.array_equal(member["splits"][s]["predictions"]["y_true"].to_numpy(),
                                  labels[s]):
                raise EnsembleSkipped(
                    f"predictions of {member['model_info']['model_name']} on {s!r} are not in "
                    f"the same order as {names[0]}'s; cannot average them row by row")
    cols = [f"prob_{c}" for c in classes]
    probs = {s: np.mean([m["splits"][s]["predictions"][cols].to_numpy() for m in members],
                        axis=0) for s in splits}
    target = _common_target_sensitivity(infos, target_sensitivity)
    threshold, method = None, None
    if len(classes) == 2:
        threshold = metrics_lib.choose_threshold(labels[SELECT_SPLIT], probs[SELECT_SPLIT][:, 1],
                                                 target_sensitivity=target)
        method = f"sensitivity>={target}" if target else "youden"  # train's naming
    name = f"Ensemble-top{len(names)}"
    if name in by_name:
        raise EnsembleSkipped(f"a single model is already called {name!r}")
    info = {
        "model_name": name, "ensemble": True, "kind": "mean_probability", "members": names,
        "class_names": classes, "positive_class": 1 if len(classes) == 2 else None,
        "threshold": threshold, "threshold_method": method, "target_sensitivity": target,
        "image_size": infos[0].get("image_size"), "channels": infos[0].get("channels"),
        "weights": "members", "hparams": {},
        "params": _sum_or_none(i.get("params") for i in infos),
        "train_seconds": _sum_or_none(i.get("train_seconds") for i in infos),
        "size_mb": _sum_or_none(_model_size_mb(m) for m in members),
        "epochs": None, "select_metric": select_metric, "k": len(names),
    }
    split_data = {}
    for s in splits:
        m = metrics_lib.compute_metrics(labels[s], probs[s], classes, threshold,
                                        n_bootstrap=n_bootstrap, seed=seed)
        latency = _sum_or_none(x["splits"][s]["metrics"].get("latency_ms") for x in members)
        m.update({"split": s, "model_name": name, "threshold_method": method,
                  "latency_ms": latency, "gradcam": None,
                  **{k: members[0]["splits"][s]["metrics"].get(k)
                     for k in ("latency_batch_size", "latency_device")}})
        preds = pd.DataFrame({"y_true": labels[s], **{c: probs[s][:, i]
                                                      for i, c in enumerate(cols)}})
        robust = _ensemble_robustness(members, s, cols)
        if robust is not None:
            m["robustness"] = robustness.summarize(robust, classes)
            m.update({"robust_auc": m["robustness"]["mean_corrupted_auc"],
                      "worst_corrupted_auc": m["robustness"]["worst_corrupted_auc"],
                      "robust_auc_drop": m["robustness"]["drop"]})
        split_data[s] = {"dir": None, "metrics": m, "predictions": preds, "robustness": robust}
    if len(classes) == 2 and SELECT_SPLIT in splits:
        _ensemble_prevalence(split_data, members, labels, probs, threshold)
    return {"trial_dir": None, "model_dir": None, "eval_dir": None, "tune_dir": None,
            "model_info": info, "history": None, "phases": [], "splits": split_data,
            "members": names}


def _ensemble_robustness(members: list[dict[str, Any]], split: str, cols: list[str]
                         ) -> pd.DataFrame | None:
    """The members' corrupted-image probabilities averaged row by row, when every member has
    them for the same images, corruptions and severities (same evaluate settings)."""
    tables = [m["splits"][split].get("robustness") for m in members]
    if any(t is None for t in tables):
        return None
    keys = ["row", "y_true", "corruption", "severity"]
    first = tables[0][keys]
    if any(len(t) != len(first) or not t[keys].equals(first) for t in tables[1:]):
        return None
    mean = np.mean([t[cols].to_numpy() for t in tables], axis=0)
    return pd.concat([first.reset_index(drop=True), pd.DataFrame(mean, columns=cols)], axis=1)


def _ensemble_prevalence(split_data: dict[str, Any], members: list[dict[str, Any]],
                         labels: dict[str, np.ndarray], probs: dict[str, np.ndarray],
                         threshold: float | None) -> None:
    """Calibration on the ensemble's own validation scores; the EM prevalence estimate off
    validation and, when the members were evaluated at a deployment prevalence, its operating
    point - as evaluate does for a single model."""
    try:
        calibration = prevalence.fit_calibration(labels[SELECT_SPLIT], probs[SELECT_SPLIT][:, 1],
                                                 "ensemble validation")
    except DataError:
        return  # a degenerate ensemble: no prevalence evidence, as for a degenerate model
    target = (members[0]["splits"][SELECT_SPLIT]["metrics"].get("operating_point") or {}).get(
        "deployment_prevalence")
    for split, data in split_data.items():
        m, y, score = data["metrics"], labels[split], probs[split][:, 1]
        m.update({"prevalence": float(np.mean(y == 1)), "calibration": calibration.as_dict()})
        if target:
            point = prevalence.operating_point(calibration, y, score, float(target), threshold)
            m["operating_point"] = point
            m.update({f"deploy_{k}": point[k]
                      for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")})
        if split != SELECT_SPLIT:
            est = prevalence.estimate_prevalence(calibration, score, y)
            m["prevalence_estimate"], m["prevalence_em"] = est, est["estimate"]
            m.setdefault("ci", {})["prevalence_em"] = est["ci"]


def _sum_or_none(values: Any) -> float | None:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


def _write_ensemble_eval(ensemble: dict[str, Any], directory: Path) -> None:
    """The ensemble's per-split files, as evaluate writes them for a single model."""
    info = ensemble["model_info"]
    classes = info["class_names"]
    for split, data in ensemble["splits"].items():
        out = directory / split
        out.mkdir(parents=True)
        data["dir"] = out
        preds = data["predictions"]
        y = preds["y_true"].to_numpy()
        probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
        title = f"{info['model_name']} — {split}"
        (out / "metrics.json").write_text(json.dumps(data["metrics"], indent=2))
        preds.to_csv(out / "predictions.csv", index=False)
        plot_confusion_matrix(data["metrics"]["confusion_matrix"], classes,
                              out / "confusion_matrix.png", title)
        plot_roc(y, probs, classes, out / "roc.png", threshold=info["threshold"], title=title)
        plot_pr(y, probs, classes, out / "pr.png", threshold=info["threshold"], title=title)
        plot_reliability(y, probs, classes, out / "reliability.png", title=title)
        if data.get("robustness") is not None:
            data["robustness"].to_csv(out / ROBUSTNESS_FILE, index=False)
            plot_robustness(data["metrics"]["robustness"], out / "robustness.png", title=title)


def _write_ensemble_model(ensemble: dict[str, Any], trials: list[dict[str, Any]],
                          dest: Path) -> None:
    """best_model/ for an ensemble: ensemble.json, model_info.json and members/<name>/."""
    info = ensemble["model_info"]
    by_name = {t["model_info"]["model_name"]: t for t in trials}
    dest.mkdir()
    for name in info["members"]:
        _check_dir_name(name)
        safeio.copy_model_folder(by_name[name]["model_dir"], dest / MEMBERS_DIR / name)
    text = json.dumps(info, indent=2) + "\n"
    (dest / ENSEMBLE_FILE).write_text(text)
    (dest / "model_info.json").write_text(text)


def _image(path: Path | None, redraw: Any, scratch: Path) -> str:
    """The trial's own PNG if valid, else redraw it from the raw data into scratch."""
    found = png_base64(path)
    if found is not None:
        return found
    out = redraw(scratch / f"{uuid.uuid4().hex}.png")
    return png_base64(Path(out))


def _split_arrays(trial: dict[str, Any], split: str) -> tuple[np.ndarray, np.ndarray]:
    preds = trial["splits"][split]["predictions"]
    classes = list(trial["model_info"]["class_names"])
    return preds["y_true"].to_numpy(), preds[[f"prob_{c}" for c in classes]].to_numpy()


def _trial_images(trial: dict[str, Any], scratch: Path) -> dict[str, Any]:
    """Base64 PNGs of one candidate: its training curves and each split's plots. Missing or
    broken plots are redrawn from metrics.json/predictions.csv, except Grad-CAM (it needs the
    model), which is shown only when evaluate drew it."""
    info = trial["model_info"]
    name, classes = info["model_name"], list(info["class_names"])
    images: dict[str, Any] = {"curves": None, "splits": {}}
    if trial.get("history") is not None:
        curves = partial(plot_history, trial["history"], trial["phases"], title=f"{name} training")
        images["curves"] = _image(Path(trial["model_dir"]) / "curves.png", curves, scratch)
    for split, data in trial["splits"].items():
        m = data["metrics"]
        y, probs = _split_arrays(trial, split)
        title = f"{name} — {split}"
        redraw = {
            "confusion_matrix": partial(_redraw_cm, m, classes, title=title),
            "roc": partial(plot_roc, y, probs, classes, threshold=m.get("threshold"),
                           title=f"{title} ROC"),
            "pr": partial(plot_pr, y, probs, classes, threshold=m.get("threshold"), title=title),
            "reliability": partial(plot_reliability, y, probs, classes, title=title),
        }
        directory = Path(data["dir"]) if data.get("dir") is not None else None
        shown = {}
        for key in SPLIT_PLOTS:
            path = directory / f"{key}.png" if directory is not None else None
            if key in redraw:
                shown[key] = _image(path, redraw[key], scratch)
            elif (found := png_base64(path)) is not None:
                shown[key] = found
        images["splits"][split] = shown
    return images


def _redraw_cm(metrics: dict, classes: list[str], path: Path, title: str) -> Path:
    return plot_confusion_matrix(metrics["confusion_matrix"], classes, path, title)


# --------------------------------------------------------------------------- writers


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float | np.floating):
        return format(float(value), spec)
    return str(value)


def _spec(col: str) -> str:
    if col.startswith("hp_"):
        return "g"
    return {"train_seconds": ".1f", "size_mb": ".1f", "latency_ms": ".2f"}.get(col, ".4f")


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for humans: scores to 4 decimals, hparams in general format (1e-05 stays
    readable instead of rounding to 0.0000), missing values as a dash."""
    shown = pd.DataFrame(index=df.index)
    for col in df.columns:
        spec = _spec(col)
        shown[col] = [_fmt(v, spec) for v in df[col].astype(object)]
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table of ``display_table(df)``; tabulate through pandas when available, else a
    minimal writer (tabulate is only a transitive dependency)."""
    shown = display_table(df).map(lambda v: v.replace("|", "\\|"))  # a | would split a cell
    try:
        import tabulate  # noqa: F401  (only to know whether pandas can use it)
    except ImportError:
        header = "| " + " | ".join(map(str, shown.columns)) + " |"
        rule = "|" + "|".join("---" for _ in shown.columns) + "|"
        body = ["| " + " | ".join(row) + " |"
                for row in shown.itertuples(index=False)]
        return "\n".join([header, rule, *body]) + "\n"
    # disable_numparse keeps our formatting instead of tabulate re-formatting numeric strings.
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def _with_ci(row: pd.Series, col: str) -> str:
    """``0.9123 [0.8801, 0.9402]`` from a table row's value and CI columns."""
    value = row.get(col)
    text = _fmt(None if value is None or pd.isna(value) else float(value))
    lo, hi = row.get(f"{col}_ci_lo"), row.get(f"{col}_ci_hi")
    if text != "—" and lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
        text += f" [{float(lo):.4f}, {float(hi):.4f}]"
    return text


def headline_table(ranked: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rank, model and the headline metrics of ``split`` with their 95% CIs, as strings."""
    cols = [m for m in HEADLINE_METRICS if f"{split}_{m}" in ranked.columns]
    rows = []
    for _, row in ranked.iterrows():
        if pd.isna(row.get(f"{split}_n", np.nan)):
            continue  # this candidate was not evaluated on the split
        out = {"rank": str(row["rank"]), "model": str(row["model_name"]),
               "threshold": _fmt(row.get(f"{split}_threshold"))}
        out.update({HEADLINE_LABELS[m]: _with_ci(row, f"{split}_{m}") for m in cols})
        rows.append(out)
    return pd.DataFrame(rows)


def facts_table(ranked: pd.DataFrame) -> pd.DataFrame:
    """Size, speed and training cost per candidate, as strings."""
    rows = []
    for _, row in ranked.iterrows():
        device = row.get("latency_device")
        latency = _fmt(row.get("latency_ms"), ".2f")
        rows.append({
            "rank": str(row["rank"]), "model": str(row["model_name"]),
            "members": str(row.get("members") or "—"), "weights": _fmt(row.get("weights")),
            "parameters": _fmt(None if pd.isna(row.get("params")) else int(row["params"])),
            "size MB": _fmt(row.get("size_mb"), ".1f"),
            "training s": _fmt(row.get("train_seconds"), ".1f"),
            "latency ms/image": latency + (f" ({device})" if isinstance(device, str) else ""),
        })
    return pd.DataFrame(rows)


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0}.best{background:#e8f5e9;padding:1em;border-left:4px solid #2e7d32}
.scroll{overflow-x:auto}img{max-width:100%;margin:4px}.splits{display:flex;flex-wrap:wrap}
.note{color:#555;font-size:13px}.warn{background:#fff3e0;padding:.6em;border-left:4px solid #ef6c00}
"""
ROBUSTNESS_NOTE = (
    "robust AUC: the mean ROC AUC over 11 simulated acquisition shifts (exposure, contrast, "
    "gamma, noise, blur, JPEG, pixelation, lower resolution, zoom-out, crop, rotation) at 3 "
    "severities each, in MedMNIST-C's categories (Di Salvo et al., 2024), on a seeded "
    "stratified subset of each split; AUC drop: clean minus robust AUC on that subset. "
    "Simulated shifts are evidence of fragility, not a substitute for data from another site.")
NOT_A_DEVICE = ("Research software, not a medical device: not for diagnosis, triage or any "
                "clinical decision.")


def _ensemble_text(summary: dict[str, Any]) -> str:
    ens = summary.get("ensemble") or {}
    if ens.get("model_name"):
        return (f"Ensemble candidate {ens['model_name']}: mean probability of "
                f"{', '.join(ens['members'])} (top {len(ens['members'])} on "
                f"{summary['select_metric']}), threshold chosen on its own validation "
                "predictions. Its members were picked on validation, so its validation score "
                "is slightly optimistic.")
    return f"No ensemble candidate: {ens.get('skipped', 'not requested')}."


def _summary_html(summary: dict[str, Any], ranked: pd.DataFrame) -> str:
    best, metric = summary["best_model"], summary["select_metric"]
    direction = "lowest" if metric.split("_", 1)[1] in LOWER_IS_BETTER else "highest"
    held_out = [
        f"{html.escape(col)} = {_fmt(summary['best_model_scores'][col])}"
        for col in summary["best_model_scores"] if col != metric
    ]
    ranking = "".join(
        f"<li>{html.escape(str(r['model_name']))}: {_fmt(r['value'])}</li>"
        for r in summary["ranking"]
    )
    parts = [
        '<section class="best"><h2>Summary</h2>',
        f"<p><b>Best model: {html.escape(best)}</b>, selected by the {direction} "
        f"<code>{html.escape(metric)}</code> = {_fmt(summary['select_value'])} "
        "(chosen on validation, never on test).</p>",
        "<p>The test split plays no part in the choice; its numbers are the unbiased estimate of "
        "how the chosen model performs on unseen data.</p>",
    ]
    if held_out:
        parts.append(f"<p>Best model on the other splits: {'; '.join(held_out)}.</p>")
    parts.append(f"<p>Ranking on <code>{html.escape(metric)}</code>:</p><ol>{ranking}</ol>")
    parts.append(f"<p>{len(ranked)} models compared. {html.escape(_ensemble_text(summary))}"
                 "</p></section>")
    return "\n".join(parts)


def _model_html(trial: dict[str, Any], images: dict[str, Any]) -> str:
    info = trial["model_info"]
    name = str(info["model_name"])
    facts = ", ".join(
        f"{html.escape(k)}: {html.escape(_fmt(info.get(k)))}"
        for k in ("weights", "params", "epochs", "train_seconds", "threshold", "threshold_method",
                  "image_size", "input_size", "channels")
        if k in info
    )
    hps = html.escape(json.dumps(info.get("hparams") or {}, sort_keys=True))
    parts = [f'<section><h3 id="model-{html.escape(name)}">{html.escape(name)}</h3>',
             f"<p>{facts}</p>"]
    if trial.get("members"):
        parts.append(f"<p>members: {html.escape(', '.join(trial['members']))}</p>")
    else:
        parts.append(f"<p>hparams: <code>{hps}</code></p>")
    if images["curves"]:
        parts.append(img_tag(images["curves"], f"{name} training curves"))
    parts.append('<div class="splits">')
    for split, imgs in images["splits"].items():
        tags = "".join(img_tag(imgs[k], f"{name} {split} {k.replace('_', ' ')}")
                       for k in SPLIT_PLOTS if k in imgs)
        parts.append(f"<div><h4>{html.escape(split)}</h4>{tags}</div>")
    parts.append("</div></section>")
    return "\n".join(parts)


def _split_n(trials: list[dict[str, Any]], split: str) -> int | None:
    for t in trials:
        if split in t["splits"]:
            return int(t["splits"][split]["metrics"]["n"])
    return None


def _split_title(split: str, trials: list[dict[str, Any]]) -> str:
    role = {"val": "validation: selection happens here",
            "test": "test: held out, the unbiased estimate"}.get(split, "external / other data")
    return f"{split} (n={_split_n(trials, split)}; {role})"


def _ci_note(trials: list[dict[str, Any]]) -> str:
    m = next(iter(trials[0]["splits"].values()))["metrics"]
    return (f"Values at each model's decision threshold (chosen on validation) with 95% "
            f"{m.get('ci_method', 'bootstrap')} confidence intervals "
            f"({m.get('n_bootstrap', '?')} resamples, seed {m.get('bootstrap_seed', '?')}). "
            "Brier and ECE: lower is better.")


def _report_html(
    summary: dict[str, Any], ranked: pd.DataFrame, trials: list[dict[str, Any]],
    images: dict[str, dict[str, Any]], charts: dict[str, str],
) -> str:
    order = {str(n): i for i, n in enumerate(ranked["model_name"])}
    models = "\n".join(
        _model_html(t, images[t["model_info"]["model_name"]])
        for t in sorted(trials, key=lambda t: order[str(t["model_info"]["model_name"])])
    )
    splits = sorted({s for t in trials for s in t["splits"]}, key=_split_order)
    headline = [f"<h3>{html.escape(_split_title(s, trials))}</h3>"
                f'<div class="scroll">{headline_table(ranked, s).to_html(index=False)}</div>'
                for s in splits]
    rocs = [img_tag(charts[f"roc_{s}"], f"ROC curves of all models on {s}") for s in splits
            if f"roc_{s}" in charts]
    full = display_table(ranked).to_html(index=False, escape=True)
    robust = [img_tag(charts[f"robust_{s}"], f"AUC under corruption of all models on {s}")
              for s in splits if f"robust_{s}" in charts] or [
        "<p>Not measured: the evaluations ran without the corruption suite.</p>"]
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>lungxray model comparison</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>lungxray model comparison</h1>",
        f'<p class="warn">{html.escape(NOT_A_DEVICE)}</p>',
        _summary_html(summary, ranked),
        "<h2>Headline metrics</h2>",
        f'<p class="note">{html.escape(_ci_note(trials))}</p>',
        *headline,
        "<h2>Size, speed and cost</h2>",
        f'<div class="scroll">{facts_table(ranked).to_html(index=False)}</div>',
        '<p class="note">Latency: wall-clock model.predict time per image after a warm-up, on '
        "the device shown; an ensemble's is the sum of its members'.</p>",
        "<h2>Metric comparison</h2>",
        img_tag(charts["bars"], "metric comparison bar chart"),
        "<h2>ROC curves</h2>",
        *rocs,
        "<h2>Robustness to acquisition shift</h2>",
        f'<p class="note">{html.escape(ROBUSTNESS_NOTE)}</p>',
        *robust,
        "<h2>Training curves</h2>",
        img_tag(charts["curves"], "training curves of all models") if "curves" in charts else "",
        "<h2>Models</h2>",
        models,
        "<h2>All columns</h2>",
        f'<details><summary>full table (also results.csv)</summary><div class="scroll">{full}'
        "</div></details>",
        f'<p class="note">{html.escape(NOT_A_DEVICE)}</p>',
        "</body></html>",
    ]) + "\n"


def report_markdown(summary: dict[str, Any], ranked: pd.DataFrame,
                    trials: list[dict[str, Any]]) -> str:
    """The report's text: summary, headline tables with CIs, size and speed."""
    metric = summary["select_metric"]
    splits = sorted({s for t in trials for s in t["splits"]}, key=_split_order)
    lines = ["# lungxray model comparison", "", f"> {NOT_A_DEVICE}", "",
             f"**Best model: {summary['best_model']}**, selected on `{metric}` = "
             f"{_fmt(summary['select_value'])} (chosen on validation, never on test).", "",
             _ensemble_text(summary), "", "## Headline metrics", "", _ci_note(trials), ""]
    for split in splits:
        lines += [f"### {_split_title(split, trials)}", "",
                  to_markdown(headline_table(ranked, split))]
    lines += ["## Size, speed and cost", "", to_markdown(facts_table(ranked)),
              "All columns: `results.csv` / `results.md`.", ""]
    return "\n".join(lines)


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _summary(ranked: pd.DataFrame, select_metric: str, splits: list[str]) -> dict[str, Any]:
    best = ranked.iloc[0]
    metric = select_metric[len(SELECT_SPLIT) + 1:]
    # The winner's score on every split, so the held-out estimate sits next to the choice.
    score_cols = [f"{s}_{metric}" for s in splits if f"{s}_{metric}" in ranked.columns]
    return {
        "best_model": str(best["model_name"]),
        "select_metric": select_metric,
        "select_value": _json_value(best[select_metric]),
        "ranking": [
            {"rank": int(r["rank"]), "model_name": str(r["model_name"]),
             "value": _json_value(r[select_metric])}
            for _, r in ranked.iterrows()
        ],
        "best_model_scores": {c: _json_value(best[c]) for c in score_cols},
        "n_models": len(ranked),
    }


def _bar_columns(table: pd.DataFrame, select_metric: str) -> list[str]:
    """The selection score next to the held-out test scores (validation ones if no test)."""
    for split in ("test", SELECT_SPLIT):
        cols = [f"{split}_{m}" for m in BAR_METRICS
                if f"{split}_{m}" in table.columns and table[f"{split}_{m}"].notna().any()]
        if cols:
            return list(dict.fromkeys([select_metric, *cols]))
    return [select_metric]


# --------------------------------------------------------------------------- publishing


def _check_output(output: Path) -> None:
    """Refuse to replace a non-empty directory that is not an earlier report."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise FileExistsError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not all(
        (output / m).exists() for m in REPORT_MARKERS
    ):
        raise FileExistsError(f"output {output} is a non-empty directory that is not a report")


def _move_or_copy(build: Path, output: Path) -> None:
    try:
        os.replace(build, output)
    except OSError:
        # Some mounts (e.g. object-store FUSE) cannot rename directories: copy instead, with the
        # files that make the report look complete copied last.
        output.mkdir(parents=True, exist_ok=True)
        for item in sorted(build.iterdir(), key=lambda p: p.name in REPORT_MARKERS):
            dest = output / item.name
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy2(item, dest)
        shutil.rmtree(build, ignore_errors=True)


def _publish(build: Path, output: Path) -> None:
    """Move the finished build dir to output in one rename (copy fallback writes markers last)."""
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
        else:
            output.rmdir()
    try:
        _move_or_copy(build, output)
    except BaseException:
        if old is not None:  # put the previous report back rather than lose it
            shutil.rmtree(output, ignore_errors=True)  # a partial copy, if any
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compare(trial_dirs: list[Path], output: Path, select_metric: str = "val_roc_auc",
            ensemble_k: int = 2, target_sensitivity: float | None = None) -> dict:
    """Compare trials (plus an ensemble of the top ``ensemble_k``), pick the best on a
    validation metric, write the report; return the summary.

    ``target_sensitivity`` sets how the ensemble's threshold is chosen on validation (default:
    as its members' were, else Youden's J). Everything is loaded and validated before anything
    is written, and the report is assembled in a sibling temp dir that replaces ``output`` only
    when complete, so a failure never leaves a half-written report behind.
    """
    check_select_metric(select_metric)
    if not trial_dirs:
        raise ConfigError("compare needs at least one trial dir")
    metrics_lib.check_target_sensitivity(target_sensitivity)
    output = Path(output)
    _check_output(output)
    trials = [load_trial(Path(d)) for d in trial_dirs]
    _validate_trials(trials, select_metric)
    singles = rank_models(build_table(trials), select_metric)
    ensemble, ensemble_note = None, {}
    if ensemble_k < 2:
        ensemble_note = {"skipped": f"ensemble_k={ensemble_k} (an ensemble needs 2 or more)"}
    elif len(trials) < 2:
        ensemble_note = {"skipped": "only one model"}
    else:
        try:
            ensemble = build_ensemble(trials, singles, select_metric, ensemble_k,
                                      target_sensitivity)
        except EnsembleSkipped as err:
            ensemble_note = {"skipped": str(err)}
        else:
            info = ensemble["model_info"]
            ensemble_note = {k: info[k] for k in ("model_name", "members", "threshold",
                                                  "threshold_method", "target_sensitivity")}
    candidates = trials + ([ensemble] if ensemble else [])
    ranked = rank_models(build_table(candidates), select_metric)
    splits = sorted({s for t in candidates for s in t["splits"]}, key=_split_order)
    summary = _summary(ranked, select_metric, splits)
    summary["ensemble"] = ensemble_note
    best = next(t for t in candidates if t["model_info"]["model_name"] == summary["best_model"])
    summary["best_is_ensemble"] = bool(best.get("members"))
    # The folders best_model/ will copy, checked before any work (links out, size).
    by_name = {t["model_info"]["model_name"]: t for t in trials}
    names = best["model_info"]["members"] if best.get("members") else [summary["best_model"]]
    for name in names:
        safeio.check_model_folder(by_name[name]["model_dir"])

    # Built in a locked sibling folder, removed on errors, SIGTERM and SIGINT; one left by a
    # SIGKILLed run is swept here by the next run on the same output.
    with staging.staging_dir(output.parent, f".{output.name[:100]}.build-",
                             "lungxray compare") as build:
        _write_report(build, candidates, trials, ranked, summary, best)
        _publish(build, output)
    return summary


def _charts(build: Path, candidates: list[dict[str, Any]], trials: list[dict[str, Any]],
            ranked: pd.DataFrame, summary: dict[str, Any]) -> dict[str, str]:
    """The cross-model figures, written into the report dir; returns them as base64."""
    paths = {"bars": plot_metric_bars(
        ranked, _bar_columns(ranked, summary["select_metric"]), build / "metrics_bars.png",
        title=f"Model comparison with 95% CIs (selection on {summary['select_metric']})")}
    classes = list(trials[0]["model_info"]["class_names"])
    for split in sorted({s for t in candidates for s in t["splits"]}, key=_split_order):
        having = [t for t in candidates if split in t["splits"]]
        curves = {t["model_info"]["model_name"]: _split_arrays(t, split) for t in having}
        thresholds = {t["model_info"]["model_name"]: t["model_info"].get("threshold")
                      for t in having}
        paths[f"roc_{split}"] = plot_roc_overlay(curves, classes, build / f"roc_{split}.png",
                                                 thresholds, title=f"ROC on {split}")
    for split in sorted({s for t in candidates for s in t["splits"]}, key=_split_order):
        robust = {t["model_info"]["model_name"]: t["splits"][split]["metrics"]["robustness"]
                  for t in candidates if split in t["splits"]
                  and t["splits"][split]["metrics"].get("robustness")}
        if robust:
            paths[f"robust_{split}"] = plot_robustness_overlay(
                robust, build / f"robustness_{split}.png",
                title=f"ROC AUC under acquisition shift on {split} (mean over severities)")
    histories = {t["model_info"]["model_name"]: (t["history"], t["phases"]) for t in trials
                 if t.get("history") is not None}
    if histories:
        paths["curves"] = plot_history_grid(histories, build / "training_curves.png")
    return {k: png_base64(Path(p)) for k, p in paths.items()}


def _write_report(
    build: Path, candidates: list[dict[str, Any]], trials: list[dict[str, Any]],
    ranked: pd.DataFrame, summary: dict[str, Any], best: dict[str, Any],
) -> None:
    for candidate in candidates:
        if candidate.get("members"):
            _write_ensemble_eval(candidate, build / ENSEMBLE_DIR)
    ranked.to_csv(build / "results.csv", index=False)
    (build / "results.md").write_text(to_markdown(ranked))
    charts = _charts(build, candidates, trials, ranked, summary)
    if best.get("members"):
        _write_ensemble_model(best, trials, build / "best_model")
    else:
        # Regular files inside the model folder only: a link out (or to /dev/zero) is refused.
        safeio.copy_model_folder(best["model_dir"], build / "best_model")
    with tempfile.TemporaryDirectory(dir=build) as scratch:
        images = {t["model_info"]["model_name"]: _trial_images(t, Path(scratch))
                  for t in candidates}
    page = _report_html(summary, ranked, candidates, images, charts)
    (build / "report.md").write_text(report_markdown(summary, ranked, candidates))
    (build / "model_card.md").write_text(model_card(best, summary))
    (build / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (build / "report.html").write_text(page, encoding="utf-8")
