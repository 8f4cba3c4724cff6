"""Run the same pipeline on this machine through ``kfp.local`` (SubprocessRunner).

``python -m pipelines.local --profile quick --set data_source=... --set weights=none``
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

from kfp import compiler

from lungxray import artifacts, schema, site_report
from lungxray.errors import ConfigError
from pipelines.params import (
    ParamsError,
    apply_sets,
    load_params,
    read_pipeline_spec,
    validate_params,
)
from pipelines.pipeline import build_pipeline
from pipelines.profiles import PROFILES, resolve_params

# One model's training keeps about 1.5 of 2 cores busy at 32 px; two at once fill them.
# Measured on 2026-12-07 (bench/local_runs.md): PROFILE=full with the NIH site took 28.8 min
# at 149% CPU one model at a time and 24.5 min at 171% two at a time, the same results, peak
# RSS 2.3 GB per step either way.
LOCAL_PARALLELISM = 2


def run_local(params: dict, pipeline_root: Path, parallelism: int = 1) -> Path:
    """Run the whole pipeline locally; returns the path of the comparison report.

    ``parallelism``: base models trained at once (the command line's default is
    :data:`LOCAL_PARALLELISM`).
    """
    from kfp import local

    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root),
               raise_on_error=True)
    run = build_pipeline(parallelism=parallelism)(**params)
    return Path(run.output.path)


def cli_params(profile: str, params_file: Path | None, sets: list[str]) -> dict:
    """The run's parameters: pipeline defaults, then the profile, then the PARAMS file, then each
    ``--set name=value`` (parsed like the file's values); names, types and values checked as
    submit checks them, before anything runs."""
    overrides = apply_sets(load_params(params_file) if params_file else {}, sets)
    params = resolve_params(profile, overrides)
    try:  # before compiling (seconds): a local target_data must exist here
        schema.check_locations(params, local_run=True)
    except ConfigError as err:
        raise ParamsError(str(err)) from None
    with tempfile.TemporaryDirectory() as tmp:
        package = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(), str(package))
        spec = read_pipeline_spec(package)
    return validate_params(spec, params)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick", choices=sorted(PROFILES),
                        help="named parameter set (default quick)")
    parser.add_argument("--params", type=Path, default=None,
                        help="YAML/JSON file of pipeline parameters (override the profile)")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="one pipeline parameter (overrides --params); repeatable")
    parser.add_argument("--pipeline-root", type=Path, default=Path("local_outputs"),
                        help="where kfp.local keeps artifacts (default ./local_outputs)")
    parser.add_argument("--parallelism", type=int, default=LOCAL_PARALLELISM,
                        help=f"base models run at once (default {LOCAL_PARALLELISM}; 1 where "
                        "memory is short, e.g. large images)")
    args = parser.parse_args(argv)
    try:
        params = cli_params(args.profile, args.params, args.set)
    except ValueError as err:  # ParamsError is one
        print(f"pipelines.local: error: {err}", file=sys.stderr)
        return 2
    print("pipeline parameters:", json.dumps(params), flush=True)
    try:
        report = run_local(params, args.pipeline_root.resolve(), args.parallelism)
    except RuntimeError as err:  # kfp.local: "Task ... finished with status FAILURE"
        message = " ".join(re.sub(r"\x1b\[[0-9;]*m", "", str(err)).split())  # no colours
        print(f"pipelines.local: error: {message} (the step's own error is in its log above)",
              file=sys.stderr)
        return 1
    print(f"\nReport: {report}\nShipped model: {report.parent / 'model'}")
    summary = report.parent / "summary"  # report.md: the pick per site, held-out sites, refit
    if summary.is_file():
        text = summary.read_text(encoding="utf-8")
        for line in text.splitlines():
            if line.startswith((site_report.PICK_PREFIX, site_report.HELD_PREFIX)):
                print(line)
        refit_section = text.rfind(f"## {artifacts.REFIT_SECTION_TITLE}")
        if refit_section >= 0:  # the pick as measured beside the model shipped
            print(text[refit_section:].rstrip())
    decision = report.parent.parent / "challenge" / "decision" / "decision.json"
    if decision.is_file():  # champion/challenger: what this run did with champion_uri
        record = json.loads(decision.read_text())
        print(f"Champion: {record['decision']}: {record['reason']}")
    estimate = report.parent.parent / "predict" / "predictions" / artifacts.PREVALENCE_FILE
    if estimate.is_file():  # target_data: the pick's EM estimate of the site's prevalence
        found = json.loads(estimate.read_text())
        low, high = found["ci"] or (float("nan"), float("nan"))
        print(f"Target prevalence ({found['positive_class']}): {found['estimate']:.3f} "
              f"[95% CI {low:.3f}, {high:.3f}] over {found['n']} images; the pick's threshold "
              f"there would be {found['bayes_threshold_at_estimate']:.3f}: "
              f"{estimate.parent}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
