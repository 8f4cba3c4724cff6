"""Prepare a raw source into leakage-free seeded splits, streamed chunk by chunk to disk.

What comes out is a prepared dataset (:mod:`lungxray.data`). Preparing runs in two passes so
that no split ever has to fit in memory: every given split is decoded at the prepared size into
a memory-mapped pool (:mod:`lungxray.pools`, hashing each image on the way), then splits are
decided on labels, hashes and patient ids alone, and rows are copied from the pools into the
output files a chunk at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from lungxray import datareport, raw_source, safeio, shift, sources
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray import splits as splitting
from lungxray.data import (
    FILES_INDEX,
    FORMAT,
    MANIFEST,
    OUTPUT_SPLITS,
    images_file,
    is_array_file,
    is_prepared,
    labels_file,
    load_split_files,
)
from lungxray.errors import ConfigError, DataError
from lungxray.limits import Limits
from lungxray.pools import Pool, Settings, decode_all, new_array_file
from lungxray.staging import signals_blocked, staging_dir

DEFAULT_FOLDER_SIZE = 224
MIN_IMAGE_SIZE = imaging.MIN_SIZE
# For the free-space check: a label and a files.csv row per image (measured ~80 bytes), and the
# report's figures (~190 KB).
INDEX_BYTES_PER_IMAGE = 64
REPORT_BYTES = 128 << 10


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


def _plan(pools: dict[str, Pool], carve_missing: bool, fractions: dict[str, float], seed: int,
          max_per_split: int, by_patient: bool, settings: Settings | None = None
          ) -> tuple[dict[str, tuple[str, np.ndarray]], dict, dict | None]:
    """Per output split: (pool name, sorted row indices), which splits were carved, and how the
    shifted test split was carved (None without one). ``fractions["test_shifted"]`` > 0 carves
    it first, as whole image-statistics clusters (``lungxray.shift``), so val and test stay
    random samples of the images left to train on."""
    plan = {name: (name, np.flatnonzero(pool.ok)) for name, pool in pools.items()}
    carved: dict[str, str] = {}
    shift_info = None
    if carve_missing:
        given = len(plan["train"][1])  # each fraction is a share of train as given
        if fractions.get(shift.SPLIT, 0.0) > 0:
            train = pools["train"]
            rows, groups, forced = _train_groups(pools, plan, by_patient)
            chunk = settings.rows if settings else 4096
            features = shift.shift_features(*shift.statistics_of(train.images(), rows, chunk),
                                            seed)
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


def _write_split(parts: list[tuple[np.ndarray, np.ndarray]], labels: np.ndarray, out: Path,
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


def _write_index(path: Path, written: dict[str, dict], class_names: list[str]) -> None:
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
# preprocess
# ---------------------------------------------------------------------------------------------


def _check_output(output: Path) -> None:
    """``output`` may be replaced only if it is empty or holds a prepared dataset and nothing
    else: a stray ``manifest.json`` must not get a user's folder deleted."""
    if not output.exists():
        return
    if not output.is_dir():
        raise DataError(f"{output}: exists and is not a directory; refusing to overwrite it")
    entries = list(output.iterdir())
    if not entries:
        return
    if not is_prepared(output):
        raise DataError(f"{output}: exists, is not empty and is not a prepared dataset; "
                        f"refusing to overwrite it")
    known = {MANIFEST, FILES_INDEX, datareport.HTML_FILE, datareport.MARKDOWN_FILE}
    # Desktop clutter (.DS_Store, Thumbs.db) from browsing the report is no user data.
    foreign = sorted(e.name for e in entries if not e.is_file() or not (
        e.name in known or is_array_file(e.name) or e.name.startswith(".")
        or e.name in sources.JUNK))
    if foreign:
        raise DataError(f"{output}: a prepared dataset, but it also holds {foreign[:5]} which "
                        f"preprocess did not write; refusing to overwrite it")


def _check_outside_source(source: str, src: sources.Source, output: Path) -> None:
    """The output may not lie inside a source folder: the next scan would read the prepared
    files as images of a class. (A source inside the output is refused by _check_output: no
    source is a file preprocess writes.) A CSV names its files, so an output beside it is fine.
    """
    if src.kind == "folder" and output.resolve().is_relative_to(src.root.resolve()):
        raise DataError(f"{output}: lies inside the source folder {source}; choose an output "
                        f"outside it")


