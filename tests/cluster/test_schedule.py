"""pipelines.schedule: cron validation and recurring runs against the fake KFP server."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.params import ParamsError
from pipelines.schedule import schedule, unschedule, validate_cron
from pipelines.submit import KfpError
from tests.cluster.fake_kfp import API, FakeKfp
from tests.cluster.helpers import assert_one_line_error, task_caching


@pytest.mark.parametrize(
    "expr",
    [
        "0 0 3 * * *",
        "0 */15 * * * MON-FRI",
        "0 0 9 ? * 2-6",
        "30 0 0 1 JAN,JUL ?",
        "0 0 0,12 1-15/2 * *",
        "  0  0  3 * * *  ",
    ],
)
def test_valid_six_field_cron(expr: str) -> None:
    assert validate_cron(expr) == " ".join(expr.split())


@pytest.mark.parametrize(
    ("expr", "needle"),
    [
        ("0 3 * * *", "has 5 fields; KFP needs 6"),
        ("0 0 3 * * * *", "has 7 fields"),
        ("@daily", "has 1 fields"),
        ("0 0 24 * * *", "hours field: 24 is outside 0-23"),
        ("60 0 0 * * *", "seconds field: 60 is outside 0-59"),
        ("0 0 0 0 * *", "day-of-month field: 0 is outside 1-31"),
        ("0 0 0 * 13 *", "month field: 13 is outside 1-12"),
        ("0 0 0 * * 7", "day-of-week field: 7 is outside 0-6"),
        ("0 0 5-2 * * *", "range '5-2' is reversed"),
        ("0 */0 * * * *", "step 0"),
        ("? 0 0 * * *", "'?' is only allowed"),
        ("0 0 0 * FOO *", "month field: 'FOO' is not a number"),
        ("0 0 0 * * 1;2", "is not valid"),
    ],
)
def test_invalid_cron(expr: str, needle: str) -> None:
    with pytest.raises(ParamsError) as err:
        validate_cron(expr)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_five_field_cron_error_suggests_the_six_field_form() -> None:
    with pytest.raises(ParamsError, match=r"e\.g\. '0 0 3 \* \* \*'"):
        validate_cron("0 3 * * *")


def recurring_body(fake: FakeKfp) -> dict:
    (call,) = fake.calls("POST", f"{API}/recurringruns")
    return call.body


def test_schedule_sends_cron_and_run_policy(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    rr_id = schedule(
        fake_kfp.url,
        "nightly-exp",
        str(tiny_package),
        "0 0 3 * * *",
        {"message": "night", "epochs": 2},
        "lungxray-nightly",
        service_account="lungxray-pipeline-runner",
    )
    body = recurring_body(fake_kfp)
    experiment_id = next(iter(fake_kfp.experiments))
    assert fake_kfp.experiments[experiment_id]["display_name"] == "nightly-exp"
    assert body["experiment_id"] == experiment_id
    assert body["display_name"] == "lungxray-nightly"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 3 * * *"}}
    assert body["no_catchup"] is True
    assert body["max_concurrency"] == 1
    assert body["mode"] == "ENABLE"
    assert body["service_account"] == "lungxray-pipeline-runner"
    assert body["runtime_config"]["parameters"] == {"message": "night", "epochs": 2}
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "tiny-lungxray"
    assert rr_id == next(iter(fake_kfp.recurring_runs))


def test_schedule_refuses_a_second_enabled_copy(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    exp = fake_kfp.add_experiment("lungxray")
    existing = fake_kfp.add_recurring_run("nightly", exp["experiment_id"])
    with pytest.raises(KfpError, match=f"already enabled \\(id {existing['recurring_run_id']}\\)"):
        schedule(
            fake_kfp.url, "lungxray", str(tiny_package), "0 0 3 * * *", {"message": "m"}, "nightly"
        )
    assert fake_kfp.calls("POST", f"{API}/recurringruns") == []


def test_schedule_ignores_disabled_copies_and_other_experiments(
    fake_kfp: FakeKfp, tiny_package: Path
) -> None:
    exp = fake_kfp.add_experiment("lungxray")
    other = fake_kfp.add_experiment("elsewhere")
    fake_kfp.add_recurring_run("nightly", exp["experiment_id"], mode="DISABLE")
    fake_kfp.add_recurring_run("nightly", other["experiment_id"])
    schedule(
        fake_kfp.url, "lungxray", str(tiny_package), "0 0 3 * * *", {"message": "m"}, "nightly"
    )
    assert recurring_body(fake_kfp)["experiment_id"] == exp["experiment_id"]


def test_schedule_validates_before_sending(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    with pytest.raises(ParamsError, match="5 fields"):
        schedule(fake_kfp.url, "e", str(tiny_package), "0 3 * * *", {"message": "m"}, "n")
    with pytest.raises(ParamsError, match="unknown pipeline parameter"):
        schedule(fake_kfp.url, "e", str(tiny_package), "0 0 3 * * *", {"msg": "m"}, "n")
    assert fake_kfp.requests == []


def test_unschedule_disables_every_enabled_match_across_pages(fake_kfp: FakeKfp) -> None:
    exp = fake_kfp.add_experiment("lungxray")["experiment_id"]
    # More than one page (the client asks for 100 at a time).
    targets = [fake_kfp.add_recurring_run("nightly", exp) for _ in range(101)]
    already_off = fake_kfp.add_recurring_run("nightly", exp, mode="DISABLE")
    bystander = fake_kfp.add_recurring_run("weekly", exp)

    disabled = unschedule(fake_kfp.url, "nightly")

    assert sorted(disabled) == sorted(t["recurring_run_id"] for t in targets)
    disable_calls = {c.path for c in fake_kfp.calls("POST")}
    assert f"{API}/recurringruns/{targets[-1]['recurring_run_id']}:disable" in disable_calls
    assert f"{API}/recurringruns/{already_off['recurring_run_id']}:disable" not in disable_calls
    assert fake_kfp.recurring_runs[bystander["recurring_run_id"]]["mode"] == "ENABLE"
    assert all(fake_kfp.recurring_runs[t["recurring_run_id"]]["mode"] == "DISABLE" for t in targets)


def test_unschedule_by_id(fake_kfp: FakeKfp) -> None:
    exp = fake_kfp.add_experiment("lungxray")["experiment_id"]
    rr = fake_kfp.add_recurring_run("nightly", exp)
    assert unschedule(fake_kfp.url, rr["recurring_run_id"]) == [rr["recurring_run_id"]]
    assert fake_kfp.recurring_runs[rr["recurring_run_id"]]["mode"] == "DISABLE"


def test_unschedule_unknown_name(fake_kfp: FakeKfp) -> None:
    with pytest.raises(KfpError, match="no recurring run named or with id 'ghost'"):
        unschedule(fake_kfp.url, "ghost")


# ---- the CLI, as `make schedule` / `make unschedule` run it -------------------------------------


def test_cli_create_and_disable(fake_kfp: FakeKfp, tiny_package: Path, tmp_path: Path, run_module):
    params = tmp_path / "params.yaml"
    params.write_text("message: cli\n")
    created = run_module(
        "pipelines.schedule", "create", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--params", str(params), "--cron", "0 30 2 * * *", "--name", "cli-nightly",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    body = recurring_body(fake_kfp)
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 2 * * *"
    assert body["runtime_config"]["parameters"] == {"message": "cli"}
    assert body["display_name"] == "cli-nightly"

    disabled = run_module(
        "pipelines.schedule", "disable", "--host", fake_kfp.url, "--name", "cli-nightly"
    )
    assert disabled.returncode == 0, disabled.stderr
    rr_id = next(iter(fake_kfp.recurring_runs))
    assert fake_kfp.calls("POST", f"{API}/recurringruns/{rr_id}:disable")


def test_cli_bad_cron_is_one_line_and_sends_nothing(
    fake_kfp: FakeKfp, tiny_package: Path, run_module
) -> None:
    result = run_module(
        "pipelines.schedule", "create", "--host", fake_kfp.url, "--package", str(tiny_package),
        "--cron", "0 3 * * *", "--name", "n",
    )  # fmt: skip
    assert_one_line_error(result, "cron '0 3 * * *' has 5 fields")
    assert fake_kfp.requests == []


def test_cli_disable_unknown_and_unreachable(
    fake_kfp: FakeKfp, closed_port_url: str, run_module
) -> None:
    result = run_module("pipelines.schedule", "disable", "--host", fake_kfp.url, "--name", "x")
    assert_one_line_error(result, "no recurring run named or with id 'x'")
    result = run_module("pipelines.schedule", "disable", "--host", closed_port_url, "--name", "x")
    assert_one_line_error(result, "unreachable")


def test_schedule_turns_caching_off_by_default(fake_kfp: FakeKfp, tiny_package: Path) -> None:
    """Every trigger sends the same arguments; cached steps would never retrain."""
    schedule(fake_kfp.url, "e", str(tiny_package), "0 0 3 * * *", {"message": "m"}, "a")
    schedule(
        fake_kfp.url, "e", str(tiny_package), "0 0 3 * * *", {"message": "m"}, "b",
        enable_caching=None,
    )  # fmt: skip
    first, second = (c.body for c in fake_kfp.calls("POST", f"{API}/recurringruns"))
    assert task_caching(first) == [False]
    assert task_caching(second) == [True]
