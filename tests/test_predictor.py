"""The predictor: members' probabilities averaged, a memory-mapped split predicted a chunk at a
time as float32 after one untimed warm-up batch, the time given per image. Stand-in members
(anything with Keras's ``predict``) keep this free of Keras; real models: test_predict.py."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import predictor


class Member:
    """P(class 1) = scale x the image's mean pixel / 255; records the batches it was given."""

    def __init__(self, scale: float):
        self.scale, self.calls = scale, []

    def predict(self, x, batch_size, verbose):
        assert x.dtype == np.float32 and batch_size == predictor.PREDICT_BATCH and verbose == 0
        self.calls.append(len(x))
        p = self.scale * x.reshape(len(x), -1).mean(axis=1) / 255.0
        return np.column_stack([1 - p, p]).astype(np.float32)


@pytest.fixture
def images(tmp_path) -> np.ndarray:
    array = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype=np.uint8,
                                      shape=(10, 4, 4, 1))
    array[:] = np.arange(10, dtype=np.uint8)[:, None, None, None] * 25
    return array


def test_an_ensemble_averages_its_members_chunk_by_chunk(images, monkeypatch):
    monkeypatch.setattr(predictor, "PREDICT_CHUNK", 4)
    members = [Member(1.0), Member(0.5)]
    model = predictor.Predictor({"ensemble": True}, members)
    probs, ms = model.predict(images)
    expected = 0.75 * np.arange(10) * 25 / 255.0
    np.testing.assert_allclose(probs[:, 1], expected, rtol=1e-6)
    assert probs.dtype == np.float64 and ms >= 0
    # One warm-up batch (the first PREDICT_BATCH images), then chunks of 4, 4 and 2.
    assert members[0].calls == members[1].calls == [10, 4, 4, 2]
    np.testing.assert_allclose(model.probabilities(images[:3]), probs[:3], rtol=1e-6)
    assert model.is_ensemble


def test_one_model_is_not_an_ensemble_and_gives_its_own_probabilities(images):
    member = Member(1.0)
    single = predictor.Predictor({"model_name": "VGG16"}, [member])
    assert not single.is_ensemble
    probs, _ = single.predict(images)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(probs[:, 1], np.arange(10) * 25 / 255.0, rtol=1e-6)
    assert member.calls == [10, 10]  # warm-up, then the one chunk
