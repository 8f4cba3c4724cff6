"""README.md stays true to the code: the model counts come from the registry and the diagram
names every step of the compiled pipeline."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from lungxray import backbones
from pipelines.compile import compile_pipeline

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_model_counts_are_the_registrys():
    keras_names = [name for name, spec in backbones.REGISTRY.items() if not spec.scratch_only]
    shown = int(re.search(r"InceptionV3\s+and (\d+) more\)", README).group(1))
    assert shown == len(keras_names) - 3  # three are named before "more"
    listed, keras = re.search(r"`lungxray models` lists all (\d+): (\d+) Keras", README).groups()
    assert (int(listed), int(keras)) == (len(backbones.REGISTRY), len(keras_names))


def test_the_diagram_names_every_step(tmp_path):
    spec = next(yaml.safe_load_all(compile_pipeline(tmp_path / "p.yaml", "lungxray:test")
                                   .read_text()))
    dags = [spec["root"], *spec["components"].values()]
    # each step by the name the Kubeflow UI shows: its display name, else its task name
    shown = {task["componentRef"]["name"]: task["taskInfo"]["name"]
             for dag in dags for task in dag.get("dag", {}).get("tasks", {}).values()
             if "executorLabel" in spec["components"][task["componentRef"]["name"]]}
    # preprocess tune train crossfold evaluate compare refit challenge promote predict
    assert len(shown) == 10
    diagram = README.split("```", 2)[1]
    missing = [name for name in shown.values() if not re.search(rf"\b{name}\b", diagram)]
    assert missing == []
