"""Sites: several sources prepared into one dataset, each under a name.

A site is one source (npz, folder, CSV, gs:// or a published name) with a name that says where
its images come from (``pneumoniamnist``, ``nih``). Everything here works on names, class names
and patient ids, never on pixels, so every request is checked before anything is read or written:
names are short, safe in a path and a metric name, and distinct; a held-out site names one of
several sites; class names map onto one set; no patient belongs to two sites.
:mod:`lungxray.site_prepare` prepares the sites, :mod:`lungxray.site_metrics` scores them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np

from lungxray.errors import ConfigError, DataError, LungxrayError, quote
from lungxray.sources import MEDMNIST_CLASS_NAMES

# Letters, digits, '_' and '-', starting with a letter or digit: safe as a file name part
# (test_site_<name>_images.npy), a Kubeflow metric name part and a CSV or Markdown cell.
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_-]{0,39}"
_NAME = re.compile(NAME_PATTERN)
MAX_SITES = 16
DEFAULT_SITE = "main"
# All images of a held-out site go to one split of this name: evaluated, never trained on.
HOLDOUT_PREFIX = "test_site_"


def holdout_split(site: str) -> str:
    """The split that holds every image of the held-out ``site``."""
    return f"{HOLDOUT_PREFIX}{site}"


def holdout_of(split: str) -> str | None:
    """The site a ``test_site_<name>`` split holds, or None for any other split."""
    return split[len(HOLDOUT_PREFIX):] if split.startswith(HOLDOUT_PREFIX) else None


def check_name(name: object, where: str = "site name",
               error: type[LungxrayError] = ConfigError) -> str:
    """A usable site name, or an ``error`` naming what is wrong with it."""
    if not isinstance(name, str) or not name:
        raise error(f"{where}: a site name may not be empty")
    if not _NAME.fullmatch(name):
        raise error(f"{where}: site name {quote(name, 60)} must be 1 to 40 letters, "
                          f"digits, '_' or '-', starting with a letter or digit (it names "
                          f"files, splits and metrics)")
    return name


def default_name(source: str) -> str:
    """The main source's site name when none is given: the MedMNIST dataset's name for one
    of its files or published names (``pneumoniamnist``), else ``main``."""
    base = source.rstrip("/").rpartition("/")[2]
    stem = base.split(".")[0].split("_")[0].lower()
    return stem if stem in MEDMNIST_CLASS_NAMES else DEFAULT_SITE


def parse_entry(text: str, where: str = "--site") -> tuple[str, str]:
    """``NAME=SOURCE`` -> (name, source); the source keeps any further '='."""
    name, sep, source = text.partition("=")
    name, source = name.strip(), source.strip()
    if not sep:
        raise ConfigError(f"{where}: {quote(text, 80)} is not NAME=SOURCE (e.g. "
                          f"nih=../shared/data/nih_cxr_1000/manifest.csv)")
    check_name(name, where)
    if not source:
        raise ConfigError(f"{where}: site {name!r} has no source (NAME=SOURCE)")
    return name, source


def parse_sites(text: str, where: str = "sites") -> list[tuple[str, str]]:
    """``"nih=a.csv,other=b/"`` -> [(name, source), ...]; empty text is no extra site.
    Sources are separated by commas, so a source path may not hold one."""
    if not text or not text.strip():
        return []
    entries = [item for item in text.split(",") if item.strip()]
    if len(entries) > MAX_SITES:
        raise ConfigError(f"{where}: {len(entries)} sites, at most {MAX_SITES}")
    return [parse_entry(item, where) for item in entries]


def check_request(names: list[str], holdout: str | None, where: str = "sites") -> None:
    """Site names distinct (ignoring case: they name files on case-insensitive disks), at
    most MAX_SITES, and ``holdout`` one of them while another is left to train on."""
    for name in names:
        check_name(name, where)
    if len(names) > MAX_SITES:
        raise ConfigError(f"{where}: {len(names)} sites, at most {MAX_SITES}")
    seen: dict[str, str] = {}
    for name in names:
        if name.lower() in seen:
            raise ConfigError(f"{where}: site name {name!r} repeats "
                              f"{seen[name.lower()]!r}; every site needs its own name")
        seen[name.lower()] = name
    if holdout:
        if holdout not in names:
            raise ConfigError(f"holdout_site {quote(holdout, 60)} names no site "
                              f"(sites: {', '.join(names)})")
        if len(names) < 2:
            raise ConfigError(f"holdout_site {holdout!r} is the only site: nothing would be "
                              f"left to train on; add another with --site NAME=SOURCE")


def class_lookup(site: str, names: list[str], reference: list[str],
                 reference_site: str) -> np.ndarray:
    """Site label index -> index in ``reference``, matching class names ignoring case and
    surrounding space (``NORMAL`` is ``normal``). Every site must name the same classes."""
    wanted = {name.strip().casefold(): i for i, name in enumerate(reference)}
    found = [wanted.get(name.strip().casefold(), -1) for name in names]
    if sorted(found) != list(range(len(reference))):  # each reference class exactly once
        raise DataError(f"site {site!r}: classes {quote(names, 200)} cannot be mapped to "
                        f"the classes {quote(reference, 200)} of site {reference_site!r} "
                        f"(class names must match, ignoring case)")
    return np.asarray(found, dtype=np.int64)


def check_patients(patients: dict[str, Iterable[str]]) -> None:
    """No patient id in two sites: a patient is one person at one hospital, and a shared id
    means two people were merged or one person's images sit on both sides of a split."""
    owner: dict[str, str] = {}
    for site, ids in patients.items():
        for patient in ids:
            if not patient:
                continue
            other = owner.setdefault(patient, site)
            if other != site:
                raise DataError(f"patient id {quote(patient, 60)} appears in sites {other!r} "
                                f"and {site!r}; patient ids must be unique across sites "
                                f"(prefix them with the site)")


def count_rows(manifest: dict) -> list[list]:
    """[site, split, n, count per class] for every site of every split of a prepared dataset
    with sites (none without): the data report's per-site table."""
    classes = manifest["class_names"]
    rows = []
    for name in manifest.get("sites") or {}:
        for split, record in manifest["splits"].items():
            part = (record.get("sites") or {}).get(name)
            if part:
                rows.append([name, split, part["n"], *(part["counts"][c] for c in classes)])
    return rows


def describe(manifest: dict) -> str:
    """One sentence on the sites of a prepared dataset ("" without sites)."""
    records = manifest.get("sites") or {}
    if not records:
        return ""
    parts = [f"{name} ({record['source_kind']}, {len(record['class_names'])} classes named "
             f"{', '.join(record['class_names'])}; splits grouped by {record['grouped_by']})"
             for name, record in records.items()]
    text = (f"{len(records)} sites, each carved on its own and brought to the one prepared "
            f"size: {'; '.join(parts)}.")
    shifted = {name: r["shift"]["n"] for name, r in records.items() if r.get("shift")}
    if shifted:
        text += (" test_shifted holds whole image-statistics clusters of each site's train: "
                 + ", ".join(f"{name} {n}" for name, n in shifted.items()) + " images.")
    holdout = manifest.get("holdout_site")
    if holdout:
        text += (f" Site {holdout} is held out: all its images are in "
                 f"{holdout_split(holdout)}, never trained, tuned, thresholded or selected on.")
    return text
