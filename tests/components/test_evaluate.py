"""evaluate and compare components: external data with a class map, HTML and Markdown
artifacts, the model card, and the same metric names for every trial."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model
from PIL import Image

from components.compare import compare
from components.evaluate import evaluate
from tests.data_helpers import load_npz


def artifact(cls, tmp_path: Path, name: str):
    return cls(name=name, uri=str(tmp_path / name))


def run_evaluate(model: Model, dataset: Dataset, tmp_path: Path, tag: str, **params) -> dict:
    outputs = {
        "evaluation": artifact(Artifact, tmp_path, f"{tag}_evaluation"),
        "metrics": artifact(Metrics, tmp_path, f"{tag}_metrics"),
        "test_classification": artifact(ClassificationMetrics, tmp_path, f"{tag}_cls"),
        "summary": artifact(Markdown, tmp_path, f"{tag}_md"),
        "report": artifact(HTML, tmp_path, f"{tag}_html"),
    }
    evaluate(dataset=dataset, model=model, **outputs, **params)
    return outputs


def test_external_data_is_one_more_split_with_the_same_names(trained_model, small_dataset,
                                                             shared_npz, tmp_path):
    val = load_npz(shared_npz)["val"]
    for label, folder in ((0, "NORMAL"), (1, "PNEUMONIA")):
        (tmp_path / "site2" / folder).mkdir(parents=True)
        for i in np.flatnonzero(val.labels == label)[:10]:
            Image.fromarray(val.images[i, ..., 0]).save(tmp_path / "site2" / folder / f"{i}.png")
    dataset = Dataset(name="dataset", uri=str(small_dataset))
    trials = []
    for name in ("NetA", "NetB"):  # two trials of one network, as two base models would be
        model_dir = tmp_path / name
        shutil.copytree(trained_model, model_dir)
        info = json.loads((model_dir / "model_info.json").read_text())
        (model_dir / "model_info.json").write_text(json.dumps({**info, "model_name": name}))
        model = Model(name=name, uri=str(model_dir))
        out = run_evaluate(model, dataset, tmp_path, name, external_data=str(tmp_path / "site2"),
                           class_map="NORMAL=normal,PNEUMONIA=pneumonia",
                           robustness_samples=40, deployment_prevalence=0.2)
        trials.append((model, out))
    names = [set(out["metrics"].metadata) for _, out in trials]
    assert names[0] == names[1]  # every trial logs the same metric names
    assert {"val_roc_auc", "test_roc_auc", "external_roc_auc", "external_sensitivity",
            "test_latency_ms", "test_roc_auc_ci_lo", "val_robust_auc",
            "external_robust_auc_drop", "external_deploy_ppv", "external_prevalence_em",
            "external_prevalence_em_ci_hi"} <= names[0]
    ext = json.loads((Path(trials[0][1]["evaluation"].path) / "external" / "metrics.json")
                     .read_text())
    assert ext["n"] == 20 and ext["class_map"] == {"NORMAL": "normal", "PNEUMONIA": "pneumonia"}
    assert trials[0][1]["metrics"].metadata["external_roc_auc"] == ext["roc_auc"]
    page = Path(trials[0][1]["report"].path).read_text()
    # val, test, external: confusion, ROC, PR, reliability, robustness, Grad-CAM each
    assert page.count("data:image/png;base64,") == 3 * 6
    # The external set's prevalence, estimated without its labels, sits beside the truth.
    assert ext["prevalence_estimate"]["true_prevalence"] == 0.5
    assert ext["robustness"]["n"] == 20 and ext["operating_point"]["deployment_prevalence"] == 0.2
    assert "| PR AUC (AP) |" in Path(trials[0][1]["summary"].path).read_text()

    report, summary = artifact(HTML, tmp_path, "report"), artifact(Markdown, tmp_path, "summary")
    card, best = artifact(Markdown, tmp_path, "card"), artifact(Model, tmp_path, "best")
    scores = artifact(Metrics, tmp_path, "scores")
    compare(models=[m for m, _ in trials], evaluations=[o["evaluation"] for _, o in trials],
            tunings=[], select_metric="val_roc_auc", report=report, summary=summary,
            model_card=card, best_model=best, metrics=scores, ensemble_k=2)
    page = Path(report.path).read_text()
    assert "external (n=20" in page and "Ensemble-top2" in page
    assert Path(summary.path).read_text().startswith("# lungxray model comparison")
    assert "Not a medical device" in Path(card.path).read_text()
    assert "Evaluated on data from elsewhere: external" in Path(card.path).read_text()
    assert "## Robustness to acquisition shift" in Path(card.path).read_text()
    assert "| external | " in Path(card.path).read_text()  # in the prevalence table
    # Identical members tie the ensemble; the single model wins the tie (simpler).
    assert best.metadata["model_name"] == "NetA" and best.metadata["ensemble"] is False
    assert (Path(best.path) / "model.keras").is_file()
    assert scores.metadata["n_models"] == 3
