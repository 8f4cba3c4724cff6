"""Submit a compiled lungxray pipeline to a Kubeflow Pipelines API server.

    python -m pipelines.submit --host http://localhost:8080 --experiment lungxray \
        --package build/pipeline.yaml [--params params.yaml] [--run-name NAME]

Parameters are checked against the compiled package before anything is sent; any failure
(unreachable host, unknown parameter, wrong type, API error) is one line on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Mapping
from typing import Any

from lungxray.errors import LungxrayError
from pipelines.params import (
    ParamsError,
    apply_sets,
    check_image,
    executor_images,
    load_params,
    read_pipeline_spec,
)
from pipelines.params import validate_params as _validate_against_spec

HEALTHZ_PATH = "/apis/v2beta1/healthz"
EXIT_USAGE = 2
# Where a pod's projected ServiceAccount token for the KFP API lives in multi-user Kubeflow
# (audience pipelines.kubeflow.org; kfp.client.KF_PIPELINES_SA_TOKEN_PATH).
IN_CLUSTER_TOKEN = "/var/run/secrets/kubeflow/pipelines/token"
TOKEN_ENV = "KFP_TOKEN"


class KfpError(LungxrayError):
    """The KFP server is unreachable or refused a request; message is one line."""

    kind = "kfp"


def normalise_host(host: str) -> str:
    """KFP endpoint without trailing slash; a bare host:port means http, as port-forwards are."""
    host = host.strip()
    if not host:
        raise KfpError("no KFP host given (set KFP_HOST, e.g. http://localhost:8080)")
    if "://" not in host:
        host = "http://" + host
    return host.rstrip("/")


def read_token(token_file: str | None = None, in_cluster: bool = False,
               token: str | None = None) -> str | None:
    """The bearer token for the KFP API: given, read from a file, or the pod's projected
    ServiceAccount token; None for a single-user KFP that needs none."""
    if token_file or in_cluster:
        path = token_file or IN_CLUSTER_TOKEN
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read()
        except OSError as exc:
            raise KfpError(f"cannot read the KFP token from {path}: "
                           f"{exc.strerror or exc}") from None
        if not token.strip():
            raise KfpError(f"the KFP token file {path} is empty")
    return token.strip() if token and token.strip() else None


def check_health(host: str, timeout: float = 10.0, token: str | None = None) -> dict[str, Any]:
    """GET the v2beta1 healthz endpoint with a timeout; raise KfpError unless it answers JSON.

    kfp.Client probes healthz itself, but without a timeout and with 5 retries 5 s apart on
    HTTP errors, and a refused connection surfaces as a urllib3 traceback. One quick probe
    first gives a single clear line instead.
    """
    url = host + HEALTHZ_PATH
    # kfp.Client (urllib3) ignores *_proxy variables; do the same so both reach the same server.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    request = urllib.request.Request(url)
    if token:  # multi-user Kubeflow's gateway refuses even healthz without it
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with opener.open(request, timeout=timeout) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403):
            raise KfpError(
                f"KFP API at {host} answered HTTP {exc.code} {exc.reason}: "
                + ("the token was refused" if token else "it needs a token (KFP_TOKEN, "
                   "KFP_TOKEN_FILE or KFP_IN_CLUSTER=1)")
            ) from None
        raise KfpError(
            f"KFP API at {host} answered HTTP {exc.code} {exc.reason} on {HEALTHZ_PATH}; "
            "is KFP_HOST the ml-pipeline-ui port-forward?"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise KfpError(
            f"KFP API at {host} is unreachable ({reason}); run `make kfp-port-forward` "
            "or set KFP_HOST"
        ) from None
    try:
        info = json.loads(body or b"{}")
    except ValueError:
        raise KfpError(f"{url} did not answer with JSON; is {host} a KFP endpoint?") from None
    if not isinstance(info, dict):
        raise KfpError(f"{url} answered {info!r}, not a KFP healthz object")
    return info


def connect(host: str, namespace: str | None = None, timeout: float = 10.0,
            token: str | None = None):  # -> kfp.Client
    """Health-check the host, then return a kfp.Client for it (sending ``token`` as
    ``Authorization: Bearer`` on every request when given)."""
    host = normalise_host(host)
    check_health(host, timeout, token)
    import kfp  # deferred: importing kfp costs a second, not worth it for --help or bad params

    with warnings.catch_warnings():
        # Printed on every Client(): "This client only works with Kubeflow Pipeline v2.0.0-beta.2
        # and later versions." We talk to v2beta1 anyway.
        warnings.simplefilter("ignore", FutureWarning)
        # kfp.Client's default namespace is "kubeflow", which means "single-user" to it.
        return kfp.Client(host=host, namespace=namespace or "kubeflow",
                          existing_token=token or None)


def describe_api_error(exc: BaseException) -> str:
    """One line for a kfp_server_api.ApiException or a urllib3 transport error."""
    status = getattr(exc, "status", None)
    if status:
        message = ""
        body = getattr(exc, "body", None)
        if body:
            try:
                payload = json.loads(body)
                message = payload.get("message") or payload.get("error") or ""
            except (ValueError, AttributeError):
                message = body.decode() if isinstance(body, bytes) else str(body)
        text = f"KFP API error {status} {getattr(exc, 'reason', '') or ''}: {message}".strip()
    else:
        text = f"KFP API request failed: {exc}"
    text = " ".join(text.split())
    return text if len(text) <= 500 else text[:497] + "..."


def get_or_create_experiment(client, name: str, namespace: str | None = None) -> str:
    """ID of the experiment with this display name, created if missing."""
    try:
        return client.get_experiment(experiment_name=name, namespace=namespace).experiment_id
    except ValueError as exc:
        # kfp raises ValueError("No experiment is found with name ...") when it does not exist.
        if "No experiment is found" not in str(exc):
            raise KfpError(str(exc)) from None
    return client.create_experiment(name=name, namespace=namespace).experiment_id


def default_run_name(package_path: str) -> str:
    """`<pipeline name> <UTC timestamp>`, readable in the runs list."""
    name = read_pipeline_spec(package_path)["pipelineInfo"].get("name", "lungxray")
    return f"{name} {time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime())}"


def run_url(host: str, run_id: str) -> str:
    """Link to the run in the KFP UI."""
    return f"{normalise_host(host)}/#/runs/details/{run_id}"


def compiled_image(spec: Mapping[str, Any], expect_image: str) -> str:
    """The image the package references for ``expect_image``: itself, or the same reference
    pinned by digest (``IMAGE@sha256:...``, from ``make compile IMAGE_DIGEST=...``)."""
    pinned = sorted(i for i in executor_images(spec) if i.startswith(expect_image + "@sha256:"))
    return pinned[0] if pinned else expect_image


def check_registry(image: str) -> str:
    """Fail unless ``image`` is in its registry; credentials from REGISTRY_USER and
    REGISTRY_PASSWORD (read now, at call time), anonymous without them."""
    from pipelines.registry import RegistryError, check_pushed

    user, password = os.environ.get("REGISTRY_USER"), os.environ.get("REGISTRY_PASSWORD")
    try:
        return check_pushed(image, (user, password) if user and password else None)
    except RegistryError as exc:
        raise KfpError(str(exc)) from None


def prepare(host: str, experiment: str, package_path: str, params: Mapping[str, Any],
            expect_image: str | None, namespace: str | None, token: str | None = None,
            image_check: bool = True) -> tuple[Any, str, dict[str, Any]]:
    """Everything submit and schedule check before sending: the package's image (compiled for
    it, and in the registry), the params against its spec, the host; returns
    (client, experiment id, validated arguments)."""
    spec = read_pipeline_spec(package_path)
    if expect_image:  # first: parameters of a stale package are beside the point
        expect_image = compiled_image(spec, expect_image)
        check_image(spec, expect_image)
    arguments = _validate_against_spec(spec, params)
    if expect_image and image_check:  # a run whose pods cannot pull fails only in the cluster
        check_registry(expect_image)
    client = connect(host, namespace, token=token)
    return client, get_or_create_experiment(client, experiment, namespace), arguments


def submit_run(
    host: str,
    experiment: str,
    package_path: str,
    params: Mapping[str, Any],
    run_name: str | None = None,
    namespace: str | None = None,
    service_account: str | None = None,
    expect_image: str | None = None,
    enable_caching: bool | None = None,
    token: str | None = None,
    image_check: bool = True,
) -> tuple[str, str]:
    """Validate params, then create a run of the package in the experiment; return (run_id, url).

    `expect_image` guards against submitting a package compiled for another image tag;
    `enable_caching` None keeps the compiled per-task settings, True/False overrides them all.
    """
    client, experiment_id, arguments = prepare(host, experiment, package_path, params,
                                               expect_image, namespace, token, image_check)
    result = client.create_run_from_pipeline_package(
        pipeline_file=str(package_path),
        arguments=arguments,
        run_name=run_name or default_run_name(package_path),
        experiment_id=experiment_id,
        service_account=service_account or None,
        enable_caching=enable_caching,
    )
    url = run_url(host, result.run_id)
    print(f"Run URL: {url}")
    return result.run_id, url


CACHE_CHOICES = {"default": None, "on": True, "off": False}


def add_common_args(parser: argparse.ArgumentParser, cache_default: str = "default") -> None:
    """Options shared by submit and schedule."""
    parser.add_argument("--host", required=True, help="KFP endpoint, e.g. http://localhost:8080")
    parser.add_argument("--experiment", default="lungxray", help="experiment display name")
    parser.add_argument("--package", required=True, help="compiled pipeline YAML")
    parser.add_argument("--params", default="", help="YAML/JSON file with pipeline arguments")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                        help="one pipeline argument (overrides --params); repeatable")
    add_auth_args(parser)
    parser.add_argument("--service-account", default=None, help="Kubernetes SA of the run pods")
    parser.add_argument(
        "--expect-image", default=None, help="fail unless the package was compiled for this image"
    )
    parser.add_argument(
        "--no-image-check", action="store_true",
        help="do not ask the registry whether --expect-image exists before submitting",
    )
    parser.add_argument(
        "--cache",
        choices=sorted(CACHE_CHOICES),
        default=cache_default,
        help=f"KFP step caching: on, off, or as compiled (default: {cache_default})",
    )
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")


def add_auth_args(parser: argparse.ArgumentParser) -> None:
    """Multi-user Kubeflow: the profile namespace and where the bearer token comes from."""
    parser.add_argument("--namespace", default=None,
                        help="profile namespace (multi-user Kubeflow only)")
    parser.add_argument("--token-file", default=None,
                        help=f"file with a bearer token for the KFP API (else ${TOKEN_ENV})")
    parser.add_argument("--in-cluster", action="store_true",
                        help=f"use this pod's projected ServiceAccount token ({IN_CLUSTER_TOKEN})")


def token_from_args(args: argparse.Namespace) -> str | None:
    """The token the CLI options ask for; $KFP_TOKEN is read here, at call time."""
    return read_token(args.token_file, args.in_cluster, os.environ.get(TOKEN_ENV))


def one_line_error(exc: BaseException) -> str:
    """The message to print for an exception raised while submitting or scheduling."""
    import urllib3
    from kfp_server_api.exceptions import ApiException

    if isinstance(exc, ParamsError | KfpError):
        message = str(exc)
    elif isinstance(exc, ApiException | urllib3.exceptions.HTTPError):
        message = describe_api_error(exc)
    else:  # a bug or an unforeseen failure: say what, point at --verbose for the traceback
        message = f"unexpected {type(exc).__name__}: {exc} (rerun with --verbose for details)"
    return " ".join(message.split())


def run_cli(func: Callable[[], object], verbose: bool = False) -> int:
    """Call func(); turn any failure into `error: <one line>` on stderr and exit code 2."""
    try:
        func()
    except Exception as exc:
        if verbose:
            raise
        print(f"error: {one_line_error(exc)}", file=sys.stderr)
        return EXIT_USAGE
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.submit", description="Submit a compiled pipeline to KFP."
    )
    add_common_args(parser)
    parser.add_argument("--run-name", default=None, help="display name of the run")
    args = parser.parse_args(argv)

    def go() -> None:
        params = apply_sets(load_params(args.params) if args.params else {}, args.set)
        submit_run(
            args.host,
            args.experiment,
            args.package,
            params,
            run_name=args.run_name,
            namespace=args.namespace,
            service_account=args.service_account,
            expect_image=args.expect_image,
            enable_caching=CACHE_CHOICES[args.cache],
            token=token_from_args(args),
            image_check=not args.no_image_check,
        )

    return run_cli(go, args.verbose)


if __name__ == "__main__":
    sys.exit(main())
