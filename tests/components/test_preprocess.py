"""The preprocess component called directly with real artifact objects."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import HTML, Dataset, Markdown

from components.preprocess import preprocess
from tests.component_helpers import artifact


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
