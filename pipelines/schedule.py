"""Create or disable recurring runs of the compiled lungxray pipeline on Kubeflow Pipelines.

    python -m pipelines.schedule create --host URL --package build/pipeline.yaml \
        --cron "0 0 3 * * *" --name lungxray-nightly [--params params.yaml]
    python -m pipelines.schedule disable --host URL --name lungxray-nightly

KFP cron has 6 fields, seconds first. The expression and the parameters are checked before
anything is sent; failures are one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping
from typing import Any

from pipelines.params import ParamsError, apply_sets, load_params
from pipelines.submit import (
    CACHE_CHOICES,
    KfpError,
    add_auth_args,
    add_common_args,
    connect,
    prepare,
    run_cli,
    token_from_args,
)

CRON_FIELDS = ("seconds", "minutes", "hours", "day-of-month", "month", "day-of-week")
_RANGES = ((0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 6))
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_NAMES = {4: {m: i + 1 for i, m in enumerate(_MONTHS)}, 5: {d: i for i, d in enumerate(_DAYS)}}
_PART = re.compile(r"^(?P<base>\*|\?|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")
# Anything but an explicit DISABLE counts as live, so an unset mode is never left running.
DISABLED = "DISABLE"


def _cron_value(token: str, index: int) -> int:
    """A number or a month/day name of field `index`, range-checked."""
    low, high = _RANGES[index]
    names = _NAMES.get(index, {})
    if token.upper() in names:
        return names[token.upper()]
    if not token.isdigit():
        raise ParamsError(f"cron {CRON_FIELDS[index]} field: {token!r} is not a number")
    value = int(token)
    if not low <= value <= high:
        raise ParamsError(f"cron {CRON_FIELDS[index]} field: {value} is outside {low}-{high}")
    return value


def validate_cron(expr: str) -> str:
    """Check a KFP (robfig/cron) 6-field expression: seconds minutes hours dom month dow.

    Returns the expression with whitespace normalised; raises ParamsError with one line.
    """
    fields = expr.split()
    if len(fields) != 6:
        hint = ""
        if len(fields) == 5:
            hint = f"; prepend the seconds, e.g. '0 {' '.join(fields)}'"
        raise ParamsError(
            f"cron {expr!r} has {len(fields)} fields; KFP needs 6 ({' '.join(CRON_FIELDS)}){hint}"
        )
    for index, field in enumerate(fields):
        for part in field.split(","):
            match = _PART.match(part)
            if not match:
                raise ParamsError(f"cron {CRON_FIELDS[index]} field: {part!r} is not valid")
            base, step = match["base"], match["step"]
            if base == "?" and index not in (3, 5):
                raise ParamsError(
                    f"cron {CRON_FIELDS[index]} field: '?' is only allowed in day-of-month "
                    "and day-of-week"
                )
            if step is not None and int(step) == 0:
                raise ParamsError(f"cron {CRON_FIELDS[index]} field: step 0 in {part!r}")
            if base in ("*", "?"):
                continue
            low, _, high = base.partition("-")
            first = _cron_value(low, index)
            if high and _cron_value(high, index) < first:
                raise ParamsError(f"cron {CRON_FIELDS[index]} field: range {base!r} is reversed")
    return " ".join(fields)


def _name_filter(name: str) -> str:
    return json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": name}]}
    )


def find_recurring_runs(client, name: str, experiment_id: str | None = None) -> list[Any]:
    """All recurring runs with this display name (every page), optionally in one experiment."""
    found: list[Any] = []
    token = ""
    while True:
        page = client.list_recurring_runs(
            page_token=token, page_size=100, experiment_id=experiment_id, filter=_name_filter(name)
        )
        # The server filters already; re-check so a server that ignores filters cannot make us
        # disable the wrong schedule.
        found.extend(r for r in page.recurring_runs or [] if r.display_name == name)
        token = page.next_page_token or ""
        if not token:
            return found


def schedule(
    host: str,
    experiment: str,
    package_path: str,
    cron: str,
    params: Mapping[str, Any],
    name: str,
    namespace: str | None = None,
    service_account: str | None = None,
    expect_image: str | None = None,
    enable_caching: bool | None = False,
    token: str | None = None,
    image_check: bool = True,
) -> str:
    """Create an enabled recurring run (no catch-up, one run at a time); return its id.

    Caching is off by default: every trigger sends the same arguments, so with caching on each
    scheduled run would be served entirely from the first one's results, even after new data
    landed under the same URI. Pass None to keep the compiled settings (then vary data_version).

    Refuses when an enabled recurring run with the same name already exists in the experiment:
    two copies of a nightly schedule would train twice every night.
    """
    cron = validate_cron(cron)
    if not name.strip():
        raise ParamsError("a recurring run needs a name (SCHEDULE_NAME)")
    client, experiment_id, arguments = prepare(host, experiment, package_path, params,
                                               expect_image, namespace, token, image_check)
    clash = [r for r in find_recurring_runs(client, name, experiment_id) if r.mode != DISABLED]
    if clash:
        raise KfpError(
            f"recurring run {name!r} is already enabled (id {clash[0].recurring_run_id}); "
            "run `make unschedule` first or pick another SCHEDULE_NAME"
        )
    created = client.create_recurring_run(
        experiment_id=experiment_id,
        job_name=name,
        cron_expression=cron,
        # A cluster that was down all weekend should run once on Monday, not three times.
        no_catchup=True,
        # A slow run must not overlap the next trigger: both would want the same GPUs.
        max_concurrency=1,
        enabled=True,
        params=arguments,
        pipeline_package_path=str(package_path),
        service_account=service_account or None,
        enable_caching=enable_caching,
    )
    print(f"Recurring run {name!r} created: {created.recurring_run_id} (cron {cron!r})")
    return created.recurring_run_id


def unschedule(host: str, name_or_id: str, namespace: str | None = None,
               token: str | None = None) -> list[str]:
    """Disable every enabled recurring run with this display name (or this id); return the ids."""
    client = connect(host, namespace, token=token)
    runs = find_recurring_runs(client, name_or_id)
    if not runs:
        from kfp_server_api.exceptions import ApiException

        try:
            runs = [client.get_recurring_run(recurring_run_id=name_or_id)]
        except ApiException:
            raise KfpError(f"no recurring run named or with id {name_or_id!r}") from None
    disabled = []
    for run in runs:
        if run.mode == DISABLED:
            continue
        client.disable_recurring_run(recurring_run_id=run.recurring_run_id)
        disabled.append(run.recurring_run_id)
    if disabled:
        print(f"Disabled recurring run(s) {', '.join(disabled)} ({name_or_id!r})")
    else:
        print(f"Recurring run(s) {name_or_id!r} already disabled")
    return disabled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.schedule", description="Manage recurring runs on KFP."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create an enabled recurring run")
    add_common_args(create, cache_default="off")
    create.add_argument("--cron", required=True, help="6-field cron, e.g. '0 0 3 * * *'")
    create.add_argument("--name", required=True, help="display name of the recurring run")
    disable = sub.add_parser("disable", help="disable recurring runs by name or id")
    disable.add_argument("--host", required=True, help="KFP endpoint, e.g. http://localhost:8080")
    disable.add_argument("--name", required=True, help="display name or id of the recurring run")
    add_auth_args(disable)
    disable.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)

    if args.command == "create":

        def go() -> object:
            params = apply_sets(load_params(args.params) if args.params else {}, args.set)
            return schedule(
                args.host,
                args.experiment,
                args.package,
                args.cron,
                params,
                args.name,
                namespace=args.namespace,
                service_account=args.service_account,
                expect_image=args.expect_image,
                enable_caching=CACHE_CHOICES[args.cache],
                token=token_from_args(args),
                image_check=not args.no_image_check,
            )

    else:

        def go() -> object:
            return unschedule(args.host, args.name, namespace=args.namespace,
                              token=token_from_args(args))

    return run_cli(go, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