def _check_image_size(where: str, size: int, limits: Limits) -> None:
    """The prepared size: at least 8 px, at most max_image_size (checked before anything is
    read or written: 50000 px would need 2.5 GB per image)."""
    if size < MIN_IMAGE_SIZE:
        raise DataError(f"{where}: image size {size} px is below the minimum of "
                        f"{MIN_IMAGE_SIZE} px")
    if size > limits.max_image_size:
        raise DataError(f"{where}: image size {size} px is above the limit of "
                        f"{limits.max_image_size} px (max_image_size; raise it with "
                        f"--limit max_image_size=N)")


def _check_sizes(where: str, src: sources.Source, size: int, floor: int,
                 limits: Limits = limiting.DEFAULT) -> None:
    """The prepared size must be 8 px..max_image_size; source images at least ``floor`` px."""
    _check_image_size(where, size, limits)
    small = [f"{s.key}: {s.shape[1]}x{s.shape[2]} px" for s in src.splits.values()
             if isinstance(s, sources.ArraySet) and min(s.shape[1:3]) < floor]
    if small:
        raise sources.problems_error(where, f"field(s) with images below the minimum of "
                                     f"{floor} px", small)


def _check_classes(where: str, train: Pool, class_names: list[str]) -> None:
    """A training set needs at least two classes, and no class without images."""
    present = set(np.unique(train.labels[train.ok]).tolist())
    if len(present) < 2:
        only = [class_names[i] for i in sorted(present)]
        raise DataError(f"{where}: only one class {only} has training images; a classifier "
                        f"needs at least two (classes: {class_names})")
    empty = [name for i, name in enumerate(class_names) if i not in present]
    if empty:
        raise DataError(f"{where}: class(es) {empty} have no training images")


def _check_coverage(where: str, pools: dict[str, Pool], class_names: list[str]) -> None:
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


def _site_request(source: str, sites: list[tuple[str, str]] | None, site_name: str | None,
                  holdout_site: str | None, carve_missing: bool) -> list[tuple[str, str]]:
    """[(name, source)] of every site, the main one first, checked before anything is read;
    empty for a one-site run (today's outputs, unchanged)."""
    from lungxray import sites as siting

    if not sites and not holdout_site:
        if site_name:
            raise ConfigError("--site-name names the main source among several sites; give "
                              "another with --site NAME=SOURCE")
        return []
    named = [(siting.check_name(site_name) if site_name else siting.default_name(source),
              source), *(sites or [])]
    siting.check_request([name for name, _ in named], holdout_site)
    if not carve_missing:
        raise ConfigError("sites are prepared into carved splits; carve_missing=False takes "
                          "one source")
    return named


