"""A development proxy for distribution shift: a test split of whole image-statistics clusters.

A random test split is drawn from the training distribution, so it overestimates how a model
does on another hospital's machine (VGG16: val AUC 0.993, official test 0.947, an external
adult set 0.727). Lacking such data, ``test_shifted`` holds out a region of *image statistics*
space: every training image is described by acquisition-like statistics (intensity, contrast,
histogram percentiles, edge density, border darkness, a few PCA components of a thumbnail),
the standardised descriptions are clustered with k-means, and whole clusters around a seeded
anchor cluster on the edge of that space are held out. The candidates' training, tuning and
thresholds never see those images, so they differ systematically from everything those models
learnt from; only the pick's refit (:mod:`lungxray.refit`) learns from them afterwards.

:func:`fold_mask` cuts the same space into K folds instead of one region, so that preparing once
per fold holds every training image out once (``lungxray preprocess --shift-fold I/K``).
"""

from __future__ import annotations

import numpy as np
from sklearn.cluster import KMeans
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from lungxray.sources import DataError

SPLIT = "test_shifted"
THUMB = 8  # thumbnail side for the PCA components (coarse anatomy and exposure layout)
PCA_COMPONENTS = 4
STAT_NAMES = ["mean", "std", "p05", "p25", "p50", "p75", "p95", "edge_density",
              "border_darkness", "dark_share", "bright_share"]
FEATURE_NAMES = [*STAT_NAMES, *(f"pca{i + 1}" for i in range(PCA_COMPONENTS))]
MIN_CLASS_SHARE = 0.1  # each class at least this share of the held-out split


def _thumbnails(grey: np.ndarray) -> np.ndarray:
    """(N, THUMB*THUMB) block means of (N, S, S) grey images (S cropped to a multiple)."""
    n, size = grey.shape[0], grey.shape[1] // THUMB * THUMB
    if size == 0:
        raise DataError(f"images of {grey.shape[1]} px are too small for the shift features")
    step = size // THUMB
    blocks = grey[:, :size, :size].reshape(n, THUMB, step, THUMB, step)
    return blocks.mean(axis=(2, 4)).reshape(n, -1)


