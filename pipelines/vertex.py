"""Submit or schedule the compiled lungxray pipeline on Vertex AI Pipelines.

    python -m pipelines.vertex submit --project P --location us-central1 \
        --package build/pipeline-vertex.yaml --pipeline-root gs://BUCKET/pipelines [--params F]
    python -m pipelines.vertex schedule ... --cron "0 3 * * 1" --name lungxray-weekly

The package comes from ``python -m pipelines.compile --vertex-accelerator NVIDIA_L4`` (``make
compile-vertex``): the same pipeline, with a Vertex accelerator type instead of
``nvidia.com/gpu`` and no Kubernetes settings. Vertex cron has 5 fields (minutes first), unlike
KFP's 6. Credentials are Google's Application Default Credentials (``gcloud auth
application-default login``, or the VM's service account). Failures: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Mapping
from typing import Any

from pipelines.params import ParamsError, check_image, load_params, read_pipeline_spec
from pipelines.params import validate_params as _validate_against_spec
from pipelines.submit import EXIT_USAGE, KfpError, check_registry, compiled_image, default_run_name

_CRON_TZ = re.compile(r"^(?:CRON_TZ|TZ)=\S+\s+")


class VertexError(RuntimeError):
    """Vertex AI refused a request or could not be reached; one line."""


def validate_vertex_cron(expr: str) -> str:
    """Vertex takes a 5-field cron (minute hour day-of-month month day-of-week), optionally
    prefixed with ``TZ=Area/City``; a 6-field KFP expression gets a hint."""
    body = _CRON_TZ.sub("", expr.strip())
    fields = body.split()
    if len(fields) != 5:
        hint = ""
        if len(fields) == 6:
            hint = f"; drop KFP's seconds field, e.g. '{' '.join(fields[1:])}'"
        raise ParamsError(f"Vertex cron {expr!r} has {len(fields)} fields; it needs 5 (minute "
                          f"hour day-of-month month day-of-week){hint}")
    prefix = expr.strip()[: len(expr.strip()) - len(body)]
    return prefix + " ".join(fields)


def prepare_job(package: str, params: Mapping[str, Any], pipeline_root: str,
                expect_image: str | None, image_check: bool) -> tuple[dict[str, Any], str]:
    """Check the package (image, parameters) and the pipeline root; return the validated
    arguments and the image the package runs."""
    if not pipeline_root.startswith("gs://"):
        raise ParamsError(f"--pipeline-root {pipeline_root!r} must be a gs:// URI (Vertex "
                          "writes every artifact there)")
    spec = read_pipeline_spec(package)
    image = ""
    if expect_image:
        image = compiled_image(spec, expect_image)
        check_image(spec, image)
    arguments = _validate_against_spec(spec, params)
    if image and image_check:
        check_registry(image)
    return arguments, image


class _OneLineBucketWarning(logging.Filter):
    """PipelineJob.submit first gets or creates the pipeline root's bucket and, when that fails
    (no storage.buckets.get permission, say), logs a full traceback and goes on. Keep it to one
    line: Vertex itself refuses a job whose pipeline root it cannot write."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and "GCS bucket" in record.getMessage():
            reason = " ".join(str(record.exc_info[1]).split())[:200]
            record.msg = f"warning: could not check the pipeline root bucket: {reason}"
            record.args = ()
            record.exc_info = None
        return True


def init_vertex(project: str, location: str, api_endpoint: str | None = None,
                credentials: Any = None) -> None:
    """Point google-cloud-aiplatform at the project (and, for tests or a private endpoint, at
    another API endpoint over REST, which also accepts plain http)."""
    from google.cloud import aiplatform

    logger = logging.getLogger("google.cloud.aiplatform.pipeline_jobs")
    if not any(isinstance(f, _OneLineBucketWarning) for f in logger.filters):
        logger.addFilter(_OneLineBucketWarning())

    kwargs: dict[str, Any] = {"project": project, "location": location}
    if api_endpoint:
        kwargs.update(api_endpoint=api_endpoint, api_transport="rest")
    if credentials is not None:
        kwargs["credentials"] = credentials
    aiplatform.init(**kwargs)


def build_job(package: str, arguments: Mapping[str, Any], pipeline_root: str,
              display_name: str, enable_caching: bool | None, labels: Mapping[str, str]):
    """The aiplatform.PipelineJob for the compiled package (nothing sent yet)."""
    from google.cloud import aiplatform

    return aiplatform.PipelineJob(
        display_name=display_name,
        template_path=package,
        pipeline_root=pipeline_root,
        parameter_values=dict(arguments),
        enable_caching=enable_caching,
        labels=dict(labels),
    )


