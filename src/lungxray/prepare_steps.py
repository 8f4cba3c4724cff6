"""The steps of preparing a source that one source and several sites share.

:mod:`lungxray.prepare` prepares one source and :mod:`lungxray.site_prepare` several sites into
one dataset; both run the same steps, kept here so that each site is checked, decoded, carved
and written exactly as a single source is: the checks on a scanned source and its decoded pools,
pass 1 with its checks (:func:`decode_checked`), the split plan (:func:`plan_splits`), pass 2's
writers (:func:`write_split`, :func:`write_index`) and the manifest's shared records, written
last by :func:`finish`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lungxray import datareport, shift, sources
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray import splits as splitting
from lungxray.data import FILES_INDEX, MANIFEST, OUTPUT_SPLITS, load_split_files
from lungxray.errors import DataError
from lungxray.limits import Limits
from lungxray.pools import Pool, Settings, decode_all, new_array_file

MIN_IMAGE_SIZE = imaging.MIN_SIZE


# ---------------------------------------------------------------------------------------------
# Checks on a scanned source, and pass 1 (decode into pools) with its checks
# ---------------------------------------------------------------------------------------------


def check_outside_source(source: str, src: sources.Source, output: Path) -> None:
    """The output may not lie inside a source folder: the next scan would read the prepared
    files as images of a class. (A source inside the output is refused by preprocess's check of
    the output: no source is a file preprocess writes.) A CSV names its files, so an output
    beside it is fine."""
    if src.kind == "folder" and output.resolve().is_relative_to(src.root.resolve()):
        raise DataError(f"{output}: lies inside the source folder {source}; choose an output "
                        f"outside it")


def check_image_size(where: str, size: int, limits: Limits) -> None:
    """The prepared size: at least 8 px, at most max_image_size (checked before anything is
    read or written: 50000 px would need 2.5 GB per image)."""
    if size < MIN_IMAGE_SIZE:
        raise DataError(f"{where}: image size {size} px is below the minimum of "
                        f"{MIN_IMAGE_SIZE} px")
    if size > limits.max_image_size:
        raise DataError(f"{where}: image size {size} px is above the limit of "
                        f"{limits.max_image_size} px (max_image_size; raise it with "
                        f"--limit max_image_size=N)")


def check_sizes(where: str, src: sources.Source, size: int, floor: int,
                 limits: Limits = limiting.DEFAULT) -> None:
    """The prepared size must be 8 px..max_image_size; source images at least ``floor`` px."""
    check_image_size(where, size, limits)
    small = [f"{s.key}: {s.shape[1]}x{s.shape[2]} px" for s in src.splits.values()
             if isinstance(s, sources.ArraySet) and min(s.shape[1:3]) < floor]
    if small:
        raise sources.problems_error(where, f"field(s) with images below the minimum of "
                                     f"{floor} px", small)


def check_classes(where: str, train: Pool, class_names: list[str]) -> None:
    """A training set needs at least two classes, and no class without images."""
    present = set(np.unique(train.labels[train.ok]).tolist())
    if len(present) < 2:
        only = [class_names[i] for i in sorted(present)]
        raise DataError(f"{where}: only one class {only} has training images; a classifier "
                        f"needs at least two (classes: {class_names})")
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        raise DataError(f"{where}: class(es) {empty} have no training images")


def check_coverage(where: str, pools: dict[str, Pool], class_names: list[str]) -> None:
    """A given val or test split must hold every class: val chooses the model and its
    threshold (AUC is undefined on one class), test reports per-class errors."""
    problems = []
    for name in ("val", "test"):
        if name in pools:
            present = set(np.unique(pools[name].labels[pools[name].ok]).tolist())
            missing = [c for i, c in enumerate(class_names) if i not in present]
            if missing:
                problems.append(f"split '{name}' has no images of class(es) {missing}")
    if problems:
        raise sources.problems_error(where, "split(s) missing a class", problems)


def decode_checked(src: sources.Source, source: str, pools_dir: Path, settings: Settings,
                   skip_bad: bool) -> tuple[dict[str, Pool], list[dict], str, list[str]]:
    """Pass 1 with its checks: the usable pools, the unusable files, the source's sha256 and
    the splits dropped for having no usable image (an error unless ``skip_bad``)."""
    empty = [name for name, split in src.splits.items() if len(split) == 0]
    if empty and not skip_bad:
        raise sources.problems_error(source, "empty split(s)", [
            f"split '{name}' holds no images" for name in empty],
            " (pass skip_bad=True / --skip-bad to drop them)")
    pools, bad, source_sha = decode_all(src, pools_dir, settings)
    if bad and not skip_bad:
        raise sources.problems_error(source, "unusable file(s)", [
            f"{b['file']}: {b['reason']}" for b in bad],
            " (pass skip_bad=True / --skip-bad to skip them and list them in the report)")
    dropped = [name for name, pool in pools.items() if not pool.ok.any()]
    if dropped and not skip_bad:
        raise sources.problems_error(source, "split(s) without usable images", [
            f"split '{name}'" for name in dropped])
    return ({name: pool for name, pool in pools.items() if name not in dropped}, bad,
            source_sha, dropped)


# ---------------------------------------------------------------------------------------------
# Pass 2: decide the splits on metadata, then copy rows out
# ---------------------------------------------------------------------------------------------


def _train_groups(pools: dict[str, Pool], plan: dict[str, tuple[str, np.ndarray]],
                  by_patient: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Train's current rows, their groups (duplicates, patients) and which of them must stay
    (a copy or the patient sits in another split)."""
    train = pools["train"]
    rows = plan["train"][1]
    others = [pools[p].hashes[i] for split, (p, i) in plan.items() if split != "train"]
    forced = np.isin(train.hashes[rows], np.concatenate(others) if others else [])
    patients = train.groups[rows] if by_patient else None
    if by_patient:
        other_ids = [pools[p].groups[i] for s, (p, i) in plan.items() if s != "train"]
        forced |= np.isin(patients, np.concatenate(other_ids) if other_ids else [])
    return rows, splitting.group_ids(train.hashes[rows], patients), forced


