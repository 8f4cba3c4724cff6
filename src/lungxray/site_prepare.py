"""Prepare several sites into one dataset (``lungxray preprocess --site NAME=SOURCE``).

Each site is read by the same bounded readers as a single source, decoded at the one prepared
size and channel count (a 28 px npz and 256 px PNGs alike), its class names mapped onto the
first site's, and its splits carved on its own exactly as :mod:`lungxray.prepare` carves one
source, by the same steps (:mod:`lungxray.prepare_steps`): a site with its own splits keeps
them; otherwise stratified, seeded, grouped by duplicate image and patient. Each output split
then holds its sites one after the other, and ``manifest.json`` records per split how many rows
of each site it holds, in row order, so evaluation knows the site of every image; ``files.csv``
names it per row. A held-out site (``holdout_site``) goes whole into ``test_site_<name>``: it
never reaches train or val.
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lungxray import prepare_steps as steps
from lungxray import raw_source, sources
from lungxray import sites as siting
from lungxray import splits as splitting
from lungxray.data import (
    FILES_INDEX,
    FORMAT,
    OUTPUT_SPLITS,
    images_file,
    labels_file,
)
from lungxray.errors import DataError, quote
from lungxray.limits import Limits
from lungxray.pools import Pool, Settings


@dataclass
class OpenSite:
    """One site's source, scanned (nothing decoded yet), its labels mapped to the first site's
    classes; ``class_names`` are the names the source itself uses."""

    name: str
    source: str
    src: sources.Source
    class_names: list[str]

    @property
    def where(self) -> str:
        return f"site {self.name!r} ({sources.shown(self.source)})"


@dataclass
class Segment:
    """Rows of one pool of one site that go, in this order, into an output split."""

    site: str
    pool: Pool
    rows: np.ndarray


# --------------------------------------------------------------------------- opening


def _identity(src: sources.Source) -> tuple:
    """What makes two scanned sources the same data (a CSV is its file, not its folder)."""
    files = tuple(str(p.resolve()) for p in src.extra_hashed)
    return src.kind, str(src.root.resolve()), files


def _relabelled(src: sources.Source, lookup: np.ndarray,
                classes: list[str]) -> sources.Source:
    """``src`` with labels through ``lookup`` and the reference class names."""
    if np.array_equal(lookup, np.arange(len(lookup))):
        return dataclasses.replace(src, class_names=list(classes))
    splits: dict[str, sources.FileSet | sources.ArraySet] = {}
    for name, split in src.splits.items():
        if isinstance(split, sources.FileSet):
            splits[name] = sources.FileSet([dataclasses.replace(item, label=int(lookup[item.label]))
                                            for item in split.items])
        else:
            splits[name] = dataclasses.replace(split, labels=lookup[split.labels])
    return dataclasses.replace(src, class_names=list(classes), splits=splits)


def _patients(src: sources.Source) -> set[str]:
    return {item.group for split in src.splits.values() if isinstance(split, sources.FileSet)
            for item in split.items if item.group}


def open_sites(named: list[tuple[str, str]], main: sources.Source, output: Path,
               settings: Settings, floor: int, cache_dir: Path | None,
               limits: Limits) -> list[OpenSite]:
    """Scan every site after the first (``main``, already scanned and checked) with the
    bounded readers, and check them all before anything is decoded: not inside the output,
    source images large enough, not one source twice, classes that map onto the first site's,
    no patient id in two sites."""
    opened = [OpenSite(named[0][0], named[0][1], main, list(main.class_names))]
    for name, text in named[1:]:
        src = raw_source.open_source(text, None, cache_dir, limits)
        site = OpenSite(name, text, src, list(src.class_names))
        steps.check_outside_source(site.where, src, output)
        steps.check_sizes(site.where, src, settings.size, floor, limits)
        opened.append(site)
    seen: dict[tuple, str] = {}
    for site in opened:
        other = seen.setdefault(_identity(site.src), site.name)
        if other != site.name:
            raise DataError(f"sites {other!r} and {site.name!r} read the same source "
                            f"{sources.shown(site.source)}; give each site its own data")
    reference = opened[0]
    for site in opened[1:]:
        lookup = siting.class_lookup(site.name, site.class_names, reference.class_names,
                                     reference.name)
        site.src = _relabelled(site.src, lookup, reference.class_names)
    siting.check_patients({site.name: _patients(site.src) for site in opened})
    return opened


# --------------------------------------------------------------------------- planning


def _site_plan(site: OpenSite, pools: dict[str, Pool], holdout: bool, settings: Settings,
               seed: int, fractions: dict[str, float], by_patient: bool,
               shift_fold: tuple[int, int] | None = None
               ) -> tuple[dict[str, list[Segment]], dict, dict | None]:
    """One site's output splits as segments, what it carved and its shift carve. A held-out
    site keeps every usable image, in one split of its own."""
    classes = site.src.class_names
    if holdout:
        present = set()
        for pool in pools.values():
            present |= set(np.unique(pool.labels[pool.ok]).tolist())
        missing = [c for i, c in enumerate(classes) if i not in present]
        if missing:
            raise DataError(f"{site.where}: held out, but has no images of class(es) "
                            f"{quote(missing, 200)}; its AUC would be undefined")
        return ({siting.holdout_split(site.name): [Segment(site.name, pool, np.flatnonzero(pool.ok))
                                                   for pool in pools.values()]}, {}, None)
    if "train" not in pools:
        raise DataError(f"{site.where}: has no train split to train on or carve from")
    steps.check_classes(site.where, pools["train"], classes)
    steps.check_coverage(site.where, pools, classes)
    try:
        plan, carved, shift_info = steps.plan_splits(pools, True, fractions, seed, 0,
                                                     by_patient, settings, shift_fold)
    except DataError as err:  # e.g. too few patients to carve val from: name the site
        raise DataError(f"{site.where}: {err}") from None
    segments = {split: [Segment(site.name, pools[pool], rows)]
                for split, (pool, rows) in plan.items()}
    return segments, carved, shift_info


def _cap(split: str, segments: list[Segment], limit: int, seed: int, n_classes: int,
         names: list[str]) -> list[Segment]:
    """At most ``limit`` images in the split over all its sites, stratified by site and class;
    a site left without images is an error (its per-site numbers would vanish silently)."""
    if limit <= 0 or sum(len(s.rows) for s in segments) <= limit:
        return segments
    keys = np.concatenate([names.index(s.site) * n_classes + s.pool.labels[s.rows]
                           for s in segments])
    keep = splitting.stratified_indices(keys, limit, seed)
    capped, start = [], 0
    for segment in segments:
        inside = keep[(keep >= start) & (keep < start + len(segment.rows))] - start
        capped.append(Segment(segment.site, segment.pool, segment.rows[inside]))
        start += len(segment.rows)
    before = {s.site for s in segments}
    after = {s.site for s in capped if len(s.rows)}
    lost = [name for name in names if name in before - after]
    if lost:
        raise DataError(f"split {split!r}: max_per_split={limit} leaves site(s) "
                        f"{quote(lost, 200)} without images (the cap counts every site of the "
                        f"split together); raise max_per_split or set it to 0")
    return [s for s in capped if len(s.rows)]


# --------------------------------------------------------------------------- writing


def _write(segments: dict[str, list[Segment]], staging: Path, settings: Settings,
           n_classes: int) -> tuple[dict[str, dict], np.ndarray]:
    """Each output split, its sites one after the other; per split the labels, hashes,
    patients, sites, origins and sha256 (pixels then labels, as a one-site split)."""
    histograms = np.zeros((n_classes, 256), dtype=np.int64)
    written: dict[str, dict] = {}
    for name, parts in segments.items():
        labels = np.concatenate([s.pool.labels[s.rows] for s in parts]).astype(np.int64)
        np.save(staging / labels_file(name), labels)
        sha = steps.write_split([(s.pool.images(), s.rows) for s in parts], labels,
                                staging / images_file(name), settings, histograms)
        written[name] = {
            "labels": labels, "sha256": sha,
            "hashes": np.concatenate([s.pool.hashes[s.rows] for s in parts]),
            "groups": np.concatenate([s.pool.groups[s.rows] for s in parts]),
            "sites": np.concatenate([np.full(len(s.rows), s.site, dtype=object) for s in parts]),
            "origins": [s.pool.origins[i] for s in parts for i in s.rows]}
    return written, histograms


def _counts(labels: np.ndarray, classes: list[str]) -> dict[str, int]:
    return {cls: int((labels == i).sum()) for i, cls in enumerate(classes)}


def _split_record(info: dict, classes: list[str], names: list[str]) -> dict:
    """A split's manifest record: n, counts, sha256 and its sites in row order."""
    sites = info["sites"]
    return {"n": len(info["labels"]), "counts": _counts(info["labels"], classes),
            "sha256": info["sha256"],
            "sites": {name: {"n": int((sites == name).sum()),
                             "counts": _counts(info["labels"][sites == name], classes)}
                      for name in names if (sites == name).any()}}


