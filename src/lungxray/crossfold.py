"""Choices on held-out shift with every training image held out once: image-statistics folds.

The single carve (``test_shifted``) holds out one region of atypical images, so a tie-break or a
selection on it rests on about a tenth of train. :func:`crossfold` cuts the pool the shipped
model trains on (``train`` + ``test_shifted`` of a prepared dataset) into ``K`` folds of whole
image-statistics clusters per site (:func:`lungxray.shift.fold_bands`: bands of neighbouring
k-means clusters, patients and duplicates kept whole), trains the model's recipe (network,
hyperparameters, weights, batch size, seed, threshold rule) ``K`` times, each time on the other
folds with the same validation split, and predicts the fold it left out. The out-of-fold
predictions are written as one more evaluated split, :data:`SPLIT`, beside val and test:
compare then ranks on it or breaks ties with it (``shift_folds_roc_auc``), the ensemble
candidate averages its members' out-of-fold predictions row by row (the folds depend on the
data and seed only, so every model's rows are the same), and the split's ``folds`` block gives
each fold's AUC and, per threshold rule, the balanced accuracy each fold model reaches at its
own validation threshold (mean and worst fold): the evidence for a rule off the training
distribution. Headline rates on the split are at the measured model's threshold.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import (
    artifacts,
    data,
    evaluate,
    integrity,
    metrics,
    model_loader,
    safeio,
    schema,
    shift,
    site_metrics,
    splits,
    staging,
    train,
)
from lungxray.errors import ConfigError, DataError, quote
from lungxray.limits import DEFAULT as LIMITS
from lungxray.pools import new_array_file
from lungxray.predictor import Predictor

SPLIT = artifacts.FOLDS_SPLIT  # the evaluated split of out-of-fold predictions
POOL_SPLITS = ("train", shift.SPLIT)  # what the folds cut: what the refit trains on
MAX_FOLDS = shift.MAX_FOLDS
CHUNK = 512  # rows read at a time from the memory-mapped splits
FOLDS_KEY = artifacts.FOLDS_KEY
RECORD_FILE = "folds.json"  # the pipeline step's record beside the split


def check_folds(folds: int) -> None:
    """0 (no folds) or 2..MAX_FOLDS, else a one-line error."""
    if isinstance(folds, bool) or not isinstance(folds, int) or not (
            folds == 0 or 2 <= folds <= MAX_FOLDS):
        raise ConfigError(f"shift_folds must be 0 (none) or 2..{MAX_FOLDS}, got "
                          f"{quote(str(folds), 20)}")


@dataclass
class Pool:
    """The training pool's rows in a fixed order (train's, then test_shifted's, per site) and
    the fold of each."""

    parts: dict[str, data.Split]  # the pool's splits, memory-mapped
    source: np.ndarray  # which split each row comes from
    row: np.ndarray  # its row there
    labels: np.ndarray
    sites: np.ndarray  # "all" when the dataset names no sites
    fold: np.ndarray  # 0..K-1

    def images(self, index: np.ndarray) -> np.ndarray:
        """The images of pool rows ``index``, in that order."""
        out = []
        for name, split in self.parts.items():
            mine = index[self.source[index] == name]
            out.append((np.flatnonzero(self.source[index] == name),
                        np.asarray(split.images[self.row[mine]])))
        shape = next(iter(self.parts.values())).images.shape[1:]
        gathered = np.empty((len(index), *shape), np.uint8)
        for where, block in out:
            gathered[where] = block
        return gathered


def _files_index(data_dir: Path) -> pd.DataFrame:
    """files.csv of a prepared dataset (size-bounded), with the columns the folds need."""
    path = Path(data_dir) / artifacts.FILES_INDEX
    content = safeio.read_bounded(path, path.name, LIMITS.max_csv_bytes, DataError)
    try:
        table = pd.read_csv(io.BytesIO(content), keep_default_na=False,
                            dtype={"split": str, "sha1": str, "patient_id": str})
    except (ValueError, pd.errors.ParserError) as err:
        raise DataError(f"{quote(str(path))}: not a readable CSV ({quote(str(err), 120)})"
                        ) from None
    lacking = [c for c in ("split", "index", "sha1", "patient_id") if c not in table.columns]
    if lacking:
        raise DataError(f"{quote(str(path))}: lacks column(s) {lacking}; prepare it again")
    return table


def _index(files: pd.DataFrame, manifest: dict, name: str, where: str) -> pd.DataFrame:
    """files.csv's rows of split ``name`` in row order (hashes, patients)."""
    rows = files[files["split"] == name].sort_values("index")
    if len(rows) != manifest["splits"][name]["n"]:
        raise DataError(f"{where}: files.csv lists {len(rows)} rows of split {name!r}, the "
                        f"manifest {manifest['splits'][name]['n']}; the dataset was changed "
                        f"after preprocess")
    return rows


