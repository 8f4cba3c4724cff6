"""The compiled pipeline: DAG shape, fan-in, GPU requests, retries, image."""

from __future__ import annotations

import yaml

from pipelines.compile import compile_pipeline
from pipelines.pipeline import DEFAULT_MODELS
from pipelines.profiles import PROFILES, pipeline_defaults, resolve_params

IMAGE = "registry.example/lungxray:0123456789ab"


def load(path):
    """The pipeline spec (first document) and the Kubernetes platform spec, if any."""
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else None)


def test_cluster_pipeline_shape(tmp_path):
    spec, platform = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=True))
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"preprocess", "for-loop-1", "compare"}
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--base_models"
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"tune", "train", "evaluate"}
    assert inner["train"]["dependentTasks"] == ["tune"]
    assert inner["evaluate"]["dependentTasks"] == ["train"]
    # compare fans in over every iteration's outputs (dsl.Collected).
    compare_inputs = spec["components"]["comp-compare"]["inputDefinitions"]["artifacts"]
    for name in ("models", "evaluations", "tunings"):
        assert compare_inputs[name]["isArtifactList"] is True
    assert root["compare"]["dependentTasks"] == ["for-loop-1"]

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    for name in ("exec-tune", "exec-train"):
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == "1"
        assert "retryPolicy" in inner[name.removeprefix("exec-")]
    for name in ("exec-preprocess", "exec-evaluate", "exec-compare"):
        assert "resources" not in executors[name]["container"]

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-tune", "exec-train"):
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in k8s[name]["tolerations"]

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["base_models"]["defaultValue"] == DEFAULT_MODELS
    assert set(params) == set(pipeline_defaults())


def test_local_pipeline_has_no_gpu_request(tmp_path):
    spec, platform = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=False,
                                           parallelism=1))
    assert platform is None
    executors = spec["deploymentSpec"]["executors"]
    assert all("resources" not in e["container"] for e in executors.values())
    tasks = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert "retryPolicy" in tasks["train"]  # retries stay: CPU clusters preempt too
    assert spec["root"]["dag"]["tasks"]["for-loop-1"]["iteratorPolicy"]["parallelismLimit"] == 1


def test_profiles_only_use_real_parameters():
    defaults = pipeline_defaults()
    for name, profile in PROFILES.items():
        assert set(profile) <= set(defaults), name
        assert resolve_params(name)["base_models"] == DEFAULT_MODELS
