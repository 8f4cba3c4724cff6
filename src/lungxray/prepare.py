"""Prepare a raw source into leakage-free seeded splits, streamed chunk by chunk to disk.

What comes out is a prepared dataset (:mod:`lungxray.data`). Preparing runs in two passes so
that no split ever has to fit in memory: every given split is decoded at the prepared size into
a memory-mapped pool (:mod:`lungxray.pools`, hashing each image on the way), then splits are
decided on labels, hashes and patient ids alone, and rows are copied from the pools into the
output files a chunk at a time.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np

from lungxray import datareport, raw_source, safeio, shift, site_prepare, sources
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray import prepare_steps as steps
from lungxray import sites as siting
from lungxray.data import (
    FILES_INDEX,
    FORMAT,
    MANIFEST,
    OUTPUT_SPLITS,
    images_file,
    is_array_file,
    is_prepared,
    labels_file,
)
from lungxray.errors import ConfigError, DataError
from lungxray.limits import Limits
from lungxray.pools import Pool, Settings
from lungxray.prepare_steps import MIN_IMAGE_SIZE
from lungxray.staging import signals_blocked, staging_dir

DEFAULT_FOLDER_SIZE = 224
# For the free-space check: a label and a files.csv row per image (measured ~80 bytes), and the
# report's figures (~190 KB).
INDEX_BYTES_PER_IMAGE = 64
REPORT_BYTES = 128 << 10


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












def _site_request(source: str, sites: list[tuple[str, str]] | None, site_name: str | None,
                  holdout_site: str | None, carve_missing: bool) -> list[tuple[str, str]]:
    """[(name, source)] of every site, the main one first, checked before anything is read;
    empty for a one-site run (today's outputs, unchanged)."""
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
               site_name: str | None = None, holdout_site: str | None = None,
               shift_fold: tuple[int, int] | None = None) -> dict:
    """Prepare ``source`` into ``output`` and return the manifest.

    ``shifted_test_fraction`` > 0 first carves a ``test_shifted`` split of whole image-statistics
    clusters from train (``lungxray.shift``: a proxy for data from another machine, evaluated,
    never tuned on; only the pick's refit trains on it). Missing val/test splits are carved from
    train (stratified, seeded, duplicate- and patient-grouped) unless ``carve_missing`` is False
    (evaluation of an external set uses the splits as given; a source without splits becomes
    one ``test`` set). ``shift_fold`` (i, k) makes ``test_shifted`` fold i of k image-statistics
    folds instead of the carve's one region (:func:`lungxray.shift.fold_mask`): preparing
    once per fold holds every training image out once.
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
    if shift_fold is not None:
        shift.check_fold(shift_fold)
        if not carve_missing:
            raise DataError("shift_fold needs splits carved from train (carve_missing)")
    if max_per_split < 0 or workers < 0:
        raise DataError(f"max_per_split and workers must be 0 or more, got {max_per_split} and "
                        f"{workers}")
    if channels not in (None, 1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    shown = sources.shown(source)
    named = _site_request(source, sites, site_name, holdout_site, carve_missing)
    if image_size is not None:
        steps.check_image_size(shown, image_size, limits)
    output = Path(output)
    _check_output(output)
    src = raw_source.open_source(source, class_names, cache_dir, limits)
    steps.check_outside_source(shown, src, output)
    floor = max(MIN_IMAGE_SIZE, min_size)
    # An npz keeps its own size by default, capped: (N, 8, 200000) images would need 40 GB each.
    native = min(src.native_size, limits.max_image_size) if src.native_size else None
    settings = Settings(size=image_size or native or DEFAULT_FOLDER_SIZE,
                         channels=channels or src.native_channels or 1,
                         keep_aspect=keep_aspect, min_size=floor,
                         workers=workers or min(8, os.cpu_count() or 1), limits=limits,
                         budget=imaging.Budget(limits.max_decode_bytes))
    steps.check_sizes(shown, src, settings.size, floor, limits)
    fractions = {"val": val_fraction, "test": test_fraction, shift.SPLIT: shifted_test_fraction}
    opened = None
    if named:
        opened = site_prepare.open_sites(named, src, output, settings, floor, cache_dir, limits)
    need = sum(_space_needed(site.src, settings, max_per_split)
               for site in opened) if opened else _space_needed(src, settings, max_per_split)
    safeio.check_free_space(output, need, "output")
    with safeio.no_space_as_error(output, need), staging_dir(
            output.parent, f".prepare-{output.name[:100]}-", "lungxray preprocess") as staging:
        if opened is not None:
            manifest = site_prepare.prepare_sites(
                opened, holdout_site, staging, settings, seed=seed, skip_bad=skip_bad,
                max_per_split=max_per_split, fractions=fractions, shift_fold=shift_fold)
        else:
            manifest = _prepare(src, source, staging, settings, seed=seed, skip_bad=skip_bad,
                                carve_missing=carve_missing, max_per_split=max_per_split,
                                fractions=fractions, shift_fold=shift_fold)
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
             fractions: dict[str, float], shift_fold: tuple[int, int] | None = None) -> dict:
    """Both passes into ``staging``; returns the manifest (written last)."""
    pools, bad, source_sha, dropped = steps.decode_checked(src, source, staging / ".pools",
                                                           settings, skip_bad)
    if not carve_missing and src.flat and "train" in pools:
        pools = {"test": pools.pop("train")}  # an external set is evaluated as a whole
    if carve_missing:
        if "train" not in pools:
            raise DataError(f"{source}: has no train split to train on or carve from")
        steps.check_classes(source, pools["train"], src.class_names)
        steps.check_coverage(source, pools, src.class_names)
    by_patient = any((pool.groups != "").any() for pool in pools.values())
    plan, carved, shift_info = steps.plan_splits(pools, carve_missing, fractions, seed,
                                                 max_per_split, by_patient, settings, shift_fold)
    written, histograms = _write_all(pools, plan, staging, settings, len(src.class_names))
    shutil.rmtree(staging / ".pools")
    steps.write_index(staging / FILES_INDEX, written, src.class_names)
    manifest = {
        "format": FORMAT,
        "source": source,
        "source_kind": src.kind,
        "source_sha256": source_sha,
        "class_names": src.class_names,
        **steps.settings_record(settings, seed, fractions),
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
        **steps.duplicates(written, by_patient),
        "skipped": bad,
        "skipped_splits": dropped,
        "ignored": src.ignored,
    }
    return steps.finish(staging, manifest, written, histograms, seed)








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
        sha = steps.write_split([(pool.images(), rows)], labels, staging / images_file(name),
                           settings, histograms)
        written[name] = {"labels": labels, "hashes": pool.hashes[rows],
                         "groups": pool.groups[rows], "sha256": sha,
                         "origins": [pool.origins[i] for i in rows]}
    return written, histograms


