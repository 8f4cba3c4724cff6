"""Decide which model ships: read the trials, rank them on a validation metric, add the ensemble
candidate, and save the winner as a model folder.

A *trial dir* holds ``model/`` (train output), ``eval/<split>/`` (evaluate output) and optionally
``tune/`` (:mod:`lungxray.artifacts` names every file). :func:`load_trial` reads one into a
:class:`~lungxray.artifacts.Trial`; :func:`pair_trials` lays KFP's separate step outputs out as
trial dirs. :func:`select` validates the trials, ranks them (:func:`build_table`,
:func:`rank_models`) together with an ensemble of the top k (:func:`build_ensemble`: mean
probability, its own threshold chosen on validation) and returns a :class:`Selection`.
:func:`save_best_model` writes the winner as a model folder ``lungxray evaluate`` and ``predict``
load: a copy of its ``model/``, or for an ensemble ``ensemble.json`` + ``model_info.json`` +
``members/<name>/``. Nothing here renders; :mod:`lungxray.report` does.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import metrics as metrics_lib
from lungxray import plots, prevalence, robustness, safeio
from lungxray.artifacts import (
    BEST_HPARAMS_FILE,
    ENSEMBLE_FILE,
    ENSEMBLE_KIND,
    HISTORY_FILE,
    INFO_FILE,
    LOWER_IS_BETTER,
    MEMBERS_DIR,
    METRICS_FILE,
    MODEL_FILE,
    PREDICTIONS_FILE,
    ROBUSTNESS_FILE,
    SELECTABLE,
    TABLE_METRICS,
    TRIAL_EVAL_DIR,
    TRIAL_MODEL_DIR,
    TRIAL_TUNE_DIR,
    VAL_SPLIT,
    Ensemble,
    EvalSplit,
    Trial,
    split_order,
    target_sensitivity_of,
)
from lungxray.errors import ConfigError, DataError, quote, quote_repr

SELECT_SPLIT = VAL_SPLIT  # models, thresholds and the ensemble's members are chosen here only
FIXED_COLUMNS = ["model_name", "members", "weights", "params", "size_mb", "train_seconds",
                 "epochs", "latency_ms", "latency_device"]


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, trial_dir: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} ({path}) in trial dir {trial_dir}")
    return safeio.load_json_object(path, path.name)


def _json_object(path: Path) -> dict:
    """A JSON file that must hold an object, read within the limits."""
    return safeio.load_json_object(path, path.name)


def _load_split(split_dir: Path, trial_dir: Path, info: dict) -> EvalSplit:
    metrics = _read_json(split_dir / METRICS_FILE, trial_dir)
    name = info["model_name"]
    if metrics.get("model_name", name) != name:
        raise DataError(
            f"{split_dir / METRICS_FILE} is for model "
            f"{quote(str(metrics.get('model_name')), 60)}, "
            f"but trial dir {trial_dir} holds {name!r}"
        )
    if metrics.get("split", split_dir.name) != split_dir.name:
        raise DataError(
            f"{split_dir / METRICS_FILE} says split {quote(str(metrics.get('split')), 40)} "
            f"but lives in {split_dir.name!r}"
        )
    if "confusion_matrix" not in metrics:
        raise DataError(f"{split_dir / METRICS_FILE} lacks 'confusion_matrix'")
    if list(metrics.get("class_names", info["class_names"])) != list(info["class_names"]):
        raise DataError(f"class_names in {split_dir / METRICS_FILE} differ from {INFO_FILE}")
    pred_path = split_dir / PREDICTIONS_FILE
    if not pred_path.is_file():
        raise FileNotFoundError(f"missing {PREDICTIONS_FILE} ({pred_path}) in trial dir "
                                f"{trial_dir}")
    preds = pd.read_csv(pred_path)
    wanted = ["y_true"] + [f"prob_{c}" for c in info["class_names"]]
    lacking = [c for c in wanted if c not in preds.columns]
    if lacking:
        raise DataError(f"{pred_path} lacks columns {lacking} (trial dir {trial_dir})")
    if "n" in metrics and int(metrics["n"]) != len(preds):
        raise DataError(
            f"{pred_path} has {len(preds)} rows but {METRICS_FILE} says n={metrics['n']}"
        )
    robust = split_dir / ROBUSTNESS_FILE
    return EvalSplit(split_dir.name, metrics, preds,
                     pd.read_csv(robust) if robust.is_file() else None, split_dir)


def load_trial(trial_dir: Path) -> Trial:
    """Read one trial dir: model info, history and every evaluated split (ordered val, test,
    then others). Raises FileNotFoundError naming the missing file, DataError on files that
    contradict each other."""
    trial_dir = Path(trial_dir)
    model_dir = trial_dir / TRIAL_MODEL_DIR
    eval_dir, tune_dir = trial_dir / TRIAL_EVAL_DIR, trial_dir / TRIAL_TUNE_DIR
    info = _read_json(model_dir / INFO_FILE, trial_dir)
    for key in ("model_name", "class_names"):
        if key not in info:
            raise DataError(f"{INFO_FILE} in trial dir {trial_dir} lacks {key!r}")
    if not (model_dir / MODEL_FILE).exists():
        raise FileNotFoundError(f"missing {MODEL_FILE} ({model_dir / MODEL_FILE}) "
                                f"in trial dir {trial_dir}")
    hist = _read_json(model_dir / HISTORY_FILE, trial_dir)
    if not isinstance(hist, dict) or not isinstance(hist.get("history"), dict):
        raise DataError(f"{HISTORY_FILE} in trial dir {trial_dir} lacks a 'history' mapping")
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"missing {TRIAL_EVAL_DIR}/ directory ({eval_dir}) in trial dir "
                                f"{trial_dir}")
    split_dirs = sorted((d for d in eval_dir.iterdir() if d.is_dir()),
                        key=lambda d: split_order(d.name))
    if not split_dirs:
        raise FileNotFoundError(f"no {TRIAL_EVAL_DIR}/<split>/ directory in trial dir "
                                f"{trial_dir}")
    return Trial(
        model_info=info,
        splits={d.name: _load_split(d, trial_dir, info) for d in split_dirs},
        model_dir=model_dir,
        trial_dir=trial_dir,
        eval_dir=eval_dir,
        tune_dir=tune_dir if tune_dir.is_dir() else None,
        history=hist["history"],
        phases=list(hist.get("phases") or []),
    )


# --------------------------------------------------------------------------- pairing


def _eval_model_name(eval_dir: Path) -> str:
    found = [_json_object(p).get("model_name")
             for p in sorted(Path(eval_dir).glob(f"*/{METRICS_FILE}"))]
    if not found:
        raise FileNotFoundError(f"no <split>/{METRICS_FILE} in eval dir {eval_dir}")
    names = {n if isinstance(n, str) else None for n in found}
    if len(names) != 1 or None in names:
        raise DataError(f"eval dir {eval_dir} mixes or lacks model names: "
                        f"{quote_repr(sorted(map(str, names)), 200)}")
    return names.pop()


def _tune_model_name(tune_dir: Path) -> str:
    # tune writes best_hparams.json with the model name; other top-level JSON files are a fallback
    # so that a renamed file still pairs.
    paths = sorted(Path(tune_dir).glob("*.json"), key=lambda p: (p.name != BEST_HPARAMS_FILE, p))
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
        model_dirs, lambda d: _read_json(d / INFO_FILE, d)["model_name"], "model"
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
        (trial / TRIAL_MODEL_DIR).symlink_to(models[name].resolve(), target_is_directory=True)
        (trial / TRIAL_EVAL_DIR).symlink_to(evals[name].resolve(), target_is_directory=True)
        if name in tunes:
            (trial / TRIAL_TUNE_DIR).symlink_to(tunes[name].resolve(), target_is_directory=True)
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


def _held_out_value(trial: Trial, key: str) -> Any:
    """A per-split fact (latency) from the test split, else the first split."""
    splits = trial.splits
    return splits["test" if "test" in splits else next(iter(splits))].metrics.get(key)


def _model_size_mb(trial: Trial) -> float | None:
    if trial.members:
        return trial.model_info.get("size_mb")
    if trial.model_dir is None:
        return None
    path = Path(trial.model_dir) / MODEL_FILE
    return round(path.stat().st_size / 1e6, 3) if path.is_file() else None


def _row(trial: Trial) -> dict[str, Any]:
    info = trial.model_info
    row: dict[str, Any] = {
        "model_name": info["model_name"],
        "members": "+".join(trial.members),
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
    for split, data in trial.splits.items():
        cis = data.metrics.get("ci") or {}
        for metric in TABLE_METRICS:
            if metric in data.metrics:
                value = data.metrics[metric]
                row[f"{split}_{metric}"] = np.nan if value is None else value
            if metric in cis:
                lo, hi = cis[metric] or (np.nan, np.nan)
                row[f"{split}_{metric}_ci_lo"], row[f"{split}_{metric}_ci_hi"] = lo, hi
    return row


def build_table(trials: list[Trial]) -> pd.DataFrame:
    """One row per trial: identity, size and speed, hparams (``hp_*``) and ``<split>_<metric>``
    columns, each followed by ``_ci_lo``/``_ci_hi`` where the metric has a CI."""
    rows = [_row(t) for t in trials]
    hp_cols = sorted({k for r in rows for k in r if k.startswith("hp_")})
    splits = sorted({s for t in trials for s in t.splits}, key=split_order)
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


def validate_trials(trials: list[Trial], select_metric: str) -> None:
    """Trials are comparable: distinct names, the same classes, a validation split each, and the
    same labels on every split they share."""
    names = [t.model_name for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise DataError(f"duplicate model names across trial dirs: {dupes}")
    classes = {json.dumps(t.class_names) for t in trials}
    if len(classes) > 1:
        raise ConfigError(f"trials disagree on class_names: {sorted(classes)}; not comparable")
    lacking = [t.model_name for t in trials if SELECT_SPLIT not in t.splits]
    if lacking:
        raise ConfigError(f"{select_metric!r} needs a {SELECT_SPLIT!r} split; "
                          f"missing for {quote_repr(lacking, 200)}")
    # Scores are only comparable on the same data: every split must have the same label counts.
    splits = {s for t in trials for s in t.splits}
    for split in sorted(splits):
        counts = {
            t.model_name: json.dumps(
                t.splits[split].predictions["y_true"].value_counts().sort_index()
                .astype(int).to_dict()
            )
            for t in trials if split in t.splits
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


def build_ensemble(trials: list[Trial], ranked: pd.DataFrame, select_metric: str,
                   k: int = 2, target_sensitivity: float | None = None,
                   n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
                   seed: int = metrics_lib.DEFAULT_SEED) -> Ensemble:
    """An ensemble candidate, evaluated like a trial (no files yet).

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
    by_name = {t.model_name: t for t in trials}
    members = [by_name[n] for n in names]
    infos = [m.model_info for m in members]
    classes = list(infos[0]["class_names"])
    for key in ("image_size", "channels"):
        if len({json.dumps(i.get(key)) for i in infos}) > 1:
            raise EnsembleSkipped(f"members differ in {key}: "
                                  f"{ {i['model_name']: i.get(key) for i in infos} }")
    splits = [s for s in members[0].splits if all(s in m.splits for m in members)]
    labels = {s: members[0].splits[s].predictions["y_true"].to_numpy() for s in splits}
    for member in members[1:]:
        for s in splits:
            if not np.array_equal(member.splits[s].predictions["y_true"].to_numpy(), labels[s]):
                raise EnsembleSkipped(
                    f"predictions of {member.model_name} on {s!r} are not in "
                    f"the same order as {names[0]}'s; cannot average them row by row")
    cols = [f"prob_{c}" for c in classes]
    probs = {s: np.mean([m.splits[s].predictions[cols].to_numpy() for m in members], axis=0)
             for s in splits}
    target = _common_target_sensitivity(infos, target_sensitivity)
    threshold, method, calibration = None, None, None
    if len(classes) == 2:
        threshold = metrics_lib.choose_threshold(labels[SELECT_SPLIT], probs[SELECT_SPLIT][:, 1],
                                                 target_sensitivity=target)
        method = f"sensitivity>={target}" if target else "youden"  # train's naming
        calibration = prevalence.calibration_or_none(
            labels[SELECT_SPLIT], probs[SELECT_SPLIT][:, 1], "ensemble validation")
    name = f"Ensemble-top{len(names)}"
    if name in by_name:
        raise EnsembleSkipped(f"a single model is already called {name!r}")
    info = {
        "model_name": name, "ensemble": True, "kind": ENSEMBLE_KIND, "members": names,
        "class_names": classes, "positive_class": 1 if len(classes) == 2 else None,
        "threshold": threshold, "threshold_method": method, "target_sensitivity": target,
        # as train saves it for a single model: predict estimates a target's prevalence with it
        "calibration": calibration.as_dict() if calibration else None,
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
        latency = _sum_or_none(x.splits[s].metrics.get("latency_ms") for x in members)
        m.update({"split": s, "model_name": name, "threshold_method": method,
                  "latency_ms": latency, "gradcam": None,
                  **{k: members[0].splits[s].metrics.get(k)
                     for k in ("latency_batch_size", "latency_device")}})
        preds = pd.DataFrame({"y_true": labels[s], **{c: probs[s][:, i]
                                                      for i, c in enumerate(cols)}})
        robust = _ensemble_robustness(members, s, cols)
        if robust is not None:
            m["robustness"] = robustness.summarize(robust, classes)
            m.update({"robust_auc": m["robustness"]["mean_corrupted_auc"],
                      "worst_corrupted_auc": m["robustness"]["worst_corrupted_auc"],
                      "robust_auc_drop": m["robustness"]["drop"]})
        split_data[s] = EvalSplit(s, m, preds, robust)
    if calibration is not None:
        _ensemble_prevalence(split_data, members, labels, probs, threshold, calibration)
    return Ensemble(model_info=info, splits=split_data, member_names=names)


def _ensemble_robustness(members: list[Trial], split: str, cols: list[str]
                         ) -> pd.DataFrame | None:
    """The members' corrupted-image probabilities averaged row by row, when every member has
    them for the same images, corruptions and severities (same evaluate settings)."""
    tables = [m.splits[split].robustness for m in members]
    if any(t is None for t in tables):
        return None
    keys = ["row", "y_true", "corruption", "severity"]
    first = tables[0][keys]
    if any(len(t) != len(first) or not t[keys].equals(first) for t in tables[1:]):
        return None
    mean = np.mean([t[cols].to_numpy() for t in tables], axis=0)
    return pd.concat([first.reset_index(drop=True), pd.DataFrame(mean, columns=cols)], axis=1)


def _ensemble_prevalence(split_data: dict[str, EvalSplit], members: list[Trial],
                         labels: dict[str, np.ndarray], probs: dict[str, np.ndarray],
                         threshold: float | None, calibration: prevalence.Calibration) -> None:
    """With the calibration on the ensemble's own validation scores: the EM prevalence
    estimate off validation and, when the members were evaluated at a deployment prevalence,
    its operating point - as evaluate does for a single model."""
    target = (members[0].splits[SELECT_SPLIT].metrics.get("operating_point") or {}).get(
        "deployment_prevalence")
    for split, data in split_data.items():
        m, y, score = data.metrics, labels[split], probs[split][:, 1]
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


# --------------------------------------------------------------------------- selection


@dataclass
class Selection:
    """What :func:`select` decided: every candidate ranked, the summary (``summary.json``) and
    the winner."""

    trials: list[Trial]  # the single models compared
    candidates: list[Trial]  # the trials and, when one was built, the ensemble
    ranked: pd.DataFrame  # build_table(candidates), best first, with a "rank" column
    summary: dict[str, Any]
    best: Trial
    ensemble: Ensemble | None = None

    @property
    def splits(self) -> list[str]:
        """Every split any candidate was evaluated on, val first."""
        return sorted({s for t in self.candidates for s in t.splits}, key=split_order)


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


def check_options(select_metric: str, trials: list[Any],
                  target_sensitivity: float | None) -> None:
    """What :func:`select` is asked, refused before any file is read: a validation metric to
    select on, at least one trial (or trial dir), a target sensitivity in (0, 1) or None."""
    check_select_metric(select_metric)
    if not trials:
        raise ConfigError("compare needs at least one trial dir")
    metrics_lib.check_target_sensitivity(target_sensitivity)


def select(trials: list[Trial], select_metric: str = "val_roc_auc", ensemble_k: int = 2,
           target_sensitivity: float | None = None) -> Selection:
    """Rank ``trials`` and an ensemble of the top ``ensemble_k`` (0 or 1: none) on a validation
    metric and pick the best; nothing is written.

    ``target_sensitivity`` sets how the ensemble's threshold is chosen on validation (default:
    as its members' were, else Youden's J). The folders the winner's model folder will be copied
    from are checked here (links out, size), before any work is done on them.
    """
    check_options(select_metric, trials, target_sensitivity)
    validate_trials(trials, select_metric)
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
            info = ensemble.model_info
            ensemble_note = {k: info[k] for k in ("model_name", "members", "threshold",
                                                  "threshold_method", "target_sensitivity")}
    candidates = [*trials, *([ensemble] if ensemble else [])]
    ranked = rank_models(build_table(candidates), select_metric)
    splits = sorted({s for t in candidates for s in t.splits}, key=split_order)
    summary = _summary(ranked, select_metric, splits)
    summary["ensemble"] = ensemble_note
    best = next(t for t in candidates if t.model_name == summary["best_model"])
    summary["best_is_ensemble"] = bool(best.members)
    by_name = {t.model_name: t for t in trials}
    for name in best.members or [summary["best_model"]]:
        safeio.check_model_folder(by_name[name].model_dir)
    return Selection(trials, candidates, ranked, summary, best, ensemble)


# --------------------------------------------------------------------------- saving


def write_ensemble_eval(ensemble: Ensemble, directory: Path) -> None:
    """The ensemble's per-split files in ``directory/<split>/``, as evaluate writes them for a
    single model; each split's ``dir`` then points there."""
    info = ensemble.model_info
    classes = info["class_names"]
    for split, data in ensemble.splits.items():
        out = Path(directory) / split
        out.mkdir(parents=True)
        data.dir = out
        preds = data.predictions
        y = preds["y_true"].to_numpy()
        probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
        title = f"{info['model_name']} — {split}"
        (out / METRICS_FILE).write_text(json.dumps(data.metrics, indent=2))
        preds.to_csv(out / PREDICTIONS_FILE, index=False)
        plots.plot_confusion_matrix(data.metrics["confusion_matrix"], classes,
                                    out / "confusion_matrix.png", title)
        plots.plot_roc(y, probs, classes, out / "roc.png", threshold=info["threshold"],
                       title=title)
        plots.plot_pr(y, probs, classes, out / "pr.png", threshold=info["threshold"],
                      title=title)
        plots.plot_reliability(y, probs, classes, out / "reliability.png", title=title)
        if data.robustness is not None:
            data.robustness.to_csv(out / ROBUSTNESS_FILE, index=False)
            plots.plot_robustness(data.metrics["robustness"], out / "robustness.png",
                                  title=title)


def write_ensemble_model(ensemble: Ensemble, trials: list[Trial], dest: Path) -> None:
    """A model folder for an ensemble: ensemble.json, model_info.json and members/<name>/."""
    info = ensemble.model_info
    by_name = {t.model_name: t for t in trials}
    dest = Path(dest)
    dest.mkdir()
    for name in info["members"]:
        _check_dir_name(name)
        safeio.copy_model_folder(by_name[name].model_dir, dest / MEMBERS_DIR / name)
    text = json.dumps(info, indent=2) + "\n"
    (dest / ENSEMBLE_FILE).write_text(text)
    (dest / INFO_FILE).write_text(text)


def save_best_model(selection: Selection, dest: Path) -> None:
    """The winner as a model folder at ``dest``: a saved ensemble, or a copy of the trial's
    ``model/`` (regular files inside it only: a link out, or to /dev/zero, is refused)."""
    best = selection.best
    if isinstance(best, Ensemble):
        write_ensemble_model(best, selection.trials, dest)
    else:
        safeio.copy_model_folder(best.model_dir, dest)
