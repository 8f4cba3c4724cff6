"""The train component called directly with real artifact objects (SmallCNN, one epoch)."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import Artifact, Dataset, Metrics, Model

from lungxray import artifacts


def test_train_reads_the_tuned_hparams_and_keeps_its_state_on_the_pvc(small_dataset, tmp_path):
    from components.train import train

    tuning = Artifact(name="tuning", uri=str(tmp_path / "tuning"))
    Path(tuning.path).mkdir()
    (Path(tuning.path) / artifacts.BEST_HPARAMS_FILE).write_text(json.dumps(
        {"model_name": "SmallCNN", "hparams": {"learning_rate": 2e-3, "augment": 0.0}}))
    dataset = Dataset(name="dataset", uri=str(small_dataset))
    model = Model(name="model", uri=str(tmp_path / "model"))
    metrics = Metrics(name="metrics", uri=str(tmp_path / "metrics"))
    settings = {"model_name": "SmallCNN", "epochs": 1, "weights": "none", "batch_size": 64,
                "seed": 0}
    train(dataset=dataset, tuning=tuning, **settings, model=model, metrics=metrics,
          target_sensitivity=0.9, threshold_rule="platt", state_root=str(tmp_path / "pvc"))
    folder = Path(model.path)
    info = json.loads((folder / artifacts.INFO_FILE).read_text())
    assert (folder / artifacts.MODEL_FILE).is_file() and info["model_name"] == "SmallCNN"
    assert info["hparams"]["learning_rate"] == 2e-3  # the tuned value, not the default
    assert info["threshold_method"] == "sensitivity>=0.9"  # a target wins over the rule
    assert model.metadata == {**{k: info[k] for k in ("model_name", "threshold", "params",
                                                      "weights")}, "framework": "keras"}
    assert metrics.metadata == {k: info[k] for k in ("train_seconds", "params", "epochs")}
    # Checkpoints lived on the "PVC", not in the uploaded model, and went once it was complete.
    assert (tmp_path / "pvc" / "train").is_dir() and not any((tmp_path / "pvc" / "train").iterdir())
    assert not (folder / ".state").exists()
