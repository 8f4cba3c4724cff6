"""Multi-user Kubeflow: the bearer token and profile namespace of submit/schedule, against the
stand-in server acting as the authenticating gateway (401 without the token)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines import submit as submit_module
from pipelines.schedule import schedule
from pipelines.submit import KfpError, read_token, submit_run
from tests.cluster.fake_kfp import API, FakeKfp
from tests.cluster.helpers import assert_one_line_error


@pytest.fixture
def gateway():
    with FakeKfp(multi_user=True, token="tok-123") as server:
        yield server


def assert_all_authorized(fake: FakeKfp, token: str = "tok-123") -> None:
    assert fake.requests
    assert {r.headers.get("Authorization") for r in fake.requests} == {f"Bearer {token}"}


def test_token_on_every_request_and_namespace(gateway: FakeKfp, tiny_package: Path) -> None:
    submit_run(gateway.url, "e", str(tiny_package), {"message": "hi"}, namespace="team-a",
               token="tok-123")
    assert_all_authorized(gateway)
    (exp,) = gateway.experiments.values()
    assert exp["namespace"] == "team-a"
    (lookup, *_) = gateway.calls("GET", f"{API}/experiments")
    assert lookup.query["namespace"] == "team-a"


def test_schedule_sends_the_token_too(gateway: FakeKfp, tiny_package: Path) -> None:
    schedule(gateway.url, "e", str(tiny_package), "0 0 3 * * *", {"message": "m"}, "n",
             namespace="team-a", token="tok-123")
    assert_all_authorized(gateway)
    assert gateway.recurring_runs


def test_without_or_with_a_wrong_token_one_line(gateway: FakeKfp, tiny_package: Path) -> None:
    with pytest.raises(KfpError, match="401.*needs a token"):
        submit_run(gateway.url, "e", str(tiny_package), {"message": "hi"})
    with pytest.raises(KfpError, match="401.*token was refused"):
        submit_run(gateway.url, "e", str(tiny_package), {"message": "hi"}, token="nope")
    assert gateway.calls("POST", f"{API}/runs") == []


def test_read_token_sources(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert read_token() is None
    assert read_token(token=" from-env\n") == "from-env"
    path = tmp_path / "t"
    path.write_text("from-file\n")
    assert read_token(str(path), token="from-env") == "from-file"  # the explicit file wins
    monkeypatch.setattr(submit_module, "IN_CLUSTER_TOKEN", str(path))
    assert read_token(in_cluster=True) == "from-file"
    with pytest.raises(KfpError, match="cannot read the KFP token"):
        read_token(str(tmp_path / "missing"))
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(KfpError, match="is empty"):
        read_token(str(tmp_path / "empty"))


def test_cli_reads_kfp_token_at_call_time(gateway: FakeKfp, tiny_package: Path, tmp_path: Path,
                                          run_module, monkeypatch: pytest.MonkeyPatch) -> None:
    params = tmp_path / "p.yaml"
    params.write_text("message: hi\n")
    args = ("pipelines.submit", "--host", gateway.url, "--package", str(tiny_package),
            "--params", str(params), "--namespace", "team-a")
    assert_one_line_error(run_module(*args), "needs a token")
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    result = run_module(*args)
    assert result.returncode == 0, result.stderr
    assert gateway.calls("POST", f"{API}/runs")
    disabled = run_module("pipelines.schedule", "disable", "--host", gateway.url, "--name", "x",
                          "--namespace", "team-a")
    assert_one_line_error(disabled, "no recurring run named")  # got past the gateway


def test_retry_a_failed_run(gateway: FakeKfp, run_module, monkeypatch) -> None:
    """The backend's answer to a step that failed beyond its retries: POST .../runs/ID:retry,
    with the token; a run that did not fail is refused in one line."""
    from pipelines.retry import retry_run

    gateway.runs["run-9"] = {"run_id": "run-9", "state": "FAILED"}
    assert retry_run(gateway.url, "run-9", token="tok-123").endswith("/#/runs/details/run-9")
    (call,) = gateway.calls("POST", f"{API}/runs/run-9:retry")
    assert call.headers["Authorization"] == "Bearer tok-123"
    assert gateway.runs["run-9"]["state"] == "RUNNING"
    monkeypatch.setenv("KFP_TOKEN", "tok-123")
    result = run_module("pipelines.retry", "--host", gateway.url, "run-9")
    assert_one_line_error(result, "refused to retry run run-9", "Failed/Error")