def plan_splits(pools: dict[str, Pool], carve_missing: bool, fractions: dict[str, float],
                seed: int, max_per_split: int, by_patient: bool, settings: Settings | None = None,
                shift_fold: tuple[int, int] | None = None
                ) -> tuple[dict[str, tuple[str, np.ndarray]], dict, dict | None]:
    """Per output split: (pool name, sorted row indices), which splits were carved, and how the
    shifted test split was carved (None without one). ``fractions["test_shifted"]`` > 0 carves
    it first, as whole image-statistics clusters (``lungxray.shift``), so val and test stay
    random samples of the images left to train on; ``shift_fold`` (i, k) carves fold i of k
    such folds instead (:func:`lungxray.shift.fold_mask`)."""
    plan = {name: (name, np.flatnonzero(pool.ok)) for name, pool in pools.items()}
    carved: dict[str, str] = {}
    shift_info = None
    if carve_missing:
        given = len(plan["train"][1])  # each fraction is a share of train as given
        if fractions.get(shift.SPLIT, 0.0) > 0 or shift_fold:
            train = pools["train"]
            rows, groups, forced = _train_groups(pools, plan, by_patient)
            chunk = settings.rows if settings else 4096
            features = shift.shift_features(*shift.statistics_of(train.images(), rows, chunk),
                                            seed)
            if shift_fold:
                mask, shift_info = shift.fold_mask(features, train.labels[rows], groups,
                                                   shift_fold, seed, forced)
            else:
                mask, shift_info = shift.carve_shifted(features, train.labels[rows], groups,
                                                       fractions[shift.SPLIT], seed, forced)
            plan["train"], plan[shift.SPLIT] = ("train", rows[~mask]), ("train", rows[mask])
            carved[shift.SPLIT] = "train"
        for name in ("test", "val"):
            if name in plan:
                continue
            train = pools["train"]
            rows, groups, forced = _train_groups(pools, plan, by_patient)
            mask = splitting.carve(train.labels[rows], groups,
                                   fractions[name] * given / len(rows), seed, forced,
                                   by_patient, name)
            plan["train"], plan[name] = ("train", rows[~mask]), ("train", rows[mask])
            carved[name] = "train"
    ordered = {}
    for name in OUTPUT_SPLITS:
        if name in plan:
            pool_name, rows = plan[name]
            keep = splitting.stratified_indices(pools[pool_name].labels[rows], max_per_split, seed)
            ordered[name] = (pool_name, rows[keep])
    return ordered, carved, shift_info


