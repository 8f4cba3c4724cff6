"""make/cluster.mk through make itself: dry runs for docker/kind/kubectl, real runs for the rest.

A stand-in top-level Makefile defines what the real one provides (VENV, PY, IMAGE, ...), with a
stub venv stamp, so no test touches .venv or build/.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.cluster.fake_kfp import API, FakeKfp
from tests.cluster.fake_vertex import FakeRegistry, FakeVertex

REPO = Path(__file__).resolve().parents[2]
CLUSTER_MK = REPO / "make" / "cluster.mk"
TINY_IMAGE = "registry.example/lungxray:abc123"  # the image tiny_package was compiled for

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


@pytest.fixture
def make(tmp_path: Path, isolated_kfp_home: Path, tiny_package: Path):
    """Run make with cluster.mk included from a stand-in top-level Makefile."""
    wrapper = tmp_path / "Makefile"
    wrapper.write_text(
        f"""
VENV := {tmp_path}/venv
PY := {sys.executable}
REGISTRY ?= localhost:5001
TAG ?= abc123
IMAGE ?= $(REGISTRY)/lungxray:$(TAG)
PIPELINE_YAML := {tiny_package}
KFP_HOST ?= http://localhost:8080
KFP_EXPERIMENT ?= lungxray
PARAMS ?=
$(VENV)/.installed:
\t@mkdir -p $(VENV) && touch $@
compile:
\t@echo compile-stub
include make/cluster.mk
"""
    )

    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        extra = env or {}
        env = dict(os.environ, HOME=str(isolated_kfp_home), **extra)
        env.pop("MAKEFLAGS", None)
        for var in ("KFP_TOKEN", "REGISTRY_USER", "REGISTRY_PASSWORD"):  # a developer's own
            if var not in extra:
                env.pop(var, None)
        return subprocess.run(
            ["make", "--no-print-directory", "-f", str(wrapper), *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )

    return run


def dry(make, *args: str) -> str:
    result = make("-n", *args)
    assert result.returncode == 0, result.stderr
    return " ".join(result.stdout.replace("\\\n", " ").split())


def test_every_public_target_is_documented() -> None:
    rules = re.findall(r"^([A-Za-z0-9][\w.-]*):(?!=)(.*)$", CLUSTER_MK.read_text(), re.M)
    assert len(rules) >= 15
    undocumented = [name for name, rest in rules if "## " not in rest]
    assert undocumented == []


def test_brief_targets_exist() -> None:
    text = CLUSTER_MK.read_text()
    for target in (
        "image", "image-cpu", "push", "submit", "schedule", "unschedule", "kind-up",
        "kind-down", "minikube-up", "kfp-install", "kfp-port-forward", "manifests", "lint-docker",
    ):  # fmt: skip
        assert re.search(rf"^{re.escape(target)}:", text, re.M), target


def test_image_passes_prebake_and_tag(make) -> None:
    out = dry(make, "image", "PREBAKE_WEIGHTS=VGG16 InceptionV3")
    assert "docker build --platform linux/amd64 -f docker/Dockerfile " in out
    assert "--build-arg TF_GPU_IMAGE=tensorflow/tensorflow:2.21.0-gpu " in out
    assert '--build-arg PREBAKE_WEIGHTS="VGG16 InceptionV3"' in out
    assert "-t localhost:5001/lungxray:abc123 ." in out
    out = dry(make, "image-cpu", "push-cpu")
    # linux/amd64 explicitly: tensorflow-cpu 2.21.0 has no aarch64 wheel (Apple Silicon hosts)
    assert "docker build --platform linux/amd64 -f docker/Dockerfile.cpu " in out
    assert "-t localhost:5001/lungxray:abc123-cpu ." in out
    assert "docker push localhost:5001/lungxray:abc123-cpu" in out


def test_kfp_install_follows_the_documented_steps(make) -> None:
    out = make("-n", "kfp-install", "KFP_BACKEND_VERSION=2.99.0").stdout.splitlines()
    base = "github.com/kubeflow/pipelines/manifests/kustomize"
    assert out[:3] == [
        f'kubectl apply -k "{base}/cluster-scoped-resources?ref=2.99.0"',
        "kubectl wait --for condition=established --timeout=60s crd/applications.app.k8s.io",
        f'kubectl apply -k "{base}/env/platform-agnostic?ref=2.99.0"',
    ]
    assert "wait --for=condition=Available" in out[3]


def test_kind_up_creates_registry_and_cluster(make) -> None:
    out = dry(make, "kind-up")
    assert "-p 127.0.0.1:5001:5000" in out and "registry:3" in out
    assert "kind create cluster --name lungxray --config manifests/kind/cluster.yaml" in out
    assert "/etc/containerd/certs.d/localhost:5001" in out
    assert "kind delete cluster --name lungxray" in dry(make, "kind-down")


def test_schedule_without_cron_fails_before_compiling(make) -> None:
    result = make("schedule")
    assert result.returncode != 0
    assert "CRON is required" in result.stderr
    assert "compile-stub" not in result.stdout


def test_manifests_renders_every_overlay(make, tmp_path: Path) -> None:
    out_dir = tmp_path / "rendered"
    result = make("manifests", f"MANIFESTS_OUT={out_dir}")
    assert result.returncode == 0, result.stderr
    overlays = {
        p.parent.name for p in (REPO / "manifests" / "overlays").glob("*/kustomization.yaml")
    }
    assert {p.stem for p in out_dir.glob("*.yaml")} == overlays
    for path in out_dir.glob("*.yaml"):
        kinds = {d["kind"] for d in yaml.safe_load_all(path.read_text()) if d}
        assert {"ServiceAccount", "PersistentVolumeClaim"} <= kinds


def test_lint_docker(make) -> None:
    result = make("lint-docker", f"HADOLINT={Path(sys.executable).with_name('hadolint')}")
    assert result.returncode == 0, result.stdout + result.stderr


def test_submit_schedule_unschedule_end_to_end(make, tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("message: via-make\n")
    with FakeKfp() as fake:
        common = (f"KFP_HOST={fake.url}", f"IMAGE={TINY_IMAGE}", f"PARAMS={params}",
                  "NO_IMAGE_CHECK=1")  # registry.example is no registry; see the test below
        submitted = make("submit", *common, "RUN_NAME=from make", "KFP_EXPERIMENT=mk")
        assert submitted.returncode == 0, submitted.stderr
        (run,) = fake.runs.values()
        assert run["display_name"] == "from make"
        assert run["runtime_config"]["parameters"] == {"message": "via-make"}
        assert fake.experiments[run["experiment_id"]]["display_name"] == "mk"

        scheduled = make("schedule", *common, "CRON=0 0 4 * * *", "SCHEDULE_NAME=mk-nightly")
        assert scheduled.returncode == 0, scheduled.stderr
        (rr,) = fake.recurring_runs.values()
        assert rr["trigger"]["cron_schedule"]["cron"] == "0 0 4 * * *"
        assert rr["display_name"] == "mk-nightly"

        unscheduled = make("unschedule", f"KFP_HOST={fake.url}", "SCHEDULE_NAME=mk-nightly")
        assert unscheduled.returncode == 0, unscheduled.stderr
        assert fake.calls("POST", f"{API}/recurringruns/{rr['recurring_run_id']}:disable")


def test_submit_refuses_a_package_compiled_for_another_image(make) -> None:
    with FakeKfp() as fake:
        result = make("submit", f"KFP_HOST={fake.url}", "IMAGE=registry.example/lungxray:new")
        assert result.returncode != 0
        assert "run `make compile`" in result.stderr
        assert fake.requests == []


def test_compile_cpu_builds_the_real_pipeline_without_gpu(make, tmp_path: Path) -> None:
    out = tmp_path / "pipeline-cpu.yaml"
    image = "localhost:5001/lungxray:abc123-cpu"
    result = make("compile-cpu", f"PIPELINE_YAML_CPU={out}", f"IMAGE_CPU={image}")
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all(out.read_text()))
    executors = spec["deploymentSpec"]["executors"].values()
    assert {e["container"]["image"] for e in executors} == {image}
    assert "nvidia.com/gpu" not in out.read_text()  # schedulable on a cluster without GPUs


# ---- issue 23: base digest, backend version, auth, registry check, Vertex ----------------------

DIGEST = "sha256:" + "ab" * 32
# Release tags of kubeflow/pipelines' backend (non-`sdk-` tags), read from a clone of the
# repository on 2026-12-03 with `git tag`: 2.17.0 is the newest 2.17 one; there is no 2.17.3.
BACKEND_TAGS = {"2.14.0", "2.14.3", "2.14.4", "2.15.0", "2.16.0", "2.16.1", "2.17.0"}


def make_var(name: str) -> str:
    match = re.search(rf"^{name} \?= (.*)$", CLUSTER_MK.read_text(), re.M)
    assert match, name
    return match.group(1).strip()


def test_kfp_backend_version_is_a_release_tag_of_the_sdk_minor() -> None:
    backend = make_var("KFP_BACKEND_VERSION")
    assert backend in BACKEND_TAGS
    sdk = re.search(r'"kfp==([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert backend.split(".")[:2] == sdk.split(".")[:2], (backend, sdk)


def test_image_warns_or_refuses_a_base_without_digest(make) -> None:
    # DOCKER=echo: the check really runs, the build command is only printed.
    warned = make("image", "DOCKER=echo")
    assert warned.returncode == 0 and "pinned by tag only" in warned.stderr
    refused = make("image", "REQUIRE_DIGEST=1", "DOCKER=echo")
    assert refused.returncode != 0 and "is not pinned by digest" in refused.stderr
    assert "--build-arg" not in refused.stdout
    pinned = f"tensorflow/tensorflow:2.21.0-gpu@{DIGEST}"
    ok = make("image", "REQUIRE_DIGEST=1", f"TF_GPU_IMAGE={pinned}", "DOCKER=echo")
    assert ok.returncode == 0, ok.stderr
    assert "pinned by tag only" not in ok.stderr
    assert f"--build-arg TF_GPU_IMAGE={pinned}" in " ".join(ok.stdout.split())


def test_submit_with_token_namespace_and_registry_check(make, tmp_path: Path,
                                                       package_for) -> None:
    """make submit/unschedule against a multi-user stand-in: the token file's bearer token on
    every request, the profile namespace on the experiment, and the image asked of a registry."""
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    with FakeRegistry() as registry, FakeKfp(multi_user=True, token="s3cret") as fake:
        image = registry.add("team/lungxray", "abc123", DIGEST)
        package = package_for(image)
        common = (f"KFP_HOST={fake.url}", f"IMAGE={image}", f"PIPELINE_YAML={package}",
                  f"KFP_TOKEN_FILE={token}", "KFP_USER_NAMESPACE=team-a")
        result = make("submit", *common)
        assert result.returncode == 0, result.stderr
        assert fake.requests and all(
            r.headers.get("Authorization") == "Bearer s3cret" for r in fake.requests)
        (exp,) = fake.experiments.values()
        assert exp["namespace"] == "team-a"
        assert registry.calls("HEAD", "/v2/team/lungxray/manifests/abc123")

        gone = f"{registry.netloc}/team/lungxray:gone"  # compiled for, but never pushed
        missing = make("submit", *common, f"IMAGE={gone}", f"PIPELINE_YAML={package_for(gone)}",
                       "KFP_EXPERIMENT=other")
        assert missing.returncode != 0
        assert "is not in registry" in missing.stderr and "--no-image-check" in missing.stderr
        assert len(fake.runs) == 1


@pytest.mark.slow
def test_submit_and_schedule_vertex_end_to_end(make, tmp_path: Path) -> None:
    """make submit-vertex / schedule-vertex compile the Vertex package and send it through
    google-cloud-aiplatform's REST transport to the stand-in."""
    pytest.importorskip("google.cloud.aiplatform")
    params = tmp_path / "params.yaml"
    params.write_text("epochs: 1\nbase_models: [MobileNetV2]\n")
    package = tmp_path / "pipeline-vertex.yaml"
    with FakeVertex() as vertex:
        env = {"GOOGLE_APPLICATION_CREDENTIALS": str(vertex.adc_file(tmp_path / "adc.json")),
               "STORAGE_EMULATOR_HOST": vertex.url}
        common = ("VERTEX_PROJECT=proj", "VERTEX_PIPELINE_ROOT=gs://bucket/runs",
                  f"VERTEX_API_ENDPOINT={vertex.url}", f"PIPELINE_YAML_VERTEX={package}",
                  f"PARAMS={params}", "NO_IMAGE_CHECK=1", "VERTEX_ACCELERATOR=NVIDIA_TESLA_T4")
        submitted = make("submit-vertex", *common, "RUN_NAME=from-make", env=env)
        assert submitted.returncode == 0, submitted.stderr
        (job,) = vertex.jobs.values()
        assert job["displayName"] == "from-make"
        assert job["runtimeConfig"]["gcsOutputDirectory"] == "gs://bucket/runs"
        executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
        assert executors["exec-train"]["container"]["resources"]["accelerator"]["type"] == (
            "NVIDIA_TESLA_T4")
        assert "nvidia.com/gpu" not in json.dumps(job)

        scheduled = make("schedule-vertex", *common, "VERTEX_CRON=0 3 * * 1",
                         "SCHEDULE_NAME=weekly", env=env)
        assert scheduled.returncode == 0, scheduled.stderr
        (sched,) = vertex.schedules.values()
        assert sched["cron"] == "0 3 * * 1" and sched["displayName"] == "weekly"
        assert all(r.headers.get("Authorization") == f"Bearer {FakeVertex.ACCESS_TOKEN}"
                   for r in vertex.calls("POST", "/v1/"))


def test_vertex_targets_need_project_root_and_cron(make) -> None:
    result = make("submit-vertex")
    assert result.returncode != 0 and "VERTEX_PROJECT is required" in result.stderr
    result = make("schedule-vertex", "VERTEX_PROJECT=p", "VERTEX_PIPELINE_ROOT=gs://b/r")
    assert result.returncode != 0 and "VERTEX_CRON is required" in result.stderr
