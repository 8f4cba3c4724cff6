"""download_file against a real local HTTP server (no mocks)."""

from __future__ import annotations

import hashlib
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest

from lungxray.download import (
    PNEUMONIAMNIST,
    ChecksumError,
    DownloadError,
    download_file,
    fetch_pneumoniamnist,
    pneumoniamnist_filename,
)

pytestmark = pytest.mark.timeout(60)


@dataclass
class FileServer:
    """What the test server serves, and every path it was asked for."""

    base_url: str
    files: dict[str, bytes] = field(default_factory=dict)
    truncated: set[str] = field(default_factory=set)
    requests: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"


def _handler(state: FileServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            path = urlsplit(self.path).path
            body = state.files.get(path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            # A truncated response promises more bytes than it sends, then hangs up.
            extra = 1000 if path in state.truncated else 0
            self.send_header("Content-Length", str(len(body) + extra))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output quiet

    return Handler


@pytest.fixture
def server() -> Iterator[FileServer]:
    state = FileServer(base_url="")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(state))
    state.base_url = f"http://127.0.0.1:{httpd.server_address[1]}"
    # A short poll interval makes shutdown() return promptly at teardown.
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield state
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


@pytest.fixture
def npz_bytes() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    np.savez_compressed(
        buf,
        train_images=rng.integers(0, 256, size=(8, 28, 28), dtype=np.uint8),
        train_labels=rng.integers(0, 2, size=(8, 1), dtype=np.uint8),
    )
    return buf.getvalue()


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def test_download_verifies_checksums(server: FileServer, npz_bytes: bytes, tmp_path: Path) -> None:
    server.files["/data/pneumoniamnist.npz"] = npz_bytes
    dest = tmp_path / "cache" / "pneumoniamnist.npz"

    out = download_file(
        server.url("/data/pneumoniamnist.npz?download=1"),
        dest,
        md5=_md5(npz_bytes),
        sha256=hashlib.sha256(npz_bytes).hexdigest().upper(),  # case must not matter
    )

    assert out == dest
    assert dest.read_bytes() == npz_bytes
    with np.load(dest) as data:
        assert data["train_images"].shape == (8, 28, 28)
    assert sorted(p.name for p in dest.parent.iterdir()) == ["pneumoniamnist.npz"]  # no temp
    assert len(server.requests) == 1


def test_cached_file_is_not_downloaded_again(
    server: FileServer, npz_bytes: bytes, tmp_path: Path
) -> None:
    server.files["/f.npz"] = npz_bytes
    dest = tmp_path / "f.npz"

    download_file(server.url("/f.npz"), dest, md5=_md5(npz_bytes))
    mtime = dest.stat().st_mtime_ns
    download_file(server.url("/f.npz"), dest, md5=_md5(npz_bytes))
    download_file(server.url("/f.npz"), dest)  # no checksum: presence is enough

    assert server.requests == ["/f.npz"]
    assert dest.stat().st_mtime_ns == mtime


def test_stale_file_is_replaced(server: FileServer, npz_bytes: bytes, tmp_path: Path) -> None:
    server.files["/f.npz"] = npz_bytes
    dest = tmp_path / "f.npz"
    dest.write_bytes(b"an older, different version")

    download_file(server.url("/f.npz"), dest, md5=_md5(npz_bytes))

    assert dest.read_bytes() == npz_bytes
    assert len(server.requests) == 1


def test_checksum_mismatch_leaves_nothing(
    server: FileServer, npz_bytes: bytes, tmp_path: Path
) -> None:
    server.files["/f.npz"] = npz_bytes
    url = server.url("/f.npz")
    wrong = "0" * 32

    with pytest.raises(ChecksumError) as excinfo:
        download_file(url, tmp_path / "f.npz", md5=wrong)

    message = str(excinfo.value)
    assert url in message and wrong in message and _md5(npz_bytes) in message
    assert list(tmp_path.iterdir()) == []  # neither dest nor a temp file


def test_malformed_checksum_is_rejected_before_downloading(
    server: FileServer, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="md5 must be 32 hex digits"):
        download_file(server.url("/f.npz"), tmp_path / "f.npz", md5="a" * 64)
    assert server.requests == []


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_url_fails_fast_with_hint(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/pneumoniamnist.npz"

    with pytest.raises(DownloadError) as excinfo:
        download_file(url, tmp_path / "f.npz", md5="0" * 32, timeout=5)

    message = str(excinfo.value)
    assert url in message and "DATA=<path>" in message and "--source <path>" in message
    assert list(tmp_path.iterdir()) == []


def test_http_error_names_url_and_status(server: FileServer, tmp_path: Path) -> None:
    url = server.url("/missing.npz")
    with pytest.raises(DownloadError, match="HTTP 404") as excinfo:
        download_file(url, tmp_path / "f.npz")
    assert url in str(excinfo.value)
    assert list(tmp_path.iterdir()) == []


def test_truncated_body_is_an_error(server: FileServer, npz_bytes: bytes, tmp_path: Path) -> None:
    server.files["/f.npz"] = npz_bytes
    server.truncated.add("/f.npz")
    with pytest.raises(DownloadError, match="connection closed after"):
        download_file(server.url("/f.npz"), tmp_path / "f.npz")  # no checksum to catch it
    assert list(tmp_path.iterdir()) == []


def test_silent_server_times_out(tmp_path: Path) -> None:
    # A listening socket that never accepts: the TCP handshake completes, no reply ever comes.
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        url = f"http://127.0.0.1:{listener.getsockname()[1]}/f.npz"
        with pytest.raises(DownloadError, match="timed out"):
            download_file(url, tmp_path / "f.npz", timeout=0.5)


def test_unknown_size_lists_valid_sizes(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="valid sizes: 28, 64, 128, 224"):
        fetch_pneumoniamnist(size=32, cache_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", sorted(PNEUMONIAMNIST))
def test_catalogue_urls_match_file_names(size: int) -> None:
    url, md5 = PNEUMONIAMNIST[size]
    assert urlsplit(url).path.rsplit("/", 1)[-1] == pneumoniamnist_filename(size)
    assert len(md5) == 32
