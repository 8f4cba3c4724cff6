"""Fixtures of the component tests: two trials evaluated once per session, shared by the
evaluate and compare tests."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from kfp.dsl import Dataset, Model
from PIL import Image

from tests.component_helpers import run_evaluate
from tests.data_helpers import load_npz


@pytest.fixture(scope="session")
def external_site(tmp_path_factory, shared_npz):
    """Another site's labelled folder: 10 NORMAL and 10 PNEUMONIA real images as PNGs."""
    root = tmp_path_factory.mktemp("site2")
    val = load_npz(shared_npz)["val"]
    for label, folder in ((0, "NORMAL"), (1, "PNEUMONIA")):
        (root / folder).mkdir()
        for i in np.flatnonzero(val.labels == label)[:10]:
            Image.fromarray(val.images[i, ..., 0]).save(root / folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def evaluated_trials(tmp_path_factory, trained_model, small_dataset, external_site):
    """[(model, evaluate's outputs)] of two trials of one network (NetA, NetB), as two base
    models would be, each evaluated with the external site, a class map and a deployment
    prevalence."""
    tmp = tmp_path_factory.mktemp("trials")
    dataset = Dataset(name="dataset", uri=str(small_dataset))
    trials = []
    for name in ("NetA", "NetB"):
        model_dir = tmp / name
        shutil.copytree(trained_model, model_dir)
        info = json.loads((model_dir / "model_info.json").read_text())
        (model_dir / "model_info.json").write_text(json.dumps({**info, "model_name": name}))
        model = Model(name=name, uri=str(model_dir))
        out = run_evaluate(model, dataset, tmp, name, external_data=str(external_site),
                           class_map="NORMAL=normal,PNEUMONIA=pneumonia",
                           robustness_samples=40, deployment_prevalence=0.2)
        trials.append((model, out))
    return trials
