"""pipelines.submit against the fake KFP v2beta1 server: what is sent, and how failures look."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.compile import compile_pipeline
from pipelines.params import ParamsError
from pipelines.submit import KfpError, check_health, submit_run
from tests.cluster.fake_kfp import API, FakeKfp
from tests.cluster.fake_vertex import FakeRegistry
from tests.cluster.helpers import assert_one_line_error, task_caching

IMAGE = "registry.example/lungxray:abc123"


def run_body(fake: FakeKfp) -> dict:
    (call,) = fake.calls("POST", f"{API}/runs")
    return call.body


def test_submit_sends_spec_parameters_and_experiment(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    run_id, url = submit_run(
        fake_kfp.url, "lungxray-test", str(tiny_package), {"message": "hi", "epochs": 5}, "run-1"
    )

    assert fake_kfp.requests[0].method == "GET"
    assert fake_kfp.requests[0].path == f"{API}/healthz"  # health check before anything else
    (created,) = fake_kfp.calls("POST", f"{API}/experiments")
    assert created.body["display_name"] == "lungxray-test"
    experiment_id = next(iter(fake_kfp.experiments))

    body = run_body(fake_kfp)
    assert body["experiment_id"] == experiment_id
    assert body["display_name"] == "run-1"
    assert body["runtime_config"]["parameters"] == {"message": "hi", "epochs": 5}
    # The package has a Kubernetes platform spec (the PVC mount), so both documents travel.
    spec = body["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "tiny-lungxray"
    assert set(spec["root"]["inputDefinitions"]["parameters"]) == {"message", "epochs"}
    platform = body["pipeline_spec"]["platform_spec"]
    assert "lungxray-cache" in yaml.safe_dump(platform)
    assert "service_account" not in body  # KFP's default SA unless asked

    assert run_id == fake_kfp.runs[run_id]["run_id"]
    assert url == f"{fake_kfp.url}/#/runs/details/{run_id}"


def test_existing_experiment_is_reused(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    existing = fake_kfp.add_experiment("lungxray")
    submit_run(fake_kfp.url, "lungxray", str(tiny_package), {"message": "hi"})
    assert fake_kfp.calls("POST", f"{API}/experiments") == []
    body = run_body(fake_kfp)
    assert body["experiment_id"] == existing["experiment_id"]
    assert body["runtime_config"]["parameters"] == {"message": "hi"}
    assert body["display_name"].startswith("tiny-lungxray ")  # default run name


def test_service_account_and_expected_image(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    submit_run(
        fake_kfp.url,
        "e",
        str(tiny_package),
        {"message": "hi"},
        service_account="lungxray-pipeline-runner",
        expect_image=IMAGE,
        image_check=False,  # registry.example is not a registry; test_registry.py covers it
    )
    assert run_body(fake_kfp)["service_account"] == "lungxray-pipeline-runner"


def test_bad_params_are_rejected_before_any_request(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    with pytest.raises(ParamsError, match="'epochs' must be an integer"):
        submit_run(fake_kfp.url, "e", str(tiny_package), {"message": "hi", "epochs": "x"})
    with pytest.raises(ParamsError, match="was compiled for registry.example/lungxray:abc123"):
        submit_run(
            fake_kfp.url, "e", str(tiny_package), {"message": "hi"}, expect_image=IMAGE + "x"
        )
    assert fake_kfp.requests == []


def test_health_check_errors(fake_kfp: FakeKfp, closed_port_url: str) -> None:
    assert check_health(fake_kfp.url)["multi_user"] is False
    with pytest.raises(KfpError, match="unreachable"):
        check_health(closed_port_url, timeout=5)
    fake_kfp.fail("GET", f"{API}/healthz", 503, "warming up")
    with pytest.raises(KfpError, match="HTTP 503"):
        check_health(fake_kfp.url)


# ---- the CLI, as `make submit` runs it ----------------------------------------------------------


def test_cli_submits_params_file(
    fake_kfp: FakeKfp, tiny_package: Path, tmp_path: Path, run_module
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("message: from-yaml\nepochs: 7\n")
    result = run_module(
        "pipelines.submit",
        "--host", fake_kfp.url,
        "--experiment", "cli-exp",
        "--package", str(tiny_package),
        "--params", str(params),
        "--run-name", "cli run",
        "--expect-image", IMAGE, "--no-image-check",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    body = run_body(fake_kfp)
    assert body["runtime_config"]["parameters"] == {"message": "from-yaml", "epochs": 7}
    assert body["display_name"] == "cli run"
    assert fake_kfp.experiments[body["experiment_id"]]["display_name"] == "cli-exp"
    run_id = next(iter(fake_kfp.runs))
    assert result.stdout.splitlines()[-1] == f"Run URL: {fake_kfp.url}/#/runs/details/{run_id}"
    assert "FutureWarning" not in result.stderr


def test_cli_unreachable_host(
    closed_port_url: str, tiny_package: Path, tmp_path: Path, run_module
) -> None:
    params = tmp_path / "params.json"
    params.write_text('{"message": "hi"}')
    result = run_module(
        "pipelines.submit", "--host", closed_port_url, "--package", str(tiny_package),
        "--params", str(params),
    )  # fmt: skip
    assert_one_line_error(result, "unreachable", closed_port_url)


@pytest.mark.parametrize(
    ("params_text", "needles"),
    [
        ("message: hi\nepoch: 3\n", ("unknown pipeline parameter(s) 'epoch'", "epochs, message")),
        ("message: hi\nepochs: three\n", ("'epochs' must be an integer (NUMBER_INTEGER)",)),
        ("epochs: 3\n", ("missing required pipeline parameter(s): message",)),
        ("- message\n", ("must hold a mapping",)),
    ],
)
def test_cli_bad_params(
    fake_kfp: FakeKfp, tiny_package: Path, tmp_path: Path, run_module, params_text, needles
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(params_text)
    result = run_module(
        "pipelines.submit", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--params", str(params),
    )  # fmt: skip
    assert_one_line_error(result, *needles)
    assert fake_kfp.requests == []  # nothing reached the server


def test_cli_server_error_is_one_line(fake_kfp: FakeKfp, tiny_package: Path, run_module) -> None:
    fake_kfp.fail("POST", f"{API}/runs", 400, "Invalid input error: pipeline spec is invalid")
    result = run_module(
        "pipelines.submit", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--params", "/dev/null",
    )  # fmt: skip
    # /dev/null is an empty file: no params, and `message` is required.
    assert_one_line_error(result, "missing required pipeline parameter(s): message")

    params = tiny_package.parent / "ok.yaml"
    params.write_text("message: hi\n")
    result = run_module(
        "pipelines.submit", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--params", str(params),
    )  # fmt: skip
    assert_one_line_error(result, "KFP API error 400", "pipeline spec is invalid")


def test_cli_missing_package(fake_kfp: FakeKfp, tmp_path: Path, run_module) -> None:
    result = run_module(
        "pipelines.submit", "--host", fake_kfp.url, "--package", str(tmp_path / "none.yaml")
    )
    assert_one_line_error(result, "does not exist", "make compile")


def test_real_pipeline_compiles_and_submits(fake_kfp: FakeKfp, tmp_path: Path) -> None:
    """The project's own pipeline (pipelines/compile.py) goes through submit unchanged, after
    the registry confirmed the image exists."""
    with FakeRegistry() as registry:
        image = registry.add("team/lungxray", "0123456789ab", "sha256:" + "c" * 64)
        package = compile_pipeline(tmp_path / "pipeline.yaml", image, gpu=True)
        run_id, _ = submit_run(
            fake_kfp.url, "lungxray", str(package), {"epochs": 1}, "real", expect_image=image
        )
        (head,) = registry.calls("HEAD", "/manifests/")
        assert head.path == "/v2/team/lungxray/manifests/0123456789ab"

    body = run_body(fake_kfp)
    assert body["runtime_config"]["parameters"] == {"epochs": 1}
    sent = body["pipeline_spec"]
    spec = sent.get("pipeline_spec", sent)
    assert spec["pipelineInfo"]["name"] == "lungxray"
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {image}
    # gpu=True: tune, train, crossfold and refit, and only they, ask for NVIDIA GPUs.
    gpu_steps = {
        name for name, e in spec["deploymentSpec"]["executors"].items()
        if e["container"].get("resources", {}).get("accelerator", {}).get("resourceType")
        == "nvidia.com/gpu"
    }
    assert gpu_steps == {"exec-tune", "exec-train", "exec-crossfold", "exec-refit"}
    assert fake_kfp.runs[run_id]["display_name"] == "real"


def test_caching_as_compiled_unless_overridden(
    fake_kfp: FakeKfp, tiny_package: Path, tmp_path: Path, run_module
) -> None:
    submit_run(fake_kfp.url, "e", str(tiny_package), {"message": "hi"})
    assert task_caching(run_body(fake_kfp)) == [True]

    params = tmp_path / "p.yaml"
    params.write_text("message: hi\n")
    result = run_module(
        "pipelines.submit", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--params", str(params), "--cache", "off",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    second = fake_kfp.calls("POST", f"{API}/runs")[-1].body
    assert task_caching(second) == [False]


@pytest.mark.filterwarnings("ignore:This client only works:FutureWarning")
def test_fake_server_speaks_the_other_client_paths(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    """Upload (multipart), get run and get experiment by id, as kfp.Client sends them."""
    from kfp import Client

    client = Client(host=fake_kfp.url)
    pipeline = client.upload_pipeline(str(tiny_package), pipeline_name="tiny")
    (upload,) = fake_kfp.calls("POST", f"{API}/pipelines/upload")
    assert upload.query["name"] == "tiny"
    assert upload.body["files"]["uploadfile"] == tiny_package.read_bytes()
    assert pipeline.pipeline_id in fake_kfp.pipelines

    run_id, _ = submit_run(fake_kfp.url, "e", str(tiny_package), {"message": "hi"})
    assert client.get_run(run_id).display_name.startswith("tiny-lungxray")
    experiment_id = fake_kfp.runs[run_id]["experiment_id"]
    assert client.get_experiment(experiment_id=experiment_id).display_name == "e"