def image_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per image (N, len(STAT_NAMES)) statistics and (N, THUMB**2) thumbnails of uint8
    (N, S, S, C) images, on the 0..1 grey scale."""
    grey = images.astype(np.float32).mean(axis=-1) / 255.0
    flat = grey.reshape(len(grey), -1)
    percentiles = np.percentile(flat, [5, 25, 50, 75, 95], axis=1).T
    gy, gx = np.gradient(grey, axis=(1, 2))
    magnitude = np.hypot(gx, gy)
    # Edge density: share of pixels with a strong gradient (sharpness, noise, collimation).
    edges = (magnitude > 0.1).reshape(len(grey), -1).mean(axis=1)
    border = max(1, grey.shape[1] // 8)
    mask = np.zeros(grey.shape[1:], bool)
    mask[:border], mask[-border:], mask[:, :border], mask[:, -border:] = True, True, True, True
    # Border darkness: how much darker the frame is than the middle (collimation, padding).
    darkness = grey[:, ~mask].mean(axis=1) - grey[:, mask].mean(axis=1)
    stats = np.column_stack([flat.mean(axis=1), flat.std(axis=1), percentiles, edges, darkness,
                             (flat < 0.1).mean(axis=1), (flat > 0.9).mean(axis=1)])
    return stats.astype(np.float64), _thumbnails(grey).astype(np.float64)


def shift_features(stats: np.ndarray, thumbnails: np.ndarray, seed: int) -> np.ndarray:
    """Standardised statistics plus PCA components of the thumbnails: what is clustered."""
    components = min(PCA_COMPONENTS, thumbnails.shape[1], len(thumbnails))
    pcs = PCA(components, random_state=seed).fit_transform(thumbnails)
    features = np.column_stack([stats, pcs])
    return StandardScaler().fit_transform(features)


def _shortfall(labels: np.ndarray, mask: np.ndarray, classes: np.ndarray) -> bool:
    """True when a class has less than MIN_CLASS_SHARE of the held-out images (or none)."""
    held = labels[mask]
    return any((held == c).sum() < max(1, MIN_CLASS_SHARE * len(held)) for c in classes)


def carve_shifted(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
                  fraction: float, seed: int, blocked: np.ndarray | None = None,
                  n_clusters: int | None = None) -> tuple[np.ndarray, dict]:
    """Boolean mask of the images to hold out as ``test_shifted``, and a description.

    ``n_clusters`` k-means clusters (default ``round(3 / fraction)``, so about three clusters
    are held out); the anchor is drawn (seeded) among the clusters farther than the median from
    the data's centre, then the clusters nearest to it join while that brings the held-out count
    closer to ``fraction`` of the images. Anchors whose region lacks a class (< MIN_CLASS_SHARE)
    are skipped. Whole groups (duplicates, patients) follow their images; ``blocked`` images
    (copies in a given split) never move.
    """
    if not 0.0 < fraction < 1.0:
        raise DataError(f"shifted_test_fraction must be between 0 and 1 (exclusive), "
                        f"got {fraction}")
    blocked = np.zeros(len(labels), bool) if blocked is None else blocked
    k = n_clusters or max(4, int(round(3 / fraction)))
    if len(labels) < 2 * k:
        raise DataError(f"cannot carve a {fraction:.0%} shifted test split from {len(labels)} "
                        f"images: need at least {2 * k} for {k} clusters (shifted_test_fraction "
                        f"0: none)")
    clusters = KMeans(k, n_init=10, random_state=seed).fit(features)
    centres = clusters.cluster_centers_
    sizes = np.bincount(clusters.labels_, minlength=k)
    radius = np.linalg.norm(centres, axis=1)  # features are standardised: the centre is 0
    outer = np.flatnonzero(radius >= np.median(radius))
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    target = fraction * len(labels)
    blocked_groups = np.unique(groups[blocked])
    for anchor in rng.permutation(outer):
        order = np.argsort(np.linalg.norm(centres - centres[anchor], axis=1), kind="stable")
        # As many nearest clusters as bring the held-out count closest to the target.
        chosen = order[:int(np.argmin(np.abs(np.cumsum(sizes[order]) - target))) + 1]
        mask = np.isin(clusters.labels_, chosen)
        mask = np.isin(groups, groups[mask]) & ~np.isin(groups, blocked_groups)
        if mask.any() and not _shortfall(labels, mask, classes) and mask.sum() < len(labels):
            rest = ~mask
            if _shortfall(labels, rest, classes):
                continue
            return mask, describe(features, mask, chosen, clusters.labels_, k, seed, anchor)
    raise DataError(f"cannot carve a shifted test split: no region of {k} image-statistics "
                    f"clusters holds every class (each at least {MIN_CLASS_SHARE:.0%})")


FOLD_CLUSTERS = 3  # k-means clusters per fold
MAX_FOLDS = 10


def check_fold(fold: tuple[int, int]) -> None:
    """``(i, k)``: fold i (1..k) of k (2..MAX_FOLDS), or a one-line error."""
    i, k = fold
    if not 2 <= k <= MAX_FOLDS or not 1 <= i <= k:
        raise DataError(f"shift fold must be I/K with 2 <= K <= {MAX_FOLDS} and 1 <= I <= K, "
                        f"got {i}/{k}")


def fold_bands(features: np.ndarray, groups: np.ndarray, k: int, seed: int
               ) -> tuple[np.ndarray, KMeans, np.ndarray, int]:
    """The fold (0..k-1) of every image: ``FOLD_CLUSTERS * k`` k-means clusters ordered by
    distance from a seeded anchor on the edge of the data (as :func:`carve_shifted` picks one)
    and cut into ``k`` runs of about equal image counts, so each fold is a band of neighbouring
    clusters; a group (duplicates, a patient) goes with its first image. Also the fitted
    clusters, each cluster's fold and the anchor cluster. Deterministic for the same features
    and seed."""
    n_clusters = FOLD_CLUSTERS * k
    if len(features) < 2 * n_clusters:
        raise DataError(f"cannot cut {k} shift folds from {len(features)} images: need at "
                        f"least {2 * n_clusters} for {n_clusters} clusters")
    clusters = KMeans(n_clusters, n_init=10, random_state=seed).fit(features)
    centres = clusters.cluster_centers_
    radius = np.linalg.norm(centres, axis=1)
    outer = np.flatnonzero(radius >= np.median(radius))
    anchor = int(np.random.default_rng(seed).permutation(outer)[0])
    order = np.argsort(np.linalg.norm(centres - centres[anchor], axis=1), kind="stable")
    sizes = np.bincount(clusters.labels_, minlength=n_clusters)[order]
    # A cluster joins the fold its middle image falls in.
    middle = np.cumsum(sizes) - sizes / 2
    fold_of_cluster = np.empty(n_clusters, int)
    fold_of_cluster[order] = np.minimum((middle / sizes.sum() * k).astype(int), k - 1)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    return fold_of_cluster[clusters.labels_][first][inverse], clusters, fold_of_cluster, anchor


def fold_mask(features: np.ndarray, labels: np.ndarray, groups: np.ndarray,
              fold: tuple[int, int], seed: int, blocked: np.ndarray | None = None
              ) -> tuple[np.ndarray, dict]:
    """Fold ``i`` of ``k`` image-statistics folds (``fold = (i, k)``, :func:`fold_bands`) as
    the images to hold out as ``test_shifted``, and a description. The same features and seed
    give the same folds, so preparing once per fold holds every training image out exactly
    once (but ``blocked`` ones: copies in a given split never move)."""
    check_fold(fold)
    i, k = fold
    blocked = np.zeros(len(labels), bool) if blocked is None else blocked
    folds, clusters, fold_of_cluster, anchor = fold_bands(features, groups, k, seed)
    free = ~np.isin(groups, np.unique(groups[blocked]))
    mask = (folds == i - 1) & free
    missing = [str(c) for c in np.unique(labels) if not (labels[mask] == c).any()]
    if missing:
        raise DataError(f"shift fold {i}/{k} holds no images of class(es) {missing}: fewer "
                        f"folds, or another seed")
    chosen = np.flatnonzero(fold_of_cluster == i - 1)
    return mask, {**describe(features, mask, chosen, clusters.labels_, FOLD_CLUSTERS * k, seed,
                             anchor),
                  "method": "kmeans on image statistics, one fold of whole clusters",
                  "fold": i, "folds": k,
                  "fold_sizes": np.bincount(folds[free], minlength=k).astype(int).tolist()}


def describe(features: np.ndarray, mask: np.ndarray, chosen: np.ndarray, assigned: np.ndarray,
             k: int, seed: int, anchor: int) -> dict:
    """How the held-out images differ: per feature, the difference of means in standard
    deviations (held out minus kept), for the manifest and the data report."""
    shift = features[mask].mean(axis=0) - features[~mask].mean(axis=0)
    return {"method": "kmeans on image statistics, whole clusters held out",
            "features": FEATURE_NAMES, "n_clusters": k, "seed": seed, "anchor": int(anchor),
            "held_out_clusters": sorted(int(c) for c in chosen),
            "n": int(mask.sum()),
            "cluster_sizes": np.bincount(assigned, minlength=k).astype(int).tolist(),
            "mean_shift_sd": {name: round(float(v), 3)
                              for name, v in zip(FEATURE_NAMES, shift, strict=True)}}


def statistics_of(images: np.ndarray, rows: np.ndarray, chunk: int
                  ) -> tuple[np.ndarray, np.ndarray]:
    """:func:`image_statistics` of ``images[rows]`` read ``chunk`` rows at a time, so a large
    memory-mapped pool never has to fit in memory."""
    parts = [image_statistics(np.asarray(images[rows[i:i + chunk]]))
             for i in range(0, len(rows), chunk)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


VAL_CLUSTERS = 4  # image-statistics clusters of val for the worst_group threshold rule
GROUP_SEED = 0  # fixed: train, evaluate and compare must all find the same groups
GROUP_CHUNK = 256


def val_groups(images: np.ndarray, sites: np.ndarray | None = None, seed: int = GROUP_SEED,
               k: int = VAL_CLUSTERS) -> np.ndarray:
    """The group of each validation image for the ``worst_group`` threshold rule
    (:func:`lungxray.metrics.choose_threshold`): which of ``k`` seeded k-means clusters of
    its image statistics (:func:`shift_features`, fitted on these images) it falls in,
    ``c0``..; with ``sites`` naming more than one site, its site too (``nih/c2``).

    Validation is where choices are made, so clustering it is allowed; a test split is never
    grouped. Deterministic for the same images, so every step finds the same groups."""
    n = len(images)
    k = min(k, n)
    if k < 2:
        clusters = np.zeros(n, int)
    else:
        stats, thumbnails = statistics_of(images, np.arange(n), GROUP_CHUNK)
        clusters = KMeans(k, n_init=10, random_state=seed).fit_predict(
            shift_features(stats, thumbnails, seed))
    names = np.array([f"c{c}" for c in clusters], dtype=object)
    if sites is not None and len(set(np.asarray(sites).tolist())) > 1:
        names = np.array([f"{site}/{name}" for site, name in zip(sites, names, strict=True)],
                         dtype=object)
    return names
