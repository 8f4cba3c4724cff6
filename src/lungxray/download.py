"""Checksum-verified, cached HTTP(S) downloads and the PneumoniaMNIST catalogue."""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterable
from pathlib import Path
from typing import Any, BinaryIO

from lungxray.errors import ConfigError, LungxrayError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20
_HEX_LENGTH = {"md5": 32, "sha256": 64}
_LOCAL_HINT = (
    "if this machine cannot reach it, download the file elsewhere and pass the local file "
    "instead (DATA=<path> for make, --source <path> on the CLI)"
)

_ZENODO = "https://zenodo.org/records/10519652/files"
#: PneumoniaMNIST (MedMNIST v2/v3, Zenodo record 10519652): image size -> (URL, md5).
PNEUMONIAMNIST: dict[int, tuple[str, str]] = {
    28: (f"{_ZENODO}/pneumoniamnist.npz?download=1", "28209eda62fecd6e6a2d98b1501bb15f"),
    64: (f"{_ZENODO}/pneumoniamnist_64.npz?download=1", "8f4eceb4ccffa70c672198ea285246c6"),
    128: (f"{_ZENODO}/pneumoniamnist_128.npz?download=1", "05b46931834c231683c68f40c47b2971"),
    224: (f"{_ZENODO}/pneumoniamnist_224.npz?download=1", "d6a3c71de1b945ea11211b03746c1fe1"),
}


class DownloadError(LungxrayError):
    """A download failed; the message names the URL and what to do about it."""

    kind = "download"


class ChecksumError(DownloadError):
    """The downloaded bytes do not match the expected checksum."""


def _expected_digests(md5: str | None, sha256: str | None) -> dict[str, str]:
    expected = {
        algo: value.strip().lower()
        for algo, value in (("md5", md5), ("sha256", sha256))
        if value is not None
    }
    for algo, value in expected.items():
        # Catches swapped or truncated arguments before any bytes move.
        if len(value) != _HEX_LENGTH[algo] or any(c not in "0123456789abcdef" for c in value):
            raise ConfigError(f"{algo} must be {_HEX_LENGTH[algo]} hex digits, got {value!r}")
    return expected


def _hashers(algos: Iterable[str]) -> dict[str, Any]:
    # usedforsecurity=False keeps md5 usable on FIPS-mode hosts; these are integrity checks.
    return {algo: hashlib.new(algo, usedforsecurity=False) for algo in algos}


def file_digests(path: Path, algos: Iterable[str]) -> dict[str, str]:
    """Hex digests of ``path`` for each hashlib algorithm name in ``algos``."""
    hashers = _hashers(algos)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    return file_digests(path, ["sha256"])["sha256"]


def _network_error(url: str, err: BaseException) -> DownloadError:
    if isinstance(err, urllib.error.HTTPError):
        reason: object = f"HTTP {err.code} {err.reason}"
    else:
        reason = err.reason if isinstance(err, urllib.error.URLError) else err
    text = str(reason) or type(reason).__name__
    return DownloadError(f"could not download {url}: {text}; {_LOCAL_HINT}")


def _stream(url: str, out: BinaryIO, algos: Iterable[str], timeout: float) -> dict[str, str]:
    """Copy ``url`` into ``out``, hashing on the way; network failures become DownloadError."""
    hashers = _hashers(algos)
    request = urllib.request.Request(url, headers={"User-Agent": "lungxray"})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except (OSError, http.client.HTTPException, ValueError) as err:
        raise _network_error(url, err) from err
    with response:
        length = response.headers.get("Content-Length")
        received = 0
        while True:
            try:
                chunk = response.read(_CHUNK)
            except (OSError, http.client.HTTPException) as err:
                raise _network_error(url, err) from err
            if not chunk:
                break
            out.write(chunk)
            received += len(chunk)
            for h in hashers.values():
                h.update(chunk)
    # http.client does not flag a body cut short by a closed connection; without a checksum
    # this is the only thing that catches it.
    if length is not None and received != int(length):
        raise DownloadError(
            f"could not download {url}: connection closed after {received} of {length} bytes; "
            f"{_LOCAL_HINT}"
        )
    return {algo: h.hexdigest() for algo, h in hashers.items()}


def _check(url: str, expected: dict[str, str], actual: dict[str, str]) -> None:
    wrong = [
        f"expected {a} {want}, got {actual[a]}" for a, want in expected.items() if want != actual[a]
    ]
    if wrong:
        raise ChecksumError(f"checksum mismatch for {url}: {'; '.join(wrong)}")


def download_file(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    timeout: float = 60,
) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    An existing ``dest`` whose checksum matches (or any existing ``dest`` when no checksum is
    given) is returned without touching the network. Otherwise the body is streamed to a temp
    file beside ``dest``, verified, and renamed into place, so ``dest`` is never partial.
    ``timeout`` bounds each socket operation, not the whole transfer.
    """
    dest = Path(dest).expanduser()
    expected = _expected_digests(md5, sha256)
    if dest.is_file():
        if not expected or file_digests(dest, expected) == expected:
            log.debug("%s already present, not downloading %s", dest, url)
            return dest
        log.warning("%s does not match its checksum; downloading %s again", dest, url)

    dest.parent.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s -> %s", url, dest)
    fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            actual = _stream(url, out, expected, timeout)
        _check(url, expected, actual)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def pneumoniamnist_filename(size: int) -> str:
    """MedMNIST's file name for PneumoniaMNIST at ``size`` pixels."""
    _check_size(size)
    return "pneumoniamnist.npz" if size == 28 else f"pneumoniamnist_{size}.npz"


def _check_size(size: int) -> None:
    if size not in PNEUMONIAMNIST:
        valid = ", ".join(str(s) for s in sorted(PNEUMONIAMNIST))
        raise ConfigError(f"no PneumoniaMNIST at size {size!r}; valid sizes: {valid}")


def default_dataset_dir() -> Path:
    """Where datasets are cached unless told otherwise: ``~/.cache/lungxray/datasets``."""
    return Path.home() / ".cache" / "lungxray" / "datasets"


def fetch_pneumoniamnist(size: int = 28, cache_dir: Path | None = None) -> Path:
    """Path to the PneumoniaMNIST ``.npz`` at ``size``, downloaded from Zenodo if not cached."""
    _check_size(size)
    url, md5 = PNEUMONIAMNIST[size]
    root = Path(cache_dir) if cache_dir is not None else default_dataset_dir()
    return download_file(url, root / pneumoniamnist_filename(size), md5=md5)
