"""Local stand-ins for tests: the Vertex AI v1 REST API and a Docker registry (v2 API).

FakeVertex answers the calls google-cloud-aiplatform makes over its REST transport
(``aiplatform.init(api_endpoint=URL, api_transport="rest")``) to create a PipelineJob and a
Schedule, plus the Cloud Storage call PipelineJob.submit makes to check the pipeline-root bucket
(reached through STORAGE_EMULATOR_HOST), which it refuses. FakeRegistry answers ``HEAD /v2/<name>/
manifests/<reference>`` for the images it holds, optionally behind a Bearer-token challenge.
Both record every request. Neither is the real service: no validation beyond what tests assert.
"""

from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

_LOCATION = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, str]
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)


class _Server:
    """A threaded HTTP server on 127.0.0.1 that records requests and routes them."""

    def __init__(self) -> None:
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def netloc(self) -> str:
        return self.url.removeprefix("http://")

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def calls(self, method: str | None = None, pattern: str = "") -> list[Request]:
        """Recorded requests with this method whose path matches the regex ``pattern``."""
        return [r for r in self.requests
                if (method is None or r.method == method) and re.search(pattern, r.path)]

    def route(self, req: Request) -> tuple[int, dict[str, str], Any]:
        raise NotImplementedError

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _handle(self) -> None:
                parts = urlsplit(self.path)
                query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body: Any = None
                if raw and "x-www-form-urlencoded" in self.headers.get("Content-Type", ""):
                    body = {k: v[-1] for k, v in parse_qs(raw.decode()).items()}
                elif raw:
                    body = json.loads(raw)
                req = Request(self.command, parts.path, query, body, _headers(self.headers))
                with server._lock:
                    server.requests.append(req)
                    status, headers, payload = server.route(req)
                data = b"" if payload is None else json.dumps(payload).encode()
                self.send_response(status)
                headers = {"Content-Type": "application/json", **headers}
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_HEAD = do_PATCH = do_DELETE = _handle

        return Handler


class FakeVertex(_Server):
    """Vertex AI v1 REST: pipelineJobs.create, schedules.create; GCS bucket get (refused)."""

    ACCESS_TOKEN = "fake-vertex-access-token"

    def __init__(self) -> None:
        super().__init__()
        self.jobs: dict[str, dict] = {}
        self.schedules: dict[str, dict] = {}
        self.fail_next: tuple[int, str] | None = None

    def adc_file(self, path: Any) -> Any:
        """Write Application Default Credentials (``authorized_user``) holding an access token
        valid until 2099: google-auth sends it as is and never calls its token endpoint, which
        it pins to Google's and which is not reachable here."""
        path.write_text(json.dumps({
            "type": "authorized_user", "client_id": "fake-client", "client_secret": "fake",
            "refresh_token": "fake-refresh", "token": self.ACCESS_TOKEN,
            "expiry": "2099-01-01T00:00:00Z",
        }))
        return path

    def route(self, req: Request) -> tuple[int, dict[str, str], Any]:
        if self.fail_next:
            status, message = self.fail_next
            self.fail_next = None
            return status, {}, {"error": {"code": status, "message": message,
                                          "status": "INVALID_ARGUMENT"}}
        match = re.fullmatch(_LOCATION + r"/(?P<kind>pipelineJobs|schedules)", req.path)
        if match and req.method == "POST":
            parent = req.path.rsplit("/", 1)[0].removeprefix("/v1/")  # projects/P/locations/L
            if match["kind"] == "pipelineJobs":
                job_id = req.query.get("pipelineJobId") or f"job-{len(self.jobs) + 1}"
                job = dict(req.body, name=f"{parent}/pipelineJobs/{job_id}",
                           state="PIPELINE_STATE_PENDING", createTime="2026-01-01T00:00:00Z")
                self.jobs[job["name"]] = job
                return 200, {}, job
            sched = dict(req.body, name=f"{parent}/schedules/{len(self.schedules) + 1}",
                         state="ACTIVE", createTime="2026-01-01T00:00:00Z")
            self.schedules[sched["name"]] = sched
            return 200, {}, sched
        if req.path.startswith("/storage/v1/b"):
            # PipelineJob.submit gets-or-creates the pipeline root's bucket and would then ask
            # Resource Manager (gRPC, not reachable here) who owns it; a 403 makes aiplatform
            # log that and go on, as it does for a caller without storage.buckets.get.
            return 403, {}, {"error": {"code": 403, "message": "stand-in holds no buckets"}}
        return 404, {}, {"error": {"code": 404, "message": f"no route {req.method} {req.path}",
                                   "status": "NOT_FOUND"}}


class FakeRegistry(_Server):
    """Docker Registry HTTP API v2: HEAD/GET manifests of the images in ``images``.

    With ``token`` set, manifest requests without ``Authorization: Bearer <token>`` get a 401
    Bearer challenge whose realm is this server's /token, which hands out ``token`` only for
    the Basic credentials ``user:password`` (or to anyone when those are None).
    """

    def __init__(self, token: str | None = None,
                 credentials: tuple[str, str] | None = None) -> None:
        super().__init__()
        self.images: dict[tuple[str, str], str] = {}  # (repository, tag) -> digest
        self.token = token
        self.credentials = credentials

    def add(self, repository: str, tag: str, digest: str) -> str:
        """Hold ``<this registry>/<repository>:<tag>``; return that image reference."""
        self.images[(repository, tag)] = digest
        return f"{self.netloc}/{repository}:{tag}"

    def route(self, req: Request) -> tuple[int, dict[str, str], Any]:
        if req.path == "/token":
            import base64

            if self.credentials:
                expected = "Basic " + base64.b64encode(":".join(self.credentials).encode()).decode()
                if req.headers.get("Authorization") != expected:
                    return 401, {}, {"errors": [{"code": "UNAUTHORIZED"}]}
            return 200, {}, {"token": self.token}
        match = re.fullmatch(r"/v2/(?P<repo>.+)/manifests/(?P<ref>[^/]+)", req.path)
        if not match or req.method not in ("HEAD", "GET"):
            return 404, {}, {"errors": [{"code": "NAME_UNKNOWN"}]}
        if self.token and req.headers.get("Authorization") != f"Bearer {self.token}":
            scope = f"repository:{match['repo']}:pull"
            challenge = (f'Bearer realm="{self.url}/token",service="fake-registry",'
                         f'scope="{scope}"')
            return 401, {"WWW-Authenticate": challenge}, {"errors": [{"code": "UNAUTHORIZED"}]}
        digest = self.images.get((match["repo"], match["ref"]))
        if digest is None and match["ref"] in self.images.values():
            digest = match["ref"]
        if digest is None:
            return 404, {}, {"errors": [{"code": "MANIFEST_UNKNOWN"}]}
        return 200, {"Docker-Content-Digest": digest,
                     "Content-Type": "application/vnd.oci.image.index.v1+json"}, None


def _headers(message: Any) -> dict[str, str]:
    """Request headers with canonical names (``authorization`` -> ``Authorization``)."""
    return {key.title(): value for key, value in message.items()}
