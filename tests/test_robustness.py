"""The corruption suite: deterministic, bounded, each corruption really changes the image and
more so at a higher severity; the AUC summary from a known table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from lungxray import robustness
from lungxray.errors import ConfigError, DataError


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    # A smooth "chest" (bright ellipse on dark) so blur, crops and rotations have edges to move.
    yy, xx = np.mgrid[:28, :28]
    base = 40 + 160 * (((yy - 14) / 11) ** 2 + ((xx - 14) / 8) ** 2 < 1)
    rng = np.random.default_rng(0)
    stack = np.clip(base[None] + rng.normal(0, 10, (6, 28, 28)), 0, 255)
    return stack.astype(np.uint8)[..., None]


@pytest.mark.parametrize("name", robustness.CORRUPTIONS)
def test_each_corruption_is_deterministic_and_grows_with_severity(images, name):
    outs = [robustness.corrupt(images, name, s, seed=3) for s in robustness.SEVERITIES]
    for out in outs:
        assert out.shape == images.shape and out.dtype == np.uint8
    np.testing.assert_array_equal(outs[0], robustness.corrupt(images, name, 1, seed=3))
    change = [np.abs(o.astype(float) - images).mean() for o in outs]
    assert change[0] > 0.5  # every corruption moves the pixels
    if name != "invert":  # invert has no severity
        assert change[0] < change[-1]


def test_three_channels_and_other_sizes_work(images):
    rgb = np.repeat(np.kron(images, np.ones((1, 4, 4, 1), dtype=np.uint8)), 3, axis=-1)
    for name in robustness.CORRUPTIONS:
        out = robustness.corrupt(rgb, name, 2)
        assert out.shape == rgb.shape
    framed = robustness.corrupt(rgb, "zoom_out", 3)
    assert framed[:, :5].max() == 0 and framed[:, -5:].max() == 0  # the black frame


def test_noise_depends_on_the_seed(images):
    a, b = (robustness.corrupt(images, "gaussian_noise", 2, seed=s) for s in (0, 1))
    assert not np.array_equal(a, b)


def test_bad_requests_are_one_line_errors(images):
    with pytest.raises(ConfigError, match="unknown corruption"):
        robustness.corrupt(images, "fog", 1)
    with pytest.raises(ConfigError, match="severity"):
        robustness.corrupt(images, "blur", 4)
    with pytest.raises(DataError, match="uint8"):
        robustness.corrupt(images.astype(float), "blur", 1)


def test_tta_views_keep_shape_and_never_flip(images):
    views = robustness.tta_views(images)
    assert len(views) == len(robustness.TTA_VIEWS)
    assert all(v.shape == images.shape for v in views)
    flipped = images[:, :, ::-1]
    assert not any(np.array_equal(v, flipped) for v in views[1:])


def test_predictions_are_chunked_and_summarised(images):
    labels = np.array([0, 1, 0, 1, 0, 1])
    seen = []

    def predict(batch: np.ndarray) -> np.ndarray:
        seen.append(len(batch))
        # A "model" that reads mean brightness: positives get +30 below, so clean AUC is 1
        # and darkening/brightening images at random breaks it.
        score = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
        return np.stack([1 - score, score], axis=1)

    shifted = images.copy()
    shifted[labels == 1] = np.clip(shifted[labels == 1].astype(int) + 30, 0, 255)
    summary, table = robustness.evaluate_robustness(predict, shifted, labels,
                                                    ["normal", "pneumonia"], samples=0,
                                                    chunk=4)
    assert max(seen) == 4  # never more than a chunk at once
    assert len(table) == 6 * (1 + len(robustness.CORRUPTIONS) * 3)
    assert summary["clean_auc"] == 1.0
    assert summary["auc"]["invert"]["1"] == 0.0  # the ranking reverses
    assert summary["auc"]["brightness"]["3"] < 1.0
    counted = [v for c, lv in summary["auc"].items() if c != "invert" for v in lv.values()]
    assert summary["mean_corrupted_auc"] == pytest.approx(np.mean(counted))
    assert summary["worst_corrupted_auc"] == min(counted)
    assert summary["drop"] == pytest.approx(1.0 - summary["mean_corrupted_auc"])
    # The same table averaged with itself (an ensemble of twins) summarises the same.
    again = robustness.summarize(pd.concat([table]), ["normal", "pneumonia"])
    assert again["mean_corrupted_auc"] == summary["mean_corrupted_auc"]


def test_subset_is_stratified_and_seeded():
    labels = np.r_[np.zeros(300, int), np.ones(700, int)]
    rows = robustness.sample_rows(labels, 100, seed=1)
    assert len(rows) == 100 and labels[rows].sum() == 70
    np.testing.assert_array_equal(rows, robustness.sample_rows(labels, 100, seed=1))
    assert len(robustness.sample_rows(labels, 0)) == 1000