def write_split(parts: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, out: Path,
                settings: Settings, histograms: np.ndarray) -> str:
    """Copy ``images[rows]`` of each (images, rows) part, one after the other, into ``out``
    chunk by chunk; returns the split's sha256 (pixels then labels, as for an in-memory array)
    and adds pixel counts per class to histograms."""
    target = new_array_file(out, (len(labels), settings.size, settings.size, settings.channels))
    digest = hashlib.sha256()
    start = 0
    for images, rows in parts:
        for first in range(0, len(rows), settings.rows):
            block = np.ascontiguousarray(images[rows[first:first + settings.rows]])
            target[start:start + len(block)] = block
            target.flush()
            digest.update(block.tobytes())
            datareport.add_histograms(histograms, block, labels[start:start + len(block)])
            start += len(block)
    del target
    digest.update(np.ascontiguousarray(labels).tobytes())
    return digest.hexdigest()


def write_index(path: Path, written: dict[str, dict], class_names: list[str]) -> None:
    """files.csv: which source file (or npz row) became which row of which split."""
    frames = [pd.DataFrame({"split": name, "index": np.arange(len(info["labels"])),
                            "label": info["labels"],
                            "class": [class_names[i] for i in info["labels"]],
                            "file": info["origins"], "sha1": info["hashes"],
                            "patient_id": info["groups"],
                            **({"site": info["sites"]} if "sites" in info else {})})
              for name, info in written.items()]
    pd.concat(frames).to_csv(path, index=False)


# ---------------------------------------------------------------------------------------------
# The manifest's shared records, and the manifest itself
# ---------------------------------------------------------------------------------------------


def settings_record(settings: Settings, seed: int, fractions: dict[str, float]) -> dict:
    """The manifest's record of how images were brought to one size and split."""
    return {"image_size": settings.size, "channels": settings.channels,
            "keep_aspect": settings.keep_aspect, "min_size": settings.min_size, "seed": seed,
            "val_fraction": fractions["val"], "test_fraction": fractions["test"],
            "shifted_test_fraction": fractions.get(shift.SPLIT, 0.0)}


def duplicates(written: dict[str, dict], by_patient: bool) -> dict:
    """The manifest's leakage reports: identical images across and within splits, and
    patients in two splits when the source names patients."""
    report = {
        "cross_split_duplicates": splitting.cross_split_duplicates(
            {n: info["hashes"] for n, info in written.items()},
            {n: info["origins"] for n, info in written.items()}),
        "within_split_duplicates": {
            n: splitting.within_split_duplicates(info["hashes"], info["labels"], info["origins"])
            for n, info in written.items()},
    }
    if by_patient:
        report["cross_split_patients"] = splitting.cross_split_groups(
            {n: np.unique(info["groups"]) for n, info in written.items()})
    return report


def finish(staging: Path, manifest: dict, written: dict[str, dict], histograms: np.ndarray,
           seed: int) -> dict:
    """The manifest's last entries, the data report, then the manifest itself (written last:
    its presence marks a complete dataset)."""
    manifest.update({"files": FILES_INDEX, "report": {"html": datareport.HTML_FILE,
                                                      "markdown": datareport.MARKDOWN_FILE}})
    loaded = {name: load_split_files(staging, name) for name in written}
    datareport.write_report(staging, manifest, loaded, histograms, seed)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest
