"""Per-site numbers beside the pooled ones: every evaluated split that holds more than one site
gets, per site, n, prevalence, ROC AUC, accuracy, sensitivity and specificity at the model's
own threshold, each with its bootstrap CI (:func:`lungxray.metrics.compute_metrics` on the
site's rows), and ``worst_site_auc``, the lowest of the sites' AUCs.

A pooled AUC can hide a site where the model is no better than chance; these numbers cannot.
The site of each row comes from the prepared dataset's manifest (:func:`site_rows`), and is
written into ``predictions.csv`` (column ``site``) so compare can score an ensemble per site.

The pooled threshold is chosen on a validation split that the largest site dominates. A site
with enough validation images of each class also gets its own (:func:`site_thresholds`, by
the model's rule on that site's rows: ``site_thresholds`` in model_info.json, used by
``lungxray predict --site``), and each site's numbers at it beside those at the pooled one.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.stats import rankdata

from lungxray import metrics as metrics_lib
from lungxray import sites as siting
from lungxray.errors import DataError, quote

SITE_COLUMN = "site"  # predictions.csv
PER_SITE = "per_site"  # metrics.json
WORST = "worst_site_auc"  # metrics.json and <split>_worst_site_auc in tables
# Per site, each with its CI.
SITE_METRICS = ("roc_auc", "accuracy", "sensitivity", "specificity")
SITE_THRESHOLDS = "site_thresholds"  # model_info.json: {site: threshold}
AT_SITE_THRESHOLD = "at_site_threshold"  # a site's rates at its own threshold, metrics.json
# Fewer validation images of either class at a site than this: no threshold of its own (a
# Youden cut on a handful of images is noise).
MIN_SITE_CLASS = 10


def site_rows(manifest: dict, split: str, where: str) -> np.ndarray | None:
    """The site of every row of ``split``, from the manifest's per-split site counts (rows are
    written site after site); None for a dataset without sites. Counts that do not add up to
    the split, or a bad name, are a DataError: the dataset was changed after preprocess."""
    record = manifest["splits"][split]
    sites = record.get("sites")
    if sites is None:
        return None
    if not isinstance(sites, dict) or not sites:
        raise DataError(f"{where}: manifest's sites of split {split!r} must map site names to "
                        f"their counts")
    counts = []
    for name, part in sites.items():
        siting.check_name(name, f"{where}: split {split!r}", DataError)
        n = part.get("n") if isinstance(part, dict) else None
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise DataError(f"{where}: manifest's count of site {name!r} in split {split!r} "
                            f"is not a count ({quote(str(n), 40)})")
        counts.append(n)
    if sum(counts) != record.get("n"):
        raise DataError(f"{where}: manifest's site counts of split {split!r} add up to "
                        f"{sum(counts)}, not its {record.get('n')} images; the dataset was "
                        f"changed after preprocess")
    return np.repeat(np.array(list(sites), dtype=object), counts)


def _ordered(sites: np.ndarray) -> list[str]:
    """Site names in order of first appearance (the order preprocess wrote them)."""
    _, first = np.unique(sites, return_index=True)
    return [str(sites[i]) for i in sorted(first)]


def _auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic on average ranks: sklearn's value, without its
    per-call validation (a site's bootstrap calls it hundreds of times)."""
    positive = y == 1
    n_pos = int(positive.sum())
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2)
                 / (n_pos * (len(y) - n_pos)))


def _binary_cis(y: np.ndarray, score: np.ndarray, threshold: float, n_bootstrap: int,
                seed: int) -> dict[str, list[float] | None]:
    """The site metrics' CIs on the resamples :func:`lungxray.metrics.compute_metrics` draws
    (same indices, same formulas), with numpy alone: several times faster."""
    reps: dict[str, list[float | None]] = {k: [] for k in SITE_METRICS}
    for idx in metrics_lib.bootstrap_indices(y, n_bootstrap, seed):
        yy, predicted = y[idx], score[idx] >= threshold
        positive = yy == 1
        both = 0 < positive.sum() < len(yy)
        reps["roc_auc"].append(_auc(yy, score[idx]) if both else None)
        reps["accuracy"].append(float(np.mean(predicted == positive)))
        reps["sensitivity"].append(float(np.mean(predicted[positive])) if positive.any() else 0.0)
        reps["specificity"].append(float(np.mean(~predicted[~positive]))
                                   if (~positive).any() else 0.0)
    return {k: metrics_lib._interval(v) for k, v in reps.items()}