def preprocess(source: str, output: Path, image_size: int | None = None, seed: int = 42,
               val_fraction: float = 0.1, test_fraction: float = 0.1,
               max_per_split: int = 0, channels: int | None = None,
               class_names: list[str] | None = None, carve_missing: bool = True,
               cache_dir: Path | None = None, *, skip_bad: bool = False,
               keep_aspect: bool = False, min_size: int = MIN_IMAGE_SIZE,
               workers: int = 0, limits: Limits | None = None,
               shifted_test_fraction: float = 0.0, sites: list[tuple[str, str]] | None = None,
               site_name: str | None = None, holdout_site: str | None = None) -> dict:
    """Prepare ``source`` into ``output`` and return the manifest.

    ``shifted_test_fraction`` > 0 first carves a ``test_shifted`` split of whole image-statistics
    clusters from train (``lungxray.shift``: a proxy for data from another machine, evaluated,
    never trained or tuned on). Missing val/test splits are carved from train (stratified,
    seeded, duplicate- and patient-grouped) unless ``carve_missing`` is False (evaluation of an
    external set uses the splits as given; a source without splits becomes one ``test`` set).
    Bad files stop the run with an error naming every one of them, or with ``skip_bad`` are left
    out and listed in the manifest and report. ``keep_aspect`` pads instead of stretching; source
    images whose smaller side is below ``min_size`` px (at least 8), and an ``image_size`` below
    8, are refused. ``workers`` decode threads (0: one per CPU, at most 8). Nothing is written
    unless everything succeeds; SIGTERM or SIGINT removes the staging folder, and one left by a
    killed run is swept by the next run on the same output. ``limits`` bound every reader
    (docs/limits.md; default: the built-in ones with any ``LUNGXRAY_<LIMIT>`` environment
    variable applied).

    ``sites`` [(name, source), ...] prepares more sources beside ``source`` (the site
    ``site_name``, default :func:`lungxray.sites.default_name`) into the same splits, each
    carved on its own and recorded per image (:mod:`lungxray.site_prepare`); ``holdout_site``
    puts one site's images into ``test_site_<name>`` alone. Without them nothing changes.
    """
    limits = limits or limiting.from_env()
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 < value < 1.0:
            raise DataError(f"{name} must be between 0 and 1 (exclusive), got {value}")
    if not 0.0 <= shifted_test_fraction < 1.0:
        raise DataError(f"shifted_test_fraction must be 0 (none) or between 0 and 1, got "
                        f"{shifted_test_fraction}")
    if val_fraction + test_fraction + shifted_test_fraction >= 1.0:
        raise DataError(f"val_fraction + test_fraction + shifted_test_fraction must be below 1 "
                        f"(train keeps the rest), got {val_fraction} + {test_fraction} + "
                        f"{shifted_test_fraction}")
    if max_per_split < 0 or workers < 0:
        raise DataError(f"max_per_split and workers must be 0 or more, got {max_per_split} and "
                        f"{workers}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    shown = sources.shown(source)
    named = _site_request(source, sites, site_name, holdout_site, carve_missing)
    if image_size is not None:
        _check_image_size(shown, image_size, limits)
    output = Path(output)
    _check_output(output)
    src = raw_source.open_source(source, class_names, cache_dir, limits)
    _check_outside_source(shown, src, output)
    floor = max(MIN_IMAGE_SIZE, min_size)
    # An npz keeps its own size by default, capped: (N, 8, 200000) images would need 40 GB each.
    native = min(src.native_size, limits.max_image_size) if src.native_size else None
    settings = Settings(size=image_size or native or DEFAULT_FOLDER_SIZE,
                         channels=channels or src.native_channels or 1,
                         keep_aspect=keep_aspect, min_size=floor,
                         workers=workers or min(8, os.cpu_count() or 1), limits=limits,
                         budget=imaging.Budget(limits.max_decode_bytes))
    _check_sizes(shown, src, settings.size, floor, limits)
    fractions = {"val": val_fraction, "test": test_fraction, shift.SPLIT: shifted_test_fraction}
    opened = None
    if named:
        from lungxray import site_prepare  # imports this module's checks

        opened = site_prepare.open_sites(named, src, output, settings, floor, cache_dir, limits)
    need = sum(_space_needed(site.src, settings, max_per_split)
               for site in opened) if opened else _space_needed(src, settings, max_per_split)
    safeio.check_free_space(output, need, "output")
    with safeio.no_space_as_error(output, need), staging_dir(
            output.parent, f".prepare-{output.name[:100]}-", "lungxray preprocess") as staging:
        if opened is not None:
            manifest = site_prepare.prepare_sites(
                opened, holdout_site, staging, settings, seed=seed, skip_bad=skip_bad,
                max_per_split=max_per_split, fractions=fractions)
        else:
            manifest = _prepare(src, source, staging, settings, seed=seed, skip_bad=skip_bad,
                                carve_missing=carve_missing, max_per_split=max_per_split,
                                fractions=fractions)
        _check_output(output)  # still ours to replace after the (long) preparation
        with signals_blocked():  # never half-replaced: old output gone, new one not in place
            if output.exists():
                shutil.rmtree(output)
            os.replace(staging, output)
    return manifest


def _space_needed(src: sources.Source, settings: Settings, max_per_split: int) -> int:
    """Bytes preprocess holds on disk at its peak (a floor, not a bound): every given image in
    a pool, the output splits copied out of the pools before they go, labels, the file index
    and the report."""
    image = settings.size * settings.size * settings.channels
    given = sum(len(split) for split in src.splits.values())
    kept = min(given, max_per_split * len(OUTPUT_SPLITS)) if max_per_split else given
    return (given + kept) * image + kept * INDEX_BYTES_PER_IMAGE + REPORT_BYTES


def _prepare(src: sources.Source, source: str, staging: Path, settings: Settings, *,
             seed: int, skip_bad: bool, carve_missing: bool, max_per_split: int,
             fractions: dict[str, float]) -> dict:
    """Both passes into ``staging``; returns the manifest (written last)."""
    pools, bad, source_sha, dropped = _decode_checked(src, source, staging / ".pools", settings,
                                                      skip_bad)
    if not carve_missing and src.flat and "train" in pools:
        pools = {"test": pools.pop("train")}  # an external set is evaluated as a whole
    if carve_missing:
        if "train" not in pools:
            raise DataError(f"{source}: has no train split to train on or carve from")
        _check_classes(source, pools["train"], src.class_names)
        _check_coverage(source, pools, src.class_names)
    by_patient = any((pool.groups != "").any() for pool in pools.values())
    plan, carved, shift_info = _plan(pools, carve_missing, fractions, seed, max_per_split,
                                     by_patient, settings)
    written, histograms = _write_all(pools, plan, staging, settings, len(src.class_names))
    shutil.rmtree(staging / ".pools")
    _write_index(staging / FILES_INDEX, written, src.class_names)
    manifest = {
        "format": FORMAT,
        "source": source,
        "source_kind": src.kind,
        "source_sha256": source_sha,
        "class_names": src.class_names,
        **_settings_record(settings, seed, fractions),
        "shift": shift_info,
        "max_per_split": max_per_split,
        "skip_bad": skip_bad,
        "grouped_by": "patient_id" if by_patient else "content",
        "carved": carved,
        "splits": {
            name: {"n": len(info["labels"]),
                   "counts": {cls: int((info["labels"] == i).sum())
                              for i, cls in enumerate(src.class_names)},
                   "sha256": info["sha256"]}
            for name, info in written.items()
        },
        **_duplicates(written, by_patient),
        "skipped": bad,
        "skipped_splits": dropped,
        "ignored": src.ignored,
    }
    return _finish(staging, manifest, written, histograms, seed)


def _finish(staging: Path, manifest: dict, written: dict[str, dict], histograms: np.ndarray,
            seed: int) -> dict:
    """The manifest's last entries, the data report, then the manifest itself (written last:
    its presence marks a complete dataset)."""
    manifest.update({"files": FILES_INDEX, "report": {"html": datareport.HTML_FILE,
                                                      "markdown": datareport.MARKDOWN_FILE}})
    loaded = {name: load_split_files(staging, name) for name in written}
    datareport.write_report(staging, manifest, loaded, histograms, seed)
    (staging / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def _settings_record(settings: Settings, seed: int, fractions: dict[str, float]) -> dict:
    """The manifest's record of how images were brought to one size and split."""
    return {"image_size": settings.size, "channels": settings.channels,
            "keep_aspect": settings.keep_aspect, "min_size": settings.min_size, "seed": seed,
            "val_fraction": fractions["val"], "test_fraction": fractions["test"],
            "shifted_test_fraction": fractions.get(shift.SPLIT, 0.0)}


def _decode_checked(src: sources.Source, source: str, pools_dir: Path, settings: Settings,
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


def _write_all(pools: dict[str, Pool], plan: dict[str, tuple[str, np.ndarray]], staging: Path,
               settings: Settings, n_classes: int) -> tuple[dict[str, dict], np.ndarray]:
    """Pass 2: each output split's rows out of its pool. Returns per split its labels, hashes,
    patient ids, origins and sha256, and the per-class intensity histograms."""
    histograms = np.zeros((n_classes, 256), dtype=np.int64)
    written: dict[str, dict] = {}
    for name, (pool_name, rows) in plan.items():
        pool = pools[pool_name]
        if len(rows) == 0:
            raise DataError(f"split '{name}' would be empty")
        labels = pool.labels[rows].astype(np.int64)
        np.save(staging / labels_file(name), labels)
        sha = _write_split([(pool.images(), rows)], labels, staging / images_file(name),
                           settings, histograms)
        written[name] = {"labels": labels, "hashes": pool.hashes[rows],
                         "groups": pool.groups[rows], "sha256": sha,
                         "origins": [pool.origins[i] for i in rows]}
    return written, histograms


def _duplicates(written: dict[str, dict], by_patient: bool) -> dict:
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
