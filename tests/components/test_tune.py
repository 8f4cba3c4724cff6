"""The tune component called directly with real artifact objects."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import HTML, Artifact, Dataset, Metrics

from components.tune import tune
from lungxray import models
from lungxray import tune as tuning_lib


def outputs(tmp_path: Path, name: str) -> dict:
    return {"tuning": Artifact(name="tuning", uri=str(tmp_path / name / "tuning")),
            "metrics": Metrics(name="metrics", uri=str(tmp_path / name / "metrics")),
            "summary": HTML(name="summary", uri=str(tmp_path / name / "summary"))}


def test_tune_component_logs_metrics_and_summary_and_resumes_from_state_root(
        small_dataset, tmp_path):
    weights = tmp_path / "vgg16.weights.h5"
    models.build_backbone(models.get_spec("VGG16"), 32, None).save_weights(weights)
    dataset = Dataset(name="dataset", uri=str(small_dataset))
    settings = {"model_name": "VGG16", "max_trials": 2, "epochs": 1,
                "weights": str(weights), "batch_size": 32, "seed": 1, "train_samples": 0,
                "algorithm": "random", "fine_tune_trials": 1}
    state_root = tmp_path / "pvc"

    first = outputs(tmp_path, "first")
    tune(dataset=dataset, **settings, **first, state_root=str(state_root))
    tuning = Path(first["tuning"].path)
    best = json.loads((tuning / tuning_lib.BEST_FILE).read_text())
    metrics = first["metrics"].metadata
    assert metrics["tune_best_val_auc"] == best["best_score"]
    assert metrics["tune_trials"] == 3 == best["trials"]
    assert metrics["tune_seconds"] == best["search_seconds"]
    assert first["tuning"].metadata["algorithm"] == "random"
    assert first["tuning"].metadata["unfreeze"] == best["hparams"]["unfreeze"]
    page = Path(first["summary"].path).read_text()
    assert page == (tuning / tuning_lib.SUMMARY_FILE).read_text()
    assert "data:image/png;base64," in page
    # State and features live on the "PVC", not in the uploaded artifact.
    assert not (tuning / tuning_lib.STATE_DIR).exists() and not (tuning / "features").exists()
    assert len(list((state_root / "features").glob("*.npy"))) == 2
    (state,) = (state_root / "tune").iterdir()
    times = json.loads((state / "tuner" / "head" / tuning_lib.TIMES_FILE).read_text())

    # A retried pod (fresh artifact paths, same inputs) finds and resumes its finished search.
    second = outputs(tmp_path, "second")
    tune(dataset=dataset, **settings, **second, state_root=str(state_root))
    again = json.loads((Path(second["tuning"].path) / tuning_lib.BEST_FILE).read_text())
    assert again["hparams"] == best["hparams"]
    assert not again["feature_cache"]["train"]["computed"]
    assert json.loads((state / "tuner" / "head" / tuning_lib.TIMES_FILE).read_text()) == times
    assert list((state_root / "tune").iterdir()) == [state]


def test_tune_component_without_state_root_keeps_state_in_the_artifact(small_dataset, tmp_path):
    out = outputs(tmp_path, "run")
    tune(dataset=Dataset(name="dataset", uri=str(small_dataset)), model_name="VGG16",
         max_trials=1, epochs=1, weights="none", batch_size=32, seed=1, train_samples=0, **out)
    tuning = Path(out["tuning"].path)
    assert json.loads((tuning / tuning_lib.BEST_FILE).read_text())["trials"] == 1
    assert (tuning / tuning_lib.STATE_DIR / tuning_lib.CONFIG_FILE).is_file()
    assert not list(tuning.rglob("*.npy")) and not list(tuning.rglob("checkpoint*"))
    assert out["metrics"].metadata["tune_trials"] == 1
