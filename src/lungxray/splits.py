"""Leakage-free, stratified, seeded splits and duplicate reports, on labels and hashes only.

Everything here works on per-image metadata (label, content hash, patient id), never on pixels,
so it costs the same for 28 px and 1024 px images and nothing has to fit in memory.
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from sklearn.model_selection import StratifiedGroupKFold, train_test_split

from lungxray.sources import DataError

EXAMPLES = 5  # example pairs kept per duplicate report


def group_ids(hashes: np.ndarray, patients: np.ndarray | None = None) -> np.ndarray:
    """Group id per image: images sharing a content hash or a patient id are in one group,
    transitively (patient A's image duplicated in patient B's joins A and B)."""
    _, by_hash = np.unique(hashes, return_inverse=True)
    if patients is None or not len(patients):
        return by_hash.astype(np.int64)
    _, by_patient = np.unique(patients, return_inverse=True)
    n, n_hash = len(hashes), int(by_hash.max()) + 1
    nodes = n + n_hash + int(by_patient.max()) + 1
    # A bipartite graph image -> hash node, image -> patient node; its components are groups.
    rows = np.concatenate([np.arange(n), np.arange(n)])
    cols = np.concatenate([n + by_hash, n + n_hash + by_patient])
    graph = coo_matrix((np.ones(2 * n), (rows, cols)), shape=(nodes, nodes))
    _, component = connected_components(graph, directed=False)
    return np.unique(component[:n], return_inverse=True)[1].astype(np.int64)


def carve(labels: np.ndarray, groups: np.ndarray, fraction: float, seed: int,
          forced: np.ndarray | None = None, by_patient: bool = False,
          name: str = "split") -> np.ndarray:
    """Boolean mask of the images to carve out as a new split.

    Whole groups move together. ``forced`` marks images that must stay (a copy of them sits in
    another split). Groups of exact duplicates are nearly all singletons, so a stratified split
    of group ids hits ``fraction`` exactly; patient groups vary in size, so they go through
    StratifiedGroupKFold, which balances classes over unequal groups (fold size 1/round(1/f)).
    """
    forced = np.zeros(len(labels), bool) if forced is None else forced
    blocked = np.unique(groups[forced])
    candidate = ~np.isin(groups, blocked)
    if by_patient:
        return _carve_patients(labels, groups, candidate, fraction, seed, name)
    unique, first = np.unique(groups[candidate], return_index=True)
    group_labels = labels[candidate][first]
    counts = Counter(group_labels.tolist())
    if len(counts) < 2 or min(counts.values()) < 2:
        raise DataError(f"cannot carve a stratified {name} split: class counts {dict(counts)} "
                        f"need at least two distinct images per class")
    n_carved = int(round(fraction * len(labels)))
    try:
        _, carved_groups = train_test_split(unique, test_size=n_carved, random_state=seed,
                                            stratify=group_labels)
    except ValueError as err:
        raise DataError(f"cannot carve a {fraction:.0%} stratified {name} split from "
                        f"{len(labels)} images: {err}") from err
    return np.isin(groups, carved_groups) & candidate


def _carve_patients(labels: np.ndarray, groups: np.ndarray, candidate: np.ndarray,
                    fraction: float, seed: int, name: str) -> np.ndarray:
    n_folds = max(2, int(round(1 / fraction)))
    index = np.flatnonzero(candidate)
    n_groups = len(np.unique(groups[index]))
    if n_groups < n_folds:
        raise DataError(f"cannot carve a {fraction:.0%} {name} split by patient: only "
                        f"{n_groups} patient group(s) can move, need at least {n_folds}")
    folds = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "least populated class" on rare classes
        _, carved = next(folds.split(index, labels[index], groups[index]))
    mask = np.zeros(len(labels), bool)
    mask[index[carved]] = True
    return mask


def stratified_indices(labels: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``limit`` images, keeping class proportions."""
    if limit <= 0 or len(labels) <= limit:
        return np.arange(len(labels))
    counts = Counter(labels.tolist())
    stratify = labels if min(counts.values()) >= 2 and limit >= len(counts) else None
    keep, _ = train_test_split(np.arange(len(labels)), train_size=limit, random_state=seed,
                               stratify=stratify)
    return np.sort(keep)


def within_split_duplicates(hashes: np.ndarray, labels: np.ndarray,
                            origins: list[str] | None = None) -> dict:
    """Exact duplicates inside one split: extra copies, groups, label conflicts, examples."""
    unique, inverse, counts = np.unique(hashes, return_inverse=True, return_counts=True)
    repeated = np.flatnonzero(counts > 1)
    # Identical pixels with different labels: label noise worth showing to the user.
    group_label = np.unique(np.stack([inverse, labels]), axis=1)
    conflicts = int((np.bincount(group_label[0], minlength=len(unique)) > 1).sum())
    pairs = [[int(i) for i in np.flatnonzero(inverse == group)[:2]]
             for group in repeated[:EXAMPLES]]
    report = {"count": int(len(hashes) - len(unique)), "groups": int(len(repeated)),
              "label_conflicts": conflicts, "examples": pairs}
    if origins is not None:
        report["files"] = [[origins[i], origins[j]] for i, j in pairs]
    return report


def cross_split_duplicates(hashes: dict[str, np.ndarray],
                           origins: dict[str, list[str]] | None = None) -> dict:
    """Images that appear pixel-identical in two splits, per pair of splits: ``count`` is how
    many images of the second split have a copy in the first."""
    report = {}
    names = list(hashes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(hashes[a], hashes[b])
            pairs = [[int(np.flatnonzero(hashes[a] == h)[0]),
                      int(np.flatnonzero(hashes[b] == h)[0])] for h in shared[:EXAMPLES]]
            entry = {"count": int(np.isin(hashes[b], shared).sum()), "examples": pairs}
            if origins is not None:
                entry["files"] = [[origins[a][i], origins[b][j]] for i, j in pairs]
            report[f"{a}/{b}"] = entry
    return report


def cross_split_groups(groups: dict[str, np.ndarray]) -> dict:
    """Patients that appear in two splits, per pair of splits (count and example ids)."""
    report = {}
    names = list(groups)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            shared = np.intersect1d(groups[a], groups[b])
            report[f"{a}/{b}"] = {"count": int(len(shared)),
                                  "examples": [str(g) for g in shared[:EXAMPLES]]}
    return report
