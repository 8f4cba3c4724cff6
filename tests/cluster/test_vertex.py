"""pipelines.vertex through google-cloud-aiplatform's REST transport, against the stand-in of
the Vertex AI v1 REST API (tests/cluster/fake_vertex.py): what is sent, and how failures look."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("google.cloud.aiplatform")

from pipelines.compile import compile_pipeline  # noqa: E402
from pipelines.params import ParamsError  # noqa: E402
from pipelines.vertex import schedule_vertex, submit_vertex, validate_vertex_cron  # noqa: E402
from tests.cluster.fake_vertex import FakeVertex  # noqa: E402
from tests.cluster.helpers import assert_one_line_error  # noqa: E402

IMAGE = "europe-docker.pkg.dev/p/r/lungxray:abc123"
JOBS = r"^/v1/projects/proj/locations/europe-west4/pipelineJobs$"


@pytest.fixture(scope="module")
def vertex_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vertex") / "pipeline-vertex.yaml"
    return compile_pipeline(path, IMAGE, vertex_accelerator="NVIDIA_L4", gpus=2)


@pytest.fixture
def vertex(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The stand-in, with Application Default Credentials and Cloud Storage pointed at it."""
    with FakeVertex() as server:
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS",
                           str(server.adc_file(tmp_path / "adc.json")))
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", server.url)
        yield server


def submit(vertex: FakeVertex, package: Path, **kwargs) -> str:
    return submit_vertex(str(package), "proj", "europe-west4", "gs://bkt/runs",
                         kwargs.pop("params", {"epochs": 2}), api_endpoint=vertex.url,
                         image_check=False, **kwargs)


def test_submit_sends_the_vertex_package(vertex: FakeVertex, vertex_package: Path) -> None:
    name = submit(vertex, vertex_package, display_name="r1", service_account="sa@p.iam",
                  enable_caching=False, expect_image=IMAGE)
    (call,) = vertex.calls("POST", JOBS)
    assert call.headers["Authorization"] == f"Bearer {FakeVertex.ACCESS_TOKEN}"
    assert call.query["pipelineJobId"].startswith("lungxray-")
    job = call.body
    assert name == vertex.jobs[name]["name"]
    assert job["displayName"] == "r1"
    assert job["serviceAccount"] == "sa@p.iam"
    assert job["labels"]["app"] == "lungxray"
    runtime = job["runtimeConfig"]
    assert runtime["gcsOutputDirectory"] == "gs://bkt/runs"
    assert runtime["parameterValues"]["epochs"] == 2
    executors = job["pipelineSpec"]["deploymentSpec"]["executors"]
    for step in ("exec-tune", "exec-train"):
        res = executors[step]["container"]["resources"]
        assert res["accelerator"]["type"] == "NVIDIA_L4" and res["accelerator"]["count"] == "2"
        assert res["resourceMemoryLimit"] == "32G"  # Vertex picks the machine from limits
    assert "nvidia.com/gpu" not in json.dumps(job)
    assert "platform_spec" not in json.dumps(job)  # no Kubernetes settings travel
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    assert tasks["preprocess"]["cachingOptions"].get("enableCache", False) is False


def test_schedule_sends_cron_and_one_run_at_a_time(vertex: FakeVertex,
                                                  vertex_package: Path) -> None:
    name = schedule_vertex(str(vertex_package), "proj", "europe-west4", "gs://bkt/runs",
                           "TZ=Europe/Berlin 0 3 * * 1", "weekly", {"epochs": 3},
                           api_endpoint=vertex.url, image_check=False)
    (call,) = vertex.calls("POST", r"/schedules$")
    body = call.body
    assert name == "projects/proj/locations/europe-west4/schedules/1"
    assert body["cron"] == "TZ=Europe/Berlin 0 3 * * 1"
    assert body["displayName"] == "weekly"
    assert body["maxConcurrentRunCount"] == "1"
    request = body["createPipelineJobRequest"]
    assert request["parent"] == "projects/proj/locations/europe-west4"
    job = request["pipelineJob"]
    assert job["runtimeConfig"]["parameterValues"]["epochs"] == 3
    tasks = job["pipelineSpec"]["root"]["dag"]["tasks"]
    assert not tasks["preprocess"]["cachingOptions"].get("enableCache", False)  # off


def test_checks_fail_before_any_request(vertex: FakeVertex, vertex_package: Path) -> None:
    with pytest.raises(ParamsError, match="has 6 fields.*'0 3 \\* \\* 1'"):
        validate_vertex_cron("0 0 3 * * 1")
    with pytest.raises(ParamsError, match="must be a gs:// URI"):
        submit_vertex(str(vertex_package), "proj", "europe-west4", "/tmp/x", {},
                      api_endpoint=vertex.url)
    with pytest.raises(ParamsError, match="epochs"):
        submit(vertex, vertex_package, params={"epochs": "many"})
    with pytest.raises(ParamsError, match="compiled for"):
        submit(vertex, vertex_package, expect_image=IMAGE + "x")
    assert vertex.requests == []


def test_cli_api_error_is_one_line(vertex: FakeVertex, vertex_package: Path, run_module,
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    args = ("pipelines.vertex", "submit", "--project", "proj", "--location", "europe-west4",
            "--package", str(vertex_package), "--pipeline-root", "gs://bkt/runs",
            "--api-endpoint", vertex.url, "--expect-image", IMAGE, "--no-image-check")
    monkeypatch.setattr(FakeVertex, "route", _fail_creates(FakeVertex.route))
    result = run_module(*args)
    assert_one_line_error(result, "Vertex AI create pipeline job failed",
                          "not available in europe-west4")
    assert "Traceback" not in result.stdout  # aiplatform's bucket-check log is one line too


def _fail_creates(route):
    def wrapped(self, req):
        if req.method == "POST" and req.path.endswith("/pipelineJobs"):
            return 400, {}, {"error": {"code": 400, "status": "INVALID_ARGUMENT",
                                       "message": "NVIDIA_L4 is not available in europe-west4"}}
        return route(self, req)

    return wrapped