def pool_folds(data_dir: Path, manifest: dict, folds: int, seed: int) -> Pool:
    """The pool of ``data_dir`` cut into ``folds`` image-statistics folds, each site on its own
    (its own clusters; patients and copies whole); every fold must hold every class."""
    present = [s for s in POOL_SPLITS if s in manifest["splits"]]
    parts = {s: integrity.load_checked_split(data_dir, s, manifest) for s in present}
    files, frames = _files_index(data_dir), []
    for name in present:
        index = _index(files, manifest, name, quote(str(data_dir)))
        sites = site_metrics.site_rows(manifest, name, quote(str(data_dir)))
        frames.append(pd.DataFrame({
            "source": name, "row": np.arange(len(index)), "label": parts[name].labels,
            "site": sites if sites is not None else "all",
            "sha1": index["sha1"].to_numpy(), "patient": index["patient_id"].to_numpy()}))
    table = pd.concat(frames, ignore_index=True)
    order = {site: n for n, site in enumerate(dict.fromkeys(table["site"]))}
    # Site after site (as prepared splits are written), train's rows before test_shifted's.
    table = table.iloc[np.argsort(table["site"].map(order).to_numpy(), kind="stable")]
    fold = np.empty(len(table), int)
    for site in order:
        at = np.flatnonzero(table["site"].to_numpy() == site)
        part = table.iloc[at]
        stats = [shift.statistics_of(parts[name].images, part["row"].to_numpy()[
            part["source"].to_numpy() == name], CHUNK) for name in present]
        features = shift.shift_features(np.concatenate([s[0] for s in stats]),
                                        np.concatenate([s[1] for s in stats]), seed)
        patients = part["patient"].to_numpy(dtype=object)
        groups = splits.group_ids(part["sha1"].to_numpy(dtype=object),
                                  patients if all(patients) else None)
        try:
            fold[at] = shift.fold_bands(features, groups, folds, seed)[0]
        except DataError as err:
            raise DataError(f"site {site!r}: {err}" if len(order) > 1 else str(err)) from None
    labels = table["label"].to_numpy()
    for i in range(folds):
        missing = sorted(set(labels.tolist()) - set(labels[fold == i].tolist()))
        if missing:
            names = [manifest["class_names"][c] for c in missing]
            raise DataError(f"shift fold {i + 1}/{folds} of {quote(str(data_dir))} holds no "
                            f"images of class(es) {names}: use fewer folds")
    return Pool(parts, table["source"].to_numpy(dtype=object), table["row"].to_numpy(),
                labels, table["site"].to_numpy(dtype=object), fold)


def _write_split(out: Path, name: str, n: int, images_of: Any, labels: np.ndarray) -> str:
    """One split's arrays in ``out``, ``images_of(start, stop)`` copied a chunk at a time (a
    large pool never has to fit in memory); returns its sha256 as the manifest records it."""
    shape = images_of(0, 1).shape[1:]
    target = new_array_file(out / data.images_file(name), (n, *shape))
    for start in range(0, n, CHUNK):
        target[start:start + CHUNK] = images_of(start, min(start + CHUNK, n))
    target.flush()
    del target
    np.save(out / data.labels_file(name), labels)
    return integrity.split_sha256(data.load_split_files(out, name))


def _split_record(labels: np.ndarray, sites: np.ndarray, class_names: list[str],
                  sha256: str, with_sites: bool) -> dict:
    def counts(mask: np.ndarray) -> dict[str, int]:
        return {c: int((labels[mask] == i).sum()) for i, c in enumerate(class_names)}

    record: dict[str, Any] = {"n": len(labels), "counts": counts(np.ones(len(labels), bool)),
                              "sha256": sha256}
    if with_sites:
        record["sites"] = {s: {"n": int((sites == s).sum()), "counts": counts(sites == s)}
                           for s in dict.fromkeys(sites.tolist())}
    return record