def _one_site(y: np.ndarray, probs: np.ndarray, class_names: list[str],
              threshold: float | None, n_bootstrap: int, seed: int) -> dict[str, Any]:
    binary = len(class_names) == 2
    # Point estimates by the pooled recipe; two classes: the CIs by the fast path.
    m = metrics_lib.compute_metrics(y, probs, class_names, threshold,
                                    n_bootstrap=0 if binary else n_bootstrap, seed=seed)
    cis = m.get("ci") or {}
    if binary and n_bootstrap:
        cis = _binary_cis(np.asarray(y, dtype=int), probs[:, 1], float(m["threshold"]),
                          n_bootstrap, seed)
    return {
        "n": m["n"],
        "counts": {c: int((y == i).sum()) for i, c in enumerate(class_names)},
        "prevalence": float(np.mean(y == 1)) if binary else None,
        **{k: m.get(k) for k in SITE_METRICS},
        "threshold": m.get("threshold"),
        # A CI only where the point estimate exists, as for the pooled numbers.
        "ci": {k: cis.get(k) if m.get(k) is not None else None for k in SITE_METRICS},
    }


def per_site(y: np.ndarray, probs: np.ndarray, sites: np.ndarray, class_names: list[str],
             threshold: float | None, n_bootstrap: int = metrics_lib.DEFAULT_N_BOOTSTRAP,
             seed: int = metrics_lib.DEFAULT_SEED) -> dict[str, dict[str, Any]] | None:
    """{site: its numbers} for a split of more than one site, else None."""
    names = _ordered(np.asarray(sites))
    if len(names) < 2:
        return None
    y, probs = np.asarray(y), np.asarray(probs, dtype=float)
    return {name: _one_site(y[np.asarray(sites) == name], probs[np.asarray(sites) == name],
                            class_names, threshold, n_bootstrap, seed) for name in names}


def worst_auc(sites: dict[str, dict[str, Any]] | None) -> float | None:
    """The lowest per-site ROC AUC (sites where it is undefined, one class only, left out)."""
    values = [v["roc_auc"] for v in (sites or {}).values() if v.get("roc_auc") is not None]
    return min(values) if values else None


def site_thresholds(y: np.ndarray, scores: np.ndarray, sites: np.ndarray | None, rule: str,
                    target_sensitivity: float | None = None,
                    groups: np.ndarray | None = None) -> dict[str, float] | None:
    """Each site's threshold, chosen on its own validation rows by the model's ``rule`` (or
    ``target_sensitivity``; ``groups``: the rows' worst_group groups), for the sites of a
    split of several that have :data:`MIN_SITE_CLASS` images of each class; None otherwise."""
    if sites is None or len(_ordered(np.asarray(sites))) < 2:
        return None
    y, scores, sites = np.asarray(y), np.asarray(scores, dtype=float), np.asarray(sites)
    found = {}
    for name in _ordered(sites):
        rows = sites == name
        if min(int((y[rows] == 0).sum()), int((y[rows] == 1).sum())) < MIN_SITE_CLASS:
            continue
        found[name] = float(metrics_lib.operating_threshold(
            y[rows], scores[rows], rule, target_sensitivity,
            None if groups is None else np.asarray(groups)[rows])[0])
    return found or None


def add_per_site(result: dict, y: np.ndarray, probs: np.ndarray, sites: np.ndarray | None,
                 class_names: list[str], threshold: float | None,
                 own_thresholds: dict[str, float] | None = None, **bootstrap: Any) -> None:
    """``per_site`` and ``worst_site_auc`` into a split's metrics when it holds several sites;
    a site in ``own_thresholds`` (the model's ``site_thresholds``) also gets its threshold and
    its accuracy, balanced accuracy, sensitivity and specificity there."""
    if sites is None:
        return
    found = per_site(y, probs, sites, class_names, threshold, **bootstrap)
    if found is None:
        return
    for name, block in found.items():
        if name in (own_thresholds or {}) and len(class_names) == 2:
            rows = np.asarray(sites) == name
            block[AT_SITE_THRESHOLD] = {
                "threshold": float(own_thresholds[name]),
                **metrics_lib.rates_at(np.asarray(y)[rows], np.asarray(probs)[rows, 1],
                                       float(own_thresholds[name]))}
    result[PER_SITE] = found
    result[WORST] = worst_auc(found)


def scalar_metrics(split: str, result: dict) -> dict[str, float]:
    """``<split>_<site>_<metric>`` for the Kubeflow UI (undefined values left out), and
    ``<split>_<site>_own_balanced_accuracy`` at a site's own threshold."""
    out = {}
    for site, values in (result.get(PER_SITE) or {}).items():
        for name in ("roc_auc", "sensitivity", "specificity"):
            if values.get(name) is not None:
                out[f"{split}_{site}_{name}"] = float(values[name])
        own = values.get(AT_SITE_THRESHOLD) or {}
        if own.get("balanced_accuracy") is not None:
            out[f"{split}_{site}_own_balanced_accuracy"] = float(own["balanced_accuracy"])
    return out
