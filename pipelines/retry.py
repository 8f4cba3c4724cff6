"""Retry a failed KFP run: ``python -m pipelines.retry --host URL RUN_ID``.

The KFP 2.17 backend's own answer to a step that failed beyond its retries (e.g. a GPU node
preempted): ``POST /apis/v2beta1/runs/{id}:retry``, the UI's "Retry" button. The API server
resets the failed and errored nodes of the run's Argo Workflow and deletes their pods
(backend/src/apiserver/resource/resource_manager.go RetryRun, common/util/workflow.go
GenerateRetryExecution); steps that succeeded are kept. With ``CACHE_PVC`` the retried tune and
train steps resume from the checkpoints on the volume. Failures: one line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request

from pipelines.submit import (
    KfpError,
    add_auth_args,
    check_health,
    normalise_host,
    run_cli,
    run_url,
    token_from_args,
)


def retry_run(host: str, run_id: str, token: str | None = None, timeout: float = 30.0) -> str:
    """Ask KFP to retry the failed run; return its UI URL."""
    host = normalise_host(host)
    check_health(host, timeout, token)
    url = f"{host}/apis/v2beta1/runs/{urllib.parse.quote(run_id, safe='')}:retry"
    request = urllib.request.Request(url, data=b"", method="POST")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=timeout):
            pass
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read() or b"{}").get("message", "")
        except ValueError:
            message = ""
        raise KfpError(f"KFP refused to retry run {run_id}: HTTP {exc.code} "
                       f"{message or exc.reason} (only a Failed or Error run can be "
                       "retried)") from None
    except (urllib.error.URLError, OSError) as exc:
        raise KfpError(f"KFP API at {host} is unreachable "
                       f"({getattr(exc, 'reason', exc)})") from None
    link = run_url(host, run_id)
    print(f"Retrying run {run_id}: {link}")
    return link


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.retry",
                                     description="Retry a failed KFP run.")
    parser.add_argument("run_id", help="id of the failed run (the end of its URL)")
    parser.add_argument("--host", required=True, help="KFP endpoint, e.g. http://localhost:8080")
    add_auth_args(parser)  # --namespace is accepted for symmetry; the run id is global
    parser.add_argument("--verbose", action="store_true", help="show tracebacks on errors")
    args = parser.parse_args(argv)
    return run_cli(lambda: retry_run(args.host, args.run_id, token_from_args(args)),
                   args.verbose)


if __name__ == "__main__":
    sys.exit(main())