def write_fold(data_dir: Path, manifest: dict, pool: Pool, fold: int, out: Path) -> None:
    """A prepared dataset in ``out`` for fold ``fold`` (0-based): train = the other folds,
    val = ``data_dir``'s, test_shifted = the fold (site after site, as preprocess writes)."""
    out.mkdir(parents=True)
    val = integrity.load_checked_split(data_dir, "val", manifest)
    with_sites = "sites" in manifest["splits"]["val"]
    records = {}
    for name, rows in (("train", np.flatnonzero(pool.fold != fold)),
                       (shift.SPLIT, np.flatnonzero(pool.fold == fold))):
        digest = _write_split(out, name, len(rows),
                              lambda a, b, rows=rows: pool.images(rows[a:b]), pool.labels[rows])
        records[name] = _split_record(pool.labels[rows], pool.sites[rows],
                                      manifest["class_names"], digest, with_sites)
    _write_split(out, "val", len(val), lambda a, b: np.asarray(val.images[a:b]), val.labels)
    records["val"] = manifest["splits"]["val"]
    kept = {k: v for k, v in manifest.items() if k not in ("files", "report")}
    fold_manifest = {**kept, "splits": {s: records[s] for s in ("train", "val",
                                                                    shift.SPLIT)},
                     "shift_fold": {"fold": fold + 1, "of": int(pool.fold.max()) + 1,
                                    "from": str(data_dir)}}
    (out / data.MANIFEST).write_text(json.dumps(fold_manifest, indent=2))


def _fold_rules(y: np.ndarray, probs: np.ndarray, fold: np.ndarray,
                thresholds: list[dict[str, float | None]]) -> dict[str, dict]:
    """Per threshold rule: the balanced accuracy of each fold model at its own validation
    threshold on the fold it left out, their mean and the worst."""
    rules: dict[str, dict] = {}
    for rule in thresholds[0]:
        per_fold = [None if t[rule] is None else
                    metrics.rates_at(y[fold == i], probs[fold == i, 1], t[rule])[
                        "balanced_accuracy"] for i, t in enumerate(thresholds)]
        known = [v for v in per_fold if v is not None]
        rules[rule] = {"balanced_accuracy": per_fold,
                       "mean": float(np.mean(known)) if len(known) == len(per_fold) else None,
                       "worst": float(np.min(known)) if len(known) == len(per_fold) else None}
    return rules


