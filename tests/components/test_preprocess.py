"""Each component's python function called directly with real artifact objects."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model

import components
from components.compare import compare
from components.evaluate import evaluate
from components.preprocess import preprocess


def artifact(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / name))


def test_preprocess_component_writes_dataset_and_summary(shared_npz, tmp_path):
    dataset, summary = artifact(Dataset, tmp_path, "dataset"), artifact(Markdown, tmp_path, "md")
    report = artifact(HTML, tmp_path, "report")
    preprocess(source=str(shared_npz), image_size=0, seed=1, max_per_split=60,
               data_version="v1", dataset=dataset, summary=summary, report=report)
    assert "data:image/png;base64," in Path(report.path).read_text()
    manifest = json.loads((Path(dataset.path) / "manifest.json").read_text())
    assert manifest["image_size"] == 28  # 0 keeps the source's size
    assert dataset.metadata["n_test"] == 60 and dataset.metadata["image_size"] == 28
    assert "| test (carved from train) | 60 |" in Path(summary.path).read_text()


def test_preprocess_component_takes_sites_and_a_held_out_site(shared_npz, shared_nih, tmp_path):
    dataset, summary = artifact(Dataset, tmp_path, "dataset"), artifact(Markdown, tmp_path, "md")
    preprocess(source=str(shared_npz), image_size=32, seed=1, max_per_split=60,
               data_version="v1", dataset=dataset, summary=summary,
               report=artifact(HTML, tmp_path, "report"), sites=f"nih={shared_nih}",
               holdout_site="nih")
    assert dataset.metadata["sites"] == ["pneumoniamnist", "nih"]
    assert dataset.metadata["holdout_site"] == "nih" and dataset.metadata["n_test_site_nih"] == 60
    assert "| nih | test_site_nih | 60 |" in Path(summary.path).read_text()


def test_evaluate_and_compare_components(trained_model, small_dataset, tmp_path):
    dataset = Dataset(name="dataset", uri=str(small_dataset))
    model = Model(name="model", uri=str(trained_model))
    evaluation = artifact(Artifact, tmp_path, "evaluation")
    metrics = artifact(Metrics, tmp_path, "metrics")
    classification = artifact(ClassificationMetrics, tmp_path, "classification")
    evaluate(dataset=dataset, model=model, evaluation=evaluation, metrics=metrics,
             test_classification=classification, summary=artifact(Markdown, tmp_path, "md"),
             report=artifact(HTML, tmp_path, "eval_html"), robustness_samples=40)
    expected = json.loads((Path(evaluation.path) / "test" / "metrics.json").read_text())
    assert metrics.metadata["test_roc_auc"] == expected["roc_auc"]
    assert set(metrics.metadata) >= {"val_accuracy", "val_roc_auc", "test_accuracy"}
    matrix = classification.metadata["confusionMatrix"]
    assert [row["row"] for row in matrix["rows"]] == expected["confusion_matrix"]
    assert len(classification.metadata["confidenceMetrics"]) > 2

    tuning = artifact(Artifact, tmp_path, "tuning")
    Path(tuning.path).mkdir()
    (Path(tuning.path) / "best_hparams.json").write_text(
        json.dumps({"model_name": "VGG16", "hparams": {"learning_rate": 1e-4}}))
    report, best = artifact(HTML, tmp_path, "report"), artifact(Model, tmp_path, "best")
    summary, scores = artifact(Markdown, tmp_path, "summary"), artifact(Metrics, tmp_path, "m2")
    compare(models=[model], evaluations=[evaluation], tunings=[tuning],
            select_metric="val_roc_auc", report=report, summary=summary, best_model=best,
            metrics=scores, model_card=artifact(Markdown, tmp_path, "card"))
    assert "VGG16" in Path(report.path).read_text()
    assert (Path(best.path) / "model.keras").is_file()
    assert best.metadata["model_name"] == "VGG16"
    val = json.loads((Path(evaluation.path) / "val" / "metrics.json").read_text())
    assert scores.metadata["best_val_roc_auc"] == val["roc_auc"]
    shutil.rmtree(best.path)


def test_components_build_for_an_explicit_image():
    ops = components.build("registry.example/lungxray:abc123")
    for name in components.FUNCTIONS:
        spec = getattr(ops, name).component_spec
        container = spec.implementation.container
        assert container.image == "registry.example/lungxray:abc123"
        assert "pip install" not in " ".join(container.command)  # nothing installed at run time
