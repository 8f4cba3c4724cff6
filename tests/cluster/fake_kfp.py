"""A small in-process stand-in for the Kubeflow Pipelines v2beta1 REST API, for tests.

It answers the paths kfp 2.17's `kfp.Client` calls (kfp/client/client.py, through the generated
kfp_server_api), keeps experiments, runs and recurring runs in memory, and records every request
(method, path, query, JSON body) so tests can assert on exactly what was sent. JSON field names
follow kfp_server_api's attribute maps (snake_case, except ListRecurringRunsResponse.recurringRuns).

With ``token`` set it acts like multi-user Kubeflow's gateway: every request without
``Authorization: Bearer <token>`` gets 401.

It is not KFP: no validation of pipeline specs, no scheduling, nothing runs.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

API = "/apis/v2beta1"
NOW = "2026-01-01T00:00:00Z"


@dataclass
class Request:
    """One recorded HTTP request."""

    method: str
    path: str
    query: dict[str, str]
    body: Any = None  # parsed JSON, or for multipart uploads {"fields": ..., "files": ...}
    headers: dict[str, str] = field(default_factory=dict)


class FakeKfp:
    """The fake server. Use as a context manager; `url` is its http://127.0.0.1:PORT."""

    def __init__(self, multi_user: bool = False, token: str | None = None) -> None:
        self.multi_user = multi_user
        self.token = token
        self.requests: list[Request] = []
        self.experiments: dict[str, dict] = {}
        self.runs: dict[str, dict] = {}
        self.recurring_runs: dict[str, dict] = {}
        self.pipelines: dict[str, dict] = {}
        self._failures: list[tuple[str, str, int, str]] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------
    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeKfp:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    # ---- test helpers ----------------------------------------------------------------------
    def fail(self, method: str, path: str, status: int, message: str) -> None:
        """Answer the next `method path` request with an error status and a KFP-style body."""
        self._failures.append((method, path, status, message))

    def calls(self, method: str | None = None, path: str | None = None) -> list[Request]:
        """Recorded requests, optionally only those with this method and/or exact path."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (path is None or r.path == path)
        ]

    def add_experiment(self, name: str, namespace: str = "") -> dict:
        """Pre-create an experiment as if an earlier session had made it."""
        return self._create_experiment({"display_name": name, "namespace": namespace})

    def add_recurring_run(self, name: str, experiment_id: str, mode: str = "ENABLE") -> dict:
        """Pre-create a recurring run with this display name and mode."""
        return self._create_recurring_run(
            {"display_name": name, "experiment_id": experiment_id, "mode": mode}
        )

    def _new_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):04d}"

    # ---- state changes ---------------------------------------------------------------------
    def _create_experiment(self, body: dict) -> dict:
        exp = {
            "experiment_id": self._new_id("exp"),
            "display_name": body.get("display_name", ""),
            "description": body.get("description") or "",
            "namespace": body.get("namespace") or "",
            "created_at": NOW,
            "storage_state": "AVAILABLE",
        }
        self.experiments[exp["experiment_id"]] = exp
        return exp

    def _create_recurring_run(self, body: dict) -> dict:
        rr = dict(body)
        rr.update(
            recurring_run_id=self._new_id("rr"),
            created_at=NOW,
            updated_at=NOW,
            status="ENABLED" if body.get("mode") == "ENABLE" else "DISABLED",
        )
        self.recurring_runs[rr["recurring_run_id"]] = rr
        return rr

    # ---- routing ---------------------------------------------------------------------------
    def _route(self, method: str, path: str, query: dict[str, str], body: Any,
               headers: dict[str, str] | None = None) -> tuple[int, Any]:
        if self.token and (headers or {}).get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "Unauthorized", "code": 16, "message": "Unauthorized"}
        for i, (m, p, status, message) in enumerate(self._failures):
            if m == method and p == path:
                del self._failures[i]
                return status, {"error": message, "code": 3, "message": message}

        if method == "GET" and path == f"{API}/healthz":
            return 200, {"multi_user": self.multi_user, "pipeline_store": "database"}

        if path == f"{API}/experiments":
            if method == "POST":
                return 200, self._create_experiment(body or {})
            items = list(self.experiments.values())
            items = _apply_filter(items, query.get("filter"))
            return 200, _page(items, "experiments", query)
        if method == "GET" and path.startswith(f"{API}/experiments/"):
            exp = self.experiments.get(path.rsplit("/", 1)[1])
            return (200, exp) if exp else _not_found("experiment")

        if path == f"{API}/runs":
            if method == "POST":
                run = dict(body or {})
                run.update(run_id=self._new_id("run"), state="PENDING", created_at=NOW)
                if query.get("experiment_id"):
                    run["experiment_id"] = query["experiment_id"]
                self.runs[run["run_id"]] = run
                return 200, run
            items = _apply_filter(list(self.runs.values()), query.get("filter"))
            return 200, _page(items, "runs", query)
        if method == "POST" and path.startswith(f"{API}/runs/") and path.endswith(":retry"):
            run = self.runs.get(path.rsplit("/", 1)[1].removesuffix(":retry"))
            if run is None:
                return _not_found("run")
            if run.get("state") not in ("FAILED", "ERROR"):  # as the backend's RetryRun
                return 400, {"error": "Workflow must be Failed/Error to retry", "code": 9,
                             "message": "Workflow must be Failed/Error to retry"}
            run["state"] = "RUNNING"
            return 200, {}
        if method == "GET" and path.startswith(f"{API}/runs/"):
            run = self.runs.get(path.rsplit("/", 1)[1])
            return (200, run) if run else _not_found("run")

        if path == f"{API}/recurringruns":
            if method == "POST":
                return 200, self._create_recurring_run(body or {})
            items = list(self.recurring_runs.values())
            if query.get("experiment_id"):
                items = [r for r in items if r.get("experiment_id") == query["experiment_id"]]
            items = _apply_filter(items, query.get("filter"))
            return 200, _page(items, "recurringRuns", query)
        if path.startswith(f"{API}/recurringruns/"):
            rr_id, _, action = path.rsplit("/", 1)[1].partition(":")
            rr = self.recurring_runs.get(rr_id)
            if rr is None:
                return _not_found("recurring run")
            if method == "POST" and action in ("enable", "disable"):
                rr["mode"] = "ENABLE" if action == "enable" else "DISABLE"
                rr["status"] = "ENABLED" if action == "enable" else "DISABLED"
                return 200, {}
            if method == "GET" and not action:
                return 200, rr

        if method == "POST" and path == f"{API}/pipelines/upload":
            pipe = {
                "pipeline_id": self._new_id("pipe"),
                "display_name": query.get("display_name") or query.get("name") or "",
                "created_at": NOW,
            }
            self.pipelines[pipe["pipeline_id"]] = pipe
            return 200, pipe

        return 404, {"error": f"no route {method} {path}", "code": 5, "message": "Not Found"}

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # keep pytest output clean
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                ctype = self.headers.get("Content-Type", "")
                body: Any = None
                if raw and ctype.startswith("multipart/form-data"):
                    body = _parse_multipart(ctype, raw)
                elif raw:
                    body = json.loads(raw)
                with fake._lock:
                    fake.requests.append(
                        Request(self.command, parts.path, query, body, _headers(self.headers))
                    )
                    status, payload = fake._route(self.command, parts.path, query, body,
                                                  _headers(self.headers))
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_DELETE = do_PATCH = _handle

        return Handler


def _not_found(what: str) -> tuple[int, dict]:
    return 404, {"error": f"{what} not found", "code": 5, "message": f"{what} not found"}


def _apply_filter(items: list[dict], raw: str | None) -> list[dict]:
    """Apply EQUALS predicates of a v2beta1 filter (operation as name or enum number 1)."""
    if not raw:
        return items
    for pred in json.loads(raw).get("predicates", []):
        if pred.get("operation") not in ("EQUALS", 1):
            raise ValueError(f"fake KFP only supports EQUALS filters, got {pred}")
        value = pred.get("stringValue", pred.get("string_value"))
        items = [i for i in items if i.get(pred["key"]) == value]
    return items


def _page(items: list[dict], key: str, query: dict[str, str]) -> dict:
    """One page of items; the page token is simply the offset."""
    size = int(query.get("page_size") or 10)
    start = int(query.get("page_token") or 0)
    chunk = items[start : start + size]
    result: dict[str, Any] = {"total_size": len(items)}
    if chunk:
        result[key] = chunk
    if start + size < len(items):
        result["next_page_token"] = str(start + size)
    return result


def _parse_multipart(ctype: str, raw: bytes) -> dict:
    """Fields and files of a multipart/form-data body (the pipeline upload)."""
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {ctype}\r\n\r\n".encode() + raw
    )
    fields: dict[str, str] = {}
    files: dict[str, bytes] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if part.get_filename():
            files[name] = part.get_payload(decode=True)
        else:
            fields[name] = part.get_content()
    return {"fields": fields, "files": files}


def _headers(message: Any) -> dict[str, str]:
    """Request headers with canonical names (``authorization`` -> ``Authorization``)."""
    return {key.title(): value for key, value in message.items()}