def crossfold(data_dir: Path, model_dir: Path, folds: int, output: Path,
              epochs: int = schema.DEFAULTS.epochs, cache_dir: Path | None = None) -> dict | None:
    """Train the recipe of the single model in ``model_dir`` on each of ``folds`` shift folds of
    ``data_dir``'s pool and write the out-of-fold predictions as ``output/shift_folds/`` (an
    evaluated split, replacing an earlier one). Returns its metrics; None (nothing written)
    when ``folds`` is 0. A run stopped or failing at any point leaves no partial split."""
    check_folds(folds)
    data_dir, model_dir, output = Path(data_dir), Path(model_dir), Path(output)
    info = model_loader.read_model_info(model_dir)
    if info.get("ensemble"):
        raise ConfigError(f"{quote(str(model_dir))}: an ensemble; folds retrain one network "
                          f"(compare averages its members' folds)")
    missing = [k for k in ("model_name", "batch_size", "seed", "class_names") if
               info.get(k) is None]
    if missing:
        raise ConfigError(f"{quote(str(model_dir))}: model_info.json lacks "
                          f"{', '.join(missing)}; it cannot be trained again")
    manifest = integrity.read_manifest(data_dir)
    if folds == 0:
        return None
    staging.check_replaceable(output / SPLIT, (artifacts.METRICS_FILE,))
    pool = pool_folds(data_dir, manifest, folds, int(manifest.get("seed", info["seed"])))
    val = integrity.load_checked_split(data_dir, "val", manifest)
    binary = len(info["class_names"]) == 2
    groups = (shift.val_groups(val.images, site_metrics.site_rows(manifest, "val", "val"))
              if binary else None)
    method = str(info.get("threshold_method") or artifacts.DEFAULT_THRESHOLD_RULE)
    rule = method if method in artifacts.THRESHOLD_RULES else artifacts.DEFAULT_THRESHOLD_RULE
    probs = np.zeros((len(pool.labels), len(info["class_names"])))
    per_fold, thresholds, seconds = [], [], 0.0
    with tempfile.TemporaryDirectory(prefix="lungxray-folds-") as work:
        for i in range(folds):
            fold_data, fold_model = Path(work) / f"data{i}", Path(work) / f"model{i}"
            write_fold(data_dir, manifest, pool, i, fold_data)
            fitted = train.train(
                fold_data, str(info["model_name"]), fold_model,
                hparams=info.get("hparams") or None, epochs=epochs,
                weights=str(info.get("weights") or "none"), batch_size=int(info["batch_size"]),
                seed=int(info["seed"]), target_sensitivity=artifacts.target_sensitivity_of(info),
                threshold_rule=rule, cache_dir=cache_dir)
            seconds += float(fitted.get("train_seconds") or 0.0)
            predictor = model_loader.load(fold_model)
            held = np.flatnonzero(pool.fold == i)
            for start in range(0, len(held), CHUNK):
                chunk = held[start:start + CHUNK]
                probs[chunk] = predictor.predict(pool.images(chunk))[0]
            entry = {"fold": i + 1, "n": len(held), "train_images": fitted["train_images"],
                     "roc_auc": metrics.roc_auc(pool.labels[held], probs[held]),
                     "threshold": fitted.get("threshold")}
            if binary:
                val_scores = predictor.predict(val.images)[0][:, 1]
                thresholds.append(metrics.rule_thresholds(val.labels, val_scores, groups))
                entry["rule_thresholds"] = thresholds[-1]
            per_fold.append(entry)
            for used in (fold_data, fold_model):  # a fold's copy of the pool, no longer needed
                shutil.rmtree(used)
    aucs = [f["roc_auc"] for f in per_fold if f["roc_auc"] is not None]
    record = {"folds": folds, "seed": int(manifest.get("seed", info["seed"])),
              "epochs": epochs, "pool_splits": list(pool.parts),
              "train_seconds": round(seconds, 2), "per_fold": per_fold,
              "mean_fold_roc_auc": float(np.mean(aucs)) if len(aucs) == folds else None,
              "worst_fold_roc_auc": float(np.min(aucs)) if len(aucs) == folds else None,
              "rules": _fold_rules(pool.labels, probs, pool.fold, thresholds) if binary else {}}
    multi_site = len(set(pool.sites.tolist())) > 1
    split = data.Split(np.zeros((len(pool.labels), 0), np.uint8), pool.labels)
    with staging.staging_dir(output, ".shift-folds-", "lungxray crossfold") as build:
        result = evaluate.evaluate_split(
            Predictor(info, []), split, SPLIT, Path(build) / SPLIT,
            extra={FOLDS_KEY: record}, explain=False, predicted=(probs, None),
            sites=pool.sites if multi_site else None)
        pd.DataFrame({"fold": pool.fold + 1, "source": pool.source, "row": pool.row}).to_csv(
            Path(build) / SPLIT / "folds.csv", index=False)
        staging.publish(Path(build) / SPLIT, output / SPLIT, (artifacts.METRICS_FILE,))
    return result


def write_record(output: Path, result: dict | None) -> None:
    """``output/folds.json``: the folds block, or ``{"folds": 0}`` when none were run (an
    artifact is never empty)."""
    output.mkdir(parents=True, exist_ok=True)
    record = result[FOLDS_KEY] if result else {"folds": 0}
    safeio.write_text_atomic(output / RECORD_FILE, json.dumps(record, indent=2) + "\n")


def copy_split(folds_dir: Path, evaluation: Path) -> bool:
    """Add the folds' split in ``folds_dir`` (a :func:`crossfold` output) to an evaluation
    dir; False when there is none."""
    found = Path(folds_dir) / SPLIT
    if not found.is_dir():
        return False
    shutil.copytree(found, Path(evaluation) / SPLIT)
    return True
