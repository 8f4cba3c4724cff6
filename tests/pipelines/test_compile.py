"""The compiled pipeline: DAG shape, fan-in, GPU requests, retries, image."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines.compile import RESOURCES, compile_pipeline, main, parse_resources
from pipelines.params import load_params, read_pipeline_spec, validate_params
from pipelines.pipeline import CACHE_MOUNT, DEFAULT_MODELS, SECRET_MOUNT, Resources
from pipelines.profiles import PROFILES, pipeline_defaults, resolve_params

IMAGE = "registry.example/lungxray:0123456789ab"
REPO = Path(__file__).resolve().parents[2]


def load(path):
    """The pipeline spec (first document) and the Kubernetes platform spec, if any."""
    documents = list(yaml.safe_load_all(path.read_text()))
    return documents[0], (documents[1] if len(documents) > 1 else None)


def test_cluster_pipeline_shape(tmp_path):
    spec, platform = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=True))
    root = spec["root"]["dag"]["tasks"]
    assert set(root) == {"preprocess", "for-loop-1", "compare", "refit", "challenge",
                         "condition-2", "predict"}
    loop = root["for-loop-1"]
    assert loop["parameterIterator"]["items"]["inputParameter"] == "pipelinechannel--base_models"
    inner = spec["components"][loop["componentRef"]["name"]]["dag"]["tasks"]
    assert set(inner) == {"tune", "train", "crossfold", "evaluate"}
    assert inner["train"]["dependentTasks"] == ["tune"]
    # The recipe on the shift folds, then evaluate adds their split to the evaluation.
    assert inner["crossfold"]["dependentTasks"] == ["train"]
    assert sorted(inner["evaluate"]["dependentTasks"]) == ["crossfold", "train"]
    assert (inner["crossfold"]["inputs"]["parameters"]["shift_folds"]["componentInputParameter"]
            == "pipelinechannel--shift_folds")
    # compare fans in over every iteration's outputs (dsl.Collected).
    compare_inputs = spec["components"]["comp-compare"]["inputDefinitions"]["artifacts"]
    for name in ("models", "evaluations", "tunings"):
        assert compare_inputs[name]["isArtifactList"] is True
    assert root["compare"]["dependentTasks"] == ["for-loop-1"]
    # The shipped model: the pick refit on train + test_shifted, on a GPU like train.
    assert sorted(root["refit"]["dependentTasks"]) == ["compare", "preprocess"]
    # The champion gate: challenge the shipped model, promote only under a "promote" verdict.
    assert sorted(root["challenge"]["dependentTasks"]) == ["preprocess", "refit"]
    assert root["challenge"]["cachingOptions"] == {}  # caching off: the champion changes
    # The target site's prevalence: the shipped model predicts target_data.
    assert root["predict"]["dependentTasks"] == ["refit"]
    assert root["predict"]["taskInfo"]["name"] == "target-prevalence"
    assert (root["predict"]["inputs"]["parameters"]["source"]["componentInputParameter"]
            == "target_data")
    gate = root["condition-2"]
    assert "promote" in gate["triggerPolicy"]["condition"]
    assert set(spec["components"][gate["componentRef"]["name"]]["dag"]["tasks"]) == {"promote"}

    executors = spec["deploymentSpec"]["executors"]
    assert {e["container"]["image"] for e in executors.values()} == {IMAGE}
    for name in ("exec-tune", "exec-train", "exec-crossfold", "exec-refit"):
        accelerator = executors[name]["container"]["resources"]["accelerator"]
        assert accelerator["resourceType"] == "nvidia.com/gpu"
        assert accelerator["resourceCount"] == "1"  # GPUS, fixed at compile time
        assert "retryPolicy" in {**inner, **root}[name.removeprefix("exec-")]
    for name in ("exec-preprocess", "exec-evaluate", "exec-compare"):
        assert "accelerator" not in executors[name]["container"]["resources"]

    k8s = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for name in ("exec-tune", "exec-train", "exec-crossfold", "exec-refit"):
        assert {"key": "nvidia.com/gpu", "operator": "Exists",
                "effect": "NoSchedule"} in k8s[name]["tolerations"]

    params = spec["root"]["inputDefinitions"]["parameters"]
    assert params["base_models"]["defaultValue"] == DEFAULT_MODELS
    assert set(params) == set(pipeline_defaults())


def test_loop_tasks_only_read_inputs_the_loop_declares(tmp_path):
    """KFP's driver refuses a task reading a `pipelinechannel--*` input its parent DAG lacks
    ("parent DAG does not have input parameter"): true of every platform variant."""
    for kwargs in ({"gpu": True, "gpus": 2, "cache_pvc": "c", "gcs_secret": "s",
                    "gpu_node_selector": ("k", "v")}, {"gpu": False}):
        spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, **kwargs))
        loop = spec["components"]["comp-for-loop-1"]
        declared = {kind: set(loop["inputDefinitions"].get(kind, {}))
                    for kind in ("parameters", "artifacts")}
        for name, task in loop["dag"]["tasks"].items():
            for kind, key in (("parameters", "componentInputParameter"),
                              ("artifacts", "componentInputArtifact")):
                for value in task.get("inputs", {}).get(kind, {}).values():
                    if key in value:
                        assert value[key] in declared[kind], (kwargs, name, value)
            for value in task.get("inputs", {}).get("parameters", {}).values():
                constant = str(value.get("runtimeValue", {}).get("constant", ""))
                assert "pipelinechannel--" not in constant, (kwargs, name, value)


def test_gpu_count_and_parallelism_are_compile_settings(tmp_path):
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpus=2,
                                    cache_pvc="lungxray-cache"))
    accelerator = spec["deploymentSpec"]["executors"]["exec-train"]["container"]["resources"]
    assert accelerator["accelerator"]["resourceCount"] == "2"
    # A ReadWriteOnce cache volume attaches to one node: one model at a time by default.
    assert spec["root"]["dag"]["tasks"]["for-loop-1"]["iteratorPolicy"]["parallelismLimit"] == 1
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE))
    assert "iteratorPolicy" not in spec["root"]["dag"]["tasks"]["for-loop-1"]  # no bound


@pytest.mark.parametrize(("args", "message"), [
    (["--image", ""], "not a container image reference"),
    (["--image", "/lungxray:abc"], "is REGISTRY or TAG empty?"),
    (["--image", "registry.example/lungxray"], "has no tag or digest"),
    (["--image", IMAGE, "--gpus", "0"], "gpus must be at least 1"),
    (["--image", IMAGE, "--vertex-accelerator", "nvidia.com/gpu"], "is not one of"),
    (["--image", IMAGE, "--vertex-accelerator", "NVIDIA_L4", "--cache-pvc", "c"],
     "runs no Kubernetes settings"),
    (["--image", IMAGE, "--image-digest", "sha256:abc"], "is not sha256:<64 hex digits>"),
    (["--image", IMAGE, "--output", "/proc/no/such/dir/p.yaml"], "cannot write"),
])
def test_compile_cli_refuses_bad_settings(tmp_path, capsys, args, message):
    output = [] if "--output" in args else ["--output", str(tmp_path / "p.yaml")]
    assert main([*args, *output]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipelines.compile: error:") and message in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "p.yaml").exists()


def test_local_pipeline_has_no_gpu_request(tmp_path):
    spec, platform = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=False,
                                           parallelism=1))
    assert platform is None
    executors = spec["deploymentSpec"]["executors"]
    assert all("accelerator" not in e["container"]["resources"] for e in executors.values())
    tasks = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert "retryPolicy" in tasks["train"]  # retries stay: CPU clusters preempt too
    assert spec["root"]["dag"]["tasks"]["for-loop-1"]["iteratorPolicy"]["parallelismLimit"] == 1


def test_profiles_only_use_real_parameters():
    defaults = pipeline_defaults()
    for name, profile in PROFILES.items():
        assert set(profile) <= set(defaults), name
        models = resolve_params(name)["base_models"]
        # The from-scratch baseline beside ImageNet backbones in every profile.
        assert "SmallCNN" in models and {"VGG16", "InceptionV3"} <= set(models)
        assert set(models) <= set(DEFAULT_MODELS)
        assert resolve_params(name)["shifted_test_fraction"] == 0.1
    assert resolve_params("quick")["base_models"] == DEFAULT_MODELS
    assert resolve_params("cluster")["base_models"] == DEFAULT_MODELS
    assert "ResNet152V2" not in resolve_params("full")["base_models"]


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


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_recompiles_when_the_platform_settings_change(tmp_path):
    """The package submit/schedule use is rebuilt when CACHE_PVC, GPUS, ... change, not only
    when the code does: a package without the cache volume must not run when one is asked for."""
    package = tmp_path / "p.yaml"
    where = [f"PIPELINE_YAML={package}", f"COMPILE_STAMP={tmp_path / 'new' / 'args'}",
             f"IMAGE={IMAGE}"]

    def make(*args: str) -> str:
        return subprocess.run(["make", "-o", ".venv/.installed", *args, *where], cwd=REPO,
                              capture_output=True, text=True, check=True).stdout

    assert "pipelines.compile" in make("compile")
    assert "pipelines.compile" not in make(str(package))  # what `make submit` needs: up to date
    assert "pipelines.compile" in make(str(package), "CACHE_PVC=lungxray-cache")
    assert "lungxray-cache" in package.read_text()
    assert "pipelines.compile" in make(str(package), "CACHE_PVC=lungxray-cache", "GPUS=2")
    assert "resourceCount: '2'" in package.read_text()
    cpu = subprocess.run(["make", "-n", "-o", ".venv/.installed", "compile-cpu", "CACHE_PVC=c",
                          "GPUS=2"], cwd=REPO, capture_output=True, text=True,
                         check=True).stdout.replace("\\\n", " ")
    assert "--cache-pvc c" in cpu and "--gpus" not in cpu


# ---- resources, CPU parallelism, Vertex, digests, params files (issue 23) ----------------------

def resources(spec: dict) -> dict[str, dict]:
    return {name.removeprefix("exec-"): e["container"]["resources"]
            for name, e in spec["deploymentSpec"]["executors"].items()}


@pytest.mark.parametrize("gpu", [True, False])
def test_every_step_has_cpu_and_memory_requests_and_limits(tmp_path, gpu):
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=gpu))
    sizes = {k: parse_resources(v) for k, v in RESOURCES["gpu" if gpu else "cpu"].items()}
    for step, res in resources(spec).items():
        want = sizes["heavy" if step in ("tune", "train", "crossfold", "refit") else "light"]
        assert res["resourceCpuRequest"] == want.cpu_request, step
        assert res["resourceCpuLimit"] == want.cpu_limit, step
        assert res["resourceMemoryRequest"] == want.memory_request, step
        assert res["resourceMemoryLimit"] == want.memory_limit, step


def test_resource_sizes_follow_the_measured_peaks():
    """One tune/train process peaked at 5.7 GiB at 32 px on CPU (bench/RESULTS.md, full
    profile) and ResNet152V2 at 224 px needs about 8 GB: the GPU package's limit covers both
    with headroom; the kind package fits a node of 8 GiB that also runs KFP."""
    gib = 2**30
    gpu_heavy = parse_resources(RESOURCES["gpu"]["heavy"])
    assert int(gpu_heavy.memory_limit.removesuffix("Gi")) * gib > 8e9 * 1.5
    cpu_heavy = parse_resources(RESOURCES["cpu"]["heavy"])
    cpu_light = parse_resources(RESOURCES["cpu"]["light"])
    assert int(cpu_heavy.memory_limit.removesuffix("Gi")) >= 5  # 4.4 GiB peak, quick profile
    # PARALLELISM=1: one heavy pod at a time, plus one light pod, leave KFP room in 8 GiB.
    requested = int(cpu_heavy.memory_request.removesuffix("Gi")) + int(
        cpu_light.memory_request.removesuffix("Gi"))
    assert requested <= 4


def test_resource_flags_override_and_refuse_nonsense(tmp_path, capsys):
    out = tmp_path / "p.yaml"
    assert main(["--image", IMAGE, "--output", str(out), "--heavy-resources", "6/-,20Gi/24Gi",
                 "--light-resources=-/-,2Gi/-"]) == 0
    res = resources(load(out)[0])
    assert res["train"]["resourceCpuRequest"] == "6" and "resourceCpuLimit" not in res["train"]
    assert res["train"]["resourceMemoryLimit"] == "24Gi"
    assert res["compare"] == {"memoryRequest": 2.147483648, "resourceMemoryRequest": "2Gi"}
    assert parse_resources("500m/2,1Gi/3Gi") == Resources("500m", "2", "1Gi", "3Gi")
    for bad, message in (("4/8", "expected"), ("4/8,lots/8Gi", "not a quantity"),
                         ("4/2,1Gi/2Gi", "cpu request 4 is above its limit 2"),
                         ("1/2,3Gi/2048Mi", "memory request 3Gi is above")):
        with pytest.raises(ValueError, match=message):
            parse_resources(bad)
    with pytest.raises(SystemExit):
        main(["--image", IMAGE, "--output", str(out), "--heavy-resources", "x"])
    assert "expected CPU_REQ/CPU_LIM,MEM_REQ/MEM_LIM" in capsys.readouterr().err


def test_cpu_package_runs_one_model_at_a_time(tmp_path):
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=False))
    assert spec["root"]["dag"]["tasks"]["for-loop-1"]["iteratorPolicy"]["parallelismLimit"] == 1
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, gpu=False, parallelism=0))
    assert "iteratorPolicy" not in spec["root"]["dag"]["tasks"]["for-loop-1"]


def test_vertex_package_has_vertex_accelerators_and_no_kubernetes(tmp_path):
    spec, platform = load(compile_pipeline(tmp_path / "p.yaml", IMAGE,
                                           vertex_accelerator="NVIDIA_L4", gpus=2))
    assert platform is None  # kfp-kubernetes settings would be ignored or refused by Vertex
    res = resources(spec)
    for step in ("tune", "train"):
        assert res[step]["accelerator"]["type"] == "NVIDIA_L4"
        assert res[step]["accelerator"]["count"] == "2"
    assert all("accelerator" not in res[s] for s in ("preprocess", "evaluate", "compare"))
    assert all("resourceMemoryRequest" not in r for r in res.values())  # Vertex: limits only
    tasks = spec["components"]["comp-for-loop-1"]["dag"]["tasks"]
    assert tasks["train"]["retryPolicy"]["maxRetryCount"] == 2


def test_image_digest_pins_every_step(tmp_path):
    digest = "sha256:" + "e" * 64
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE, image_digest=digest))
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {f"{IMAGE}@{digest}"}


@pytest.mark.parametrize(("params", "kwargs"), [
    ("kind.yaml", {"gpu": False}),
    ("gke.yaml", {"gpu": True, "cache_pvc": "lungxray-cache",
                  "gpu_node_selector": ("cloud.google.com/gke-accelerator", "nvidia-l4")}),
    ("gke.yaml", {"vertex_accelerator": "NVIDIA_L4"}),
])
def test_params_files_validate_against_their_packages(tmp_path, params, kwargs):
    package = compile_pipeline(tmp_path / "p.yaml", IMAGE, **kwargs)
    values = validate_params(read_pipeline_spec(package), load_params(REPO / "params" / params))
    if params == "kind.yaml":  # small enough for one 8 GiB node
        assert len(values["base_models"]) == 1 and values["image_size"] <= 64


def test_every_pipeline_parameter_has_a_description_for_the_kubeflow_ui(tmp_path):
    spec, _ = load(compile_pipeline(tmp_path / "p.yaml", IMAGE))
    params = spec["root"]["inputDefinitions"]["parameters"]
    undescribed = sorted(name for name, p in params.items() if not p.get("description"))
    assert params and not undescribed, f"no Args: entry in the pipeline docstring: {undescribed}"
