"""The ensemble candidate: the mean probability of the top-k models, evaluated like a trial and
saved as a model folder.

:func:`build_ensemble` averages the saved predictions of the ``k`` best single trials (ranked by
:mod:`lungxray.selection`) and evaluates the mean like a trial, with its own threshold chosen on
validation; :class:`EnsembleSkipped` says why none could be built. :func:`write_ensemble_eval`
writes its per-split files as evaluate does; :func:`write_ensemble_model` writes its model folder
(``ensemble.json`` + ``model_info.json`` + ``members/<name>/``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import metrics as metrics_lib
from lungxray import plots, prevalence, robustness, safeio, site_metrics
from lungxray.artifacts import (
    DEFAULT_THRESHOLD_RULE,
    ENSEMBLE_FILE,
    ENSEMBLE_KIND,
    GROUP_COLUMN,
    INFO_FILE,
    MEMBERS_DIR,
    METRICS_FILE,
    PREDICTIONS_FILE,
    ROBUSTNESS_FILE,
    VAL_SPLIT,
    Ensemble,
    EvalSplit,
    Trial,
    model_size_mb,
    target_sensitivity_of,
)

# --------------------------------------------------------------------------- building


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
                   threshold_rule: str = DEFAULT_THRESHOLD_RULE,
                   n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
                   seed: int = metrics_lib.DEFAULT_SEED) -> Ensemble:
    """An ensemble candidate, evaluated like a trial (no files yet).

    Members: the ``k`` best single models on ``select_metric`` (validation). Probabilities: the
    members' mean, from their saved predictions.csv. Threshold: chosen on the ensemble's own
    validation predictions by ``threshold_rule`` (or ``target_sensitivity``), like any trial's,
    ``worst_group`` on the groups in the first member's val predictions.csv (none: one group);
    every rule's threshold and rates are in each split's ``threshold_rules``. Raises
    EnsembleSkipped with the reason when it cannot be built.
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
    threshold, method, calibration, rules, by_site = None, None, None, {}, None
    groups = None
    if len(classes) == 2:
        groups = _column(members[0], VAL_SPLIT, GROUP_COLUMN)  # worst_group's groups
        threshold, method = metrics_lib.operating_threshold(
            labels[VAL_SPLIT], probs[VAL_SPLIT][:, 1], threshold_rule, target, groups)
        by_site = site_metrics.site_thresholds(
            labels[VAL_SPLIT], probs[VAL_SPLIT][:, 1], _column(members[0], VAL_SPLIT,
                                                                site_metrics.SITE_COLUMN),
            threshold_rule, target, groups)
        rules = metrics_lib.rule_thresholds(labels[VAL_SPLIT], probs[VAL_SPLIT][:, 1], groups)
        calibration = prevalence.calibration_or_none(
            labels[VAL_SPLIT], probs[VAL_SPLIT][:, 1], "ensemble validation")
    name = f"Ensemble-top{len(names)}"
    if name in by_name:
        raise EnsembleSkipped(f"a single model is already called {name!r}")
    info = {
        "model_name": name, "ensemble": True, "kind": ENSEMBLE_KIND, "members": names,
        "class_names": classes, "positive_class": 1 if len(classes) == 2 else None,
        "threshold": threshold, "threshold_method": method, "target_sensitivity": target,
        site_metrics.SITE_THRESHOLDS: by_site,
        # as train saves it for a single model: predict estimates a target's prevalence with it
        "calibration": calibration.as_dict() if calibration else None,
        "image_size": infos[0].get("image_size"), "channels": infos[0].get("channels"),
        "weights": "members", "hparams": {},
        "params": _sum_or_none(i.get("params") for i in infos),
        "train_seconds": _sum_or_none(i.get("train_seconds") for i in infos),
        "size_mb": _sum_or_none(model_size_mb(m) for m in members),
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
        if len(classes) == 2:
            m["threshold_rules"] = metrics_lib.threshold_rules_block(rules, s, labels[s],
                                                                     probs[s][:, 1])
        preds = pd.DataFrame({"y_true": labels[s], **{c: probs[s][:, i]
                                                      for i, c in enumerate(cols)}})
        # The members were evaluated on the same rows: the first one's sites are theirs.
        sites = _column(members[0], s, site_metrics.SITE_COLUMN)
        if sites is not None:
            site_metrics.add_per_site(m, labels[s], probs[s], sites, classes, threshold,
                                      by_site, n_bootstrap=n_bootstrap, seed=seed)
            preds[site_metrics.SITE_COLUMN] = sites
        if s == VAL_SPLIT and groups is not None:
            preds[GROUP_COLUMN] = groups
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


def _column(member: Trial, split: str, column: str) -> np.ndarray | None:
    """A column of a member's predictions.csv on ``split`` as strings (the members were
    evaluated on the same rows); None for older ones without it."""
    table = member.splits[split].predictions
    if column not in table.columns:
        return None
    return table[column].astype(str).to_numpy(dtype=object)


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
    target = (members[0].splits[VAL_SPLIT].metrics.get("operating_point") or {}).get(
        "deployment_prevalence")
    for split, data in split_data.items():
        m, y, score = data.metrics, labels[split], probs[split][:, 1]
        m.update({"prevalence": float(np.mean(y == 1)), "calibration": calibration.as_dict()})
        if target:
            point = prevalence.operating_point(calibration, y, score, float(target), threshold)
            m["operating_point"] = point
            m.update({f"deploy_{k}": point[k]
                      for k in ("threshold", "sensitivity", "specificity", "ppv", "npv")})
        if split != VAL_SPLIT:
            est = prevalence.estimate_prevalence(calibration, score, y)
            m["prevalence_estimate"], m["prevalence_em"] = est, est["estimate"]
            m.setdefault("ci", {})["prevalence_em"] = est["ci"]


def _sum_or_none(values: Any) -> float | None:
    values = list(values)
    if not values or any(v is None for v in values):
        return None
    return float(sum(values))


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
        safeio.check_dir_name(name)
        safeio.copy_model_folder(by_name[name].model_dir, dest / MEMBERS_DIR / name)
    text = json.dumps(info, indent=2) + "\n"
    (dest / ENSEMBLE_FILE).write_text(text)
    (dest / INFO_FILE).write_text(text)