def _patients_across(written: dict[str, dict]) -> dict:
    """Patients in two splits, leaving out images without a patient id."""
    return splitting.cross_split_groups({
        name: np.unique(info["groups"][info["groups"] != ""]) for name, info in written.items()})


def prepare_sites(opened: list[OpenSite], holdout: str | None, staging: Path,
                  settings: Settings, *, seed: int, skip_bad: bool, max_per_split: int,
                  fractions: dict[str, float], shift_fold: tuple[int, int] | None = None
                  ) -> dict:
    """Both passes for every site into ``staging``; returns the manifest (written last).
    ``shift_fold`` carves that fold of each site's shift folds as its test_shifted."""
    classes = opened[0].src.class_names
    names = [site.name for site in opened]
    segments: dict[str, list[Segment]] = {}
    records: dict[str, dict] = {}
    bad_all: list[dict] = []
    for i, site in enumerate(opened):
        pools, bad, sha, dropped = steps.decode_checked(
            site.src, site.where, staging / f".pools-{i}", settings, skip_bad)
        by_patient = any((pool.groups != "").any() for pool in pools.values())
        plan, carved, shift_info = _site_plan(site, pools, site.name == holdout, settings,
                                              seed, fractions, by_patient, shift_fold)
        for split, parts in plan.items():
            segments.setdefault(split, []).extend(parts)
        bad_all += [{"site": site.name, **b} for b in bad]
        records[site.name] = {
            "source": site.source, "source_kind": site.src.kind, "source_sha256": sha,
            "class_names": site.class_names, "held_out": site.name == holdout,
            "grouped_by": "patient_id" if by_patient else "content", "carved": carved,
            "shift": shift_info, "skipped": len(bad), "skipped_splits": dropped,
            "ignored": site.src.ignored}
    order = [s for s in OUTPUT_SPLITS if s in segments] + [s for s in segments
                                                            if s not in OUTPUT_SPLITS]
    segments = {split: _cap(split, segments[split], max_per_split, seed, len(classes), names)
                for split in order}
    written, histograms = _write(segments, staging, settings, len(classes))
    for i in range(len(opened)):
        shutil.rmtree(staging / f".pools-{i}")
    steps.write_index(staging / FILES_INDEX, written, classes)
    for name, record in records.items():
        record["splits"] = {split: int((info["sites"] == name).sum())
                            for split, info in written.items() if (info["sites"] == name).any()}
    by_patient = any(r["grouped_by"] == "patient_id" for r in records.values())
    manifest = {
        "format": FORMAT,
        "source": opened[0].source,
        "source_kind": opened[0].src.kind,
        "source_sha256": hashlib.sha256("".join(
            f"{name}\0{r['source_sha256']}\n" for name, r in records.items()).encode()
        ).hexdigest(),
        "class_names": classes,
        **steps.settings_record(settings, seed, fractions),
        "shift": None,  # carved per site: sites[<name>]["shift"]
        "max_per_split": max_per_split,
        "skip_bad": skip_bad,
        "grouped_by": "patient_id" if by_patient else "content",
        "carved": _carved(records),
        "holdout_site": holdout,
        "sites": records,
        "splits": {name: _split_record(info, classes, names) for name, info in written.items()},
        **steps.duplicates(written, False),
        **({"cross_split_patients": _patients_across(written)} if by_patient else {}),
        "skipped": bad_all,
        "skipped_splits": [f"{name}/{split}" for name, r in records.items()
                           for split in r["skipped_splits"]],
        "ignored": [f"{name}: {f}" for name, r in records.items() for f in r["ignored"]],
    }
    return steps.finish(staging, manifest, written, histograms, seed)


def _carved(records: dict[str, dict]) -> dict[str, str]:
    """Which splits were carved out of which sites' train (the data report's wording)."""
    by_split: dict[str, list[str]] = {}
    for name, record in records.items():
        for split in record["carved"]:
            by_split.setdefault(split, []).append(name)
    return {split: f"train of {', '.join(names)}" for split, names in by_split.items()}
