"""The compiled pipeline: DAG shape, fan-in, GPU requests, retries, image."""

from __future__ import annotations

import yaml

from pipelines.compile import compile_pipeline
from pipelines.pipeline import CACHE_MOUNT, DEFAULT_MODELS, SECRET_MOUNT
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
        # The count is the `gpus` pipeline parameter (default 1).
        assert accelerator["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
        assert "retryPolicy" in inner[name.removeprefix("exec-")]
    for name in ("exec-preprocess", "exec-evaluate", "exec-compare"):
        assert "resources" not in executors[name]["container"]

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-tune", "exec-train"):
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in k8s[name]["tolerations"]

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["base_models"]["defaultValue"] == DEFAULT_MODELS
    assert params["gpus"]["defaultValue"] == 1
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


def test_platform_settings_for_a_managed_cluster(tmp_path):
    spec, platform = load(compile_pipeline(
        tmp_path / "p.yaml", IMAGE, gpu_node_selector=("cloud.google.com/gke-accelerator",
                                                       "nvidia-l4"),
        gcs_secret="gcs-key", cache_pvc="lungxray-cache"))
    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-tune", "exec-train"):
        assert k8s[name]["nodeSelector"]["labels"] == {
            "cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert k8s[name]["pvcMount"][0]["mountPath"] == CACHE_MOUNT
    for name in ("exec-preprocess", "exec-evaluate", "exec-compare", "exec-train"):
        assert k8s[name]["secretAsVolume"][0]["secretName"] == "gcs-key"
        env = spec["deploymentSpec"]["executors"][name]["container"]["env"]
        assert {"name": "GOOGLE_APPLICATION_CREDENTIALS",
                "value": f"{SECRET_MOUNT}/key.json"} in env
    assert "pvcMount" not in k8s.get("exec-evaluate", {})
    # train gets the mounted state root, so a retried (preempted) run resumes.
    train_inputs = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]["train"]["inputs"]
    assert train_inputs["parameters"]["state_root"]["runtimeValue"]["constant"] == CACHE_MOUNT
