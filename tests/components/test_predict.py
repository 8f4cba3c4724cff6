"""The predict component: called directly with real artifacts, and built for an image."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import Artifact, Metrics, Model
from PIL import Image

import components
from components.predict import predict
from lungxray import predict as prediction
from lungxray.errors import ConfigError, DataError
from tests.data_helpers import real_images
from tests.test_predict import tiny_model_dir


def test_predict_component_writes_predictions_and_counts(shared_npz, tmp_path):
    model_dir = tiny_model_dir(tmp_path / "model")
    images = tmp_path / "incoming"
    images.mkdir()
    for i, pixels in enumerate(real_images(shared_npz, per_class=3)[0]):
        Image.fromarray(pixels).resize((48, 40)).save(images / f"x{i}.png")
    (images / "broken.png").write_bytes(b"not an image")
    model = Model(name="model", uri=str(model_dir))
    out = Artifact(name="predictions", uri=str(tmp_path / "predictions"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    with pytest.raises(DataError, match="broken.png"):
        predict(model=model, source=str(images), predictions=out, metrics=metrics)
    predict(model=model, source=str(images), predictions=out, metrics=metrics, skip_bad=True,
            batch_size=4)
    table = prediction.read_predictions(Path(out.path) / prediction.PREDICTIONS_FILE)
    assert len(table) == 6 and out.metadata["n"] == 6 and out.metadata["n_bad"] == 1
    assert metrics.metadata["n_unreadable"] == 1
    assert metrics.metadata["n_normal"] + metrics.metadata["n_pneumonia"] == 6
    assert np.isclose(table[["prob_normal", "prob_pneumonia"]].sum(axis=1), 1.0).all()
    assert out.metadata["site"] is None  # the pooled threshold
    # A model of one site has no site thresholds: asking for one is refused, nothing written.
    refused = Artifact(name="predictions", uri=str(tmp_path / "refused"))
    with pytest.raises(ConfigError, match="^--site 'nih': the model has no threshold of its own"):
        predict(model=model, source=str(images), predictions=refused, metrics=metrics,
                skip_bad=True, site="nih")
    assert not Path(refused.path).exists()


def test_without_a_source_the_step_only_says_so(tmp_path):
    out = Artifact(name="predictions", uri=str(tmp_path / "predictions"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    predict(model=Model(name="model", uri=str(tmp_path / "no-model")), source="",
            predictions=out, metrics=metrics)
    assert out.metadata == {"skipped": "no source given"}
    assert metrics.metadata == {"n_predicted": 0}
    assert not Path(out.path).exists()


def test_predict_component_builds_for_an_image():
    op = components.build("registry.example/lungxray:abc").predict
    spec = op.component_spec
    assert spec.implementation.container.image == "registry.example/lungxray:abc"
    assert set(spec.inputs) == {"model", "source", "batch_size", "skip_bad", "gradcam", "site"}
    assert set(spec.outputs) == {"predictions", "metrics"}