def _call(what: str, func: Any, *args: Any, **kwargs: Any) -> Any:
    """Run an aiplatform call, turning API and transport errors into one VertexError line."""
    from google.api_core import exceptions as api_exceptions
    from google.auth import exceptions as auth_exceptions

    try:
        return func(*args, **kwargs)
    except api_exceptions.GoogleAPIError as exc:
        message = getattr(exc, "message", None) or str(exc)
        raise VertexError(f"Vertex AI {what} failed: {' '.join(str(message).split())}") from None
    except auth_exceptions.DefaultCredentialsError:
        raise VertexError("no Google credentials: run `gcloud auth application-default "
                          "login` (or run on a VM with a service account)") from None
    except auth_exceptions.GoogleAuthError as exc:  # refresh or transport failure
        raise VertexError(f"Google authentication failed: {' '.join(str(exc).split())[:300]}"
                          ) from None
    except OSError as exc:
        raise VertexError(f"Vertex AI {what} failed: {exc}") from None


def submit_vertex(package: str, project: str, location: str, pipeline_root: str,
                  params: Mapping[str, Any], display_name: str | None = None,
                  service_account: str | None = None, enable_caching: bool | None = None,
                  expect_image: str | None = None, image_check: bool = True,
                  api_endpoint: str | None = None, credentials: Any = None) -> str:
    """Create a Vertex AI PipelineJob of the package; return its resource name."""
    arguments, _ = prepare_job(package, params, pipeline_root, expect_image, image_check)
    init_vertex(project, location, api_endpoint, credentials)
    job = build_job(package, arguments, pipeline_root,
                    display_name or default_run_name(package), enable_caching,
                    {"app": "lungxray"})
    _call("create pipeline job", job.submit, service_account=service_account or None)
    print(f"Vertex pipeline job: {job.resource_name}")
    return job.resource_name


def schedule_vertex(package: str, project: str, location: str, pipeline_root: str, cron: str,
                    name: str, params: Mapping[str, Any], service_account: str | None = None,
                    enable_caching: bool | None = False, expect_image: str | None = None,
                    image_check: bool = True, api_endpoint: str | None = None,
                    credentials: Any = None) -> str:
    """Create a Vertex AI schedule (one run at a time, no queueing); return its resource name.

    Caching is off by default for the reason given in pipelines/schedule.py: every trigger
    sends the same arguments.
    """
    cron = validate_vertex_cron(cron)
    if not name.strip():
        raise ParamsError("a schedule needs a name (SCHEDULE_NAME)")
    arguments, _ = prepare_job(package, params, pipeline_root, expect_image, image_check)
    init_vertex(project, location, api_endpoint, credentials)
    job = build_job(package, arguments, pipeline_root, name, enable_caching, {"app": "lungxray"})
    created = _call("create schedule", job.create_schedule, cron=cron, display_name=name,
                    max_concurrent_run_count=1, allow_queueing=False,
                    service_account=service_account or None)
    print(f"Vertex schedule {name!r} created: {created.resource_name} (cron {cron!r})")
    return created.resource_name


CACHE_CHOICES = {"default": None, "on": True, "off": False}


def _add_args(parser: argparse.ArgumentParser, cache_default: str) -> None:
    parser.add_argument("--project", required=True, help="Google Cloud project id")
    parser.add_argument("--location", default="us-central1", help="Vertex AI region")
    parser.add_argument("--package", required=True, help="compiled pipeline YAML")
    parser.add_argument("--pipeline-root", required=True, help="gs:// folder for artifacts")
    parser.add_argument("--params", default="", help="YAML/JSON file with pipeline arguments")
    parser.add_argument("--service-account", default=None, help="service account of the run")
    parser.add_argument("--expect-image", default=None,
                        help="fail unless the package was compiled for this image")
    parser.add_argument("--no-image-check", action="store_true",
                        help="do not ask the registry whether --expect-image exists")
    parser.add_argument("--cache", choices=sorted(CACHE_CHOICES), default=cache_default,
                        help=f"step caching: on, off, or as compiled (default {cache_default})")
    parser.add_argument("--api-endpoint", default=None,
                        help="another Vertex API endpoint (REST), e.g. a private one")
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.vertex",
                                     description="Run the pipeline on Vertex AI Pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)
    submit = sub.add_parser("submit", help="create one pipeline job")
    _add_args(submit, "default")
    submit.add_argument("--run-name", default=None, help="display name of the job")
    schedule = sub.add_parser("schedule", help="create a recurring schedule")
    _add_args(schedule, "off")
    schedule.add_argument("--cron", required=True, help="5-field cron, e.g. '0 3 * * 1'")
    schedule.add_argument("--name", required=True, help="display name of the schedule")
    args = parser.parse_args(argv)
    common = dict(service_account=args.service_account,
                  enable_caching=CACHE_CHOICES[args.cache], expect_image=args.expect_image,
                  image_check=not args.no_image_check, api_endpoint=args.api_endpoint)
    try:
        params = load_params(args.params) if args.params else {}
        if args.command == "submit":
            submit_vertex(args.package, args.project, args.location, args.pipeline_root,
                          params, display_name=args.run_name, **common)
        else:
            schedule_vertex(args.package, args.project, args.location, args.pipeline_root,
                            args.cron, args.name, params, **common)
    except (ParamsError, KfpError, VertexError) as exc:
        if args.verbose:
            raise
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
