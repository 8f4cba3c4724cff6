"""``gs://`` storage: cached parallel fetch, upload, existence checks and conditional writes.

Objects fetched from Google Cloud Storage land in a local cache laid out as
``<cache>/<bucket>/<object name>``, so a fetched prefix is an ordinary directory tree. The
generation of every cached object is recorded in a sidecar index under
``<cache>/.generations`` (outside the data tree, so dataset loaders never see it); an object is
downloaded again only when its generation or size changes. Many objects move in parallel
through ``google.cloud.storage.transfer_manager`` (threads).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn, TextIO

from google.api_core import exceptions as api_exceptions
from google.auth.credentials import AnonymousCredentials
from google.auth.exceptions import DefaultCredentialsError, RefreshError, TransportError
from google.cloud import storage
from google.cloud.storage import transfer_manager
from google.cloud.storage.exceptions import DataCorruption

from lungxray.errors import LungxrayError
from lungxray.uris import GCS_SCHEME, is_gcs, parse_gcs  # noqa: F401 - storage's API

log = logging.getLogger(__name__)

EMULATOR_ENV = "STORAGE_EMULATOR_HOST"

# Both live inside the cache root (same filesystem, so renames are atomic) but outside any
# bucket directory; bucket names cannot start with a dot, so they cannot collide.
_GENERATIONS_DIR = ".generations"
_TMP_DIR = ".tmp"
# Objects handed to transfer_manager at once, per worker: progress moves and a failure stops the
# fetch after at most this many more downloads per worker.
_BATCH_PER_WORKER = 8

_CREDENTIALS_HELP = (
    "no usable Google Cloud credentials to access {uri}: set GOOGLE_APPLICATION_CREDENTIALS to "
    "a service-account key file, run on GKE/Kubeflow with Workload Identity, or run "
    "`gcloud auth application-default login`"
)


class StorageError(LungxrayError):
    """A storage operation failed; the one-line message names the URI involved."""

    kind = "storage"


class PreconditionError(StorageError):
    """A conditional write lost the race: the object changed after it was read."""


# --------------------------------------------------------------------------------------------
# URIs


def default_cache_dir() -> Path:
    """Where :func:`fetch` caches objects unless told otherwise: ``~/.cache/lungxray/gcs``."""
    return Path.home() / ".cache" / "lungxray" / "gcs"


# --------------------------------------------------------------------------------------------
# Client and error translation


def _client(uri: str) -> storage.Client:
    """A storage client; anonymous against an emulator when STORAGE_EMULATOR_HOST is set."""
    if os.environ.get(EMULATOR_ENV):
        # The library itself points the client at the emulator endpoint.
        return storage.Client(project="test", credentials=AnonymousCredentials())
    try:
        return storage.Client()
    except DefaultCredentialsError as err:
        raise StorageError(_CREDENTIALS_HELP.format(uri=uri)) from err
    except OSError as err:
        # Credentials were found but no default project: reads and writes of named buckets
        # do not need one, so carry on without.
        log.debug("no default GCP project (%s); continuing without one", err)
        return storage.Client(project=None)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextmanager
def _gcs_errors(uri: str) -> Iterator[None]:
    """Turn library exceptions that callers cannot act on into one-line StorageErrors."""
    try:
        yield
    except (DefaultCredentialsError, RefreshError) as err:
        raise StorageError(f"{_CREDENTIALS_HELP.format(uri=uri)} ({_first_line(err)})") from err
    except api_exceptions.Forbidden as err:
        raise StorageError(f"permission denied for {uri}: {_first_line(err)}") from err
    except (api_exceptions.GoogleAPICallError, api_exceptions.RetryError, TransportError) as err:
        # RetryError: the library gave up on a flaky network; TransportError: no token.
        raise StorageError(f"GCS request for {uri} failed: {_first_line(err)}") from err


def _object_uri(bucket: str, name: str) -> str:
    return f"{GCS_SCHEME}{bucket}/{name}"


def _raise_transfer_error(err: BaseException, where: str) -> NoReturn:
    """Raise the exception a transfer_manager worker returned, as a StorageError naming the
    object ``where`` when it is a GCS or credentials error; anything else as it is."""
    with _gcs_errors(where):
        raise err


# --------------------------------------------------------------------------------------------
# Progress


class _Progress:
    """A minimal stderr counter: rewrites one line on a terminal, prints every 10% in logs."""

    def __init__(self, label: str, total: int, total_bytes: int, stream: TextIO) -> None:
        self.label, self.total, self.total_bytes, self.stream = label, total, total_bytes, stream
        self.done = self.done_bytes = 0
        self._tty = stream.isatty()
        self._last_decile = -1

    def advance(self, nbytes: int) -> None:
        self.done += 1
        self.done_bytes += nbytes
        decile = self.done * 10 // max(self.total, 1)
        if not self._tty and decile == self._last_decile:
            return  # keeps pod logs short
        self._last_decile = decile
        line = (
            f"{self.label}: {self.done}/{self.total} files, "
            f"{self.done_bytes / 2**20:.1f}/{self.total_bytes / 2**20:.1f} MiB"
        )
        end = "\n" if not self._tty or self.done == self.total else ""
        self.stream.write(("\r" if self._tty else "") + line + end)
        self.stream.flush()


# --------------------------------------------------------------------------------------------
# Cache layout


def _check_object_name(name: str, uri: str) -> None:
    """Refuse names that would not map to a path inside the bucket's cache directory."""
    parts = name.split("/")
    if name.startswith("/") or any(part in ("", ".", "..") for part in parts):
        raise StorageError(
            f"refusing to cache object {name!r} from {uri}: its name has an empty, '.' or '..' "
            "path component and could escape or alias paths in the cache"
        )


class _Cache:
    """The on-disk cache of one bucket: data files plus per-object generation records."""

    def __init__(self, root: Path, bucket: str) -> None:
        self.root = root
        self.bucket_dir = root / bucket
        self._generations = root / _GENERATIONS_DIR / bucket
        self._tmp = root / _TMP_DIR

    def path(self, name: str, uri: str) -> Path:
        """Local path of object ``name``; raises if it would land outside the bucket dir."""
        _check_object_name(name, uri)
        path = self.bucket_dir.joinpath(*name.split("/"))
        # Belt and braces against symlinks or platform path quirks the name check misses.
        if not path.resolve().is_relative_to(self.bucket_dir.resolve()):
            raise StorageError(f"refusing to cache object {name!r} from {uri}: escapes the cache")
        return path

    def _record_path(self, name: str) -> Path:
        # Hashed so that records never clash with each other the way "a" and "a/b" would.
        digest = hashlib.sha256(name.encode()).hexdigest()
        return self._generations / digest[:2] / f"{digest}.json"

    def is_current(self, blob: storage.Blob, path: Path) -> bool:
        """True when ``path`` holds exactly this generation of ``blob``."""
        try:
            record = json.loads(self._record_path(blob.name).read_text())
            size = path.stat().st_size
        except (OSError, ValueError):
            return False
        return (
            path.is_file()
            and blob.generation is not None
            and record.get("generation") == str(blob.generation)
            and (blob.size is None or size == blob.size)
        )

    def prune(self, prefix_dir: Path, keep: set[Path]) -> int:
        """Delete cached files under ``prefix_dir`` that are not in ``keep`` (objects gone from
        the bucket), their generation records and the folders left empty; returns how many.

        Without this the mirror of a prefix would be everything ever seen there: a deleted or
        relabelled (moved) image would come back into the data with its old label.
        """
        if not prefix_dir.is_dir():
            return 0
        removed = 0
        for path in sorted(prefix_dir.rglob("*"), reverse=True):  # children before parents
            if path.is_dir():
                if not any(path.iterdir()):
                    path.rmdir()
            elif path not in keep:
                name = path.relative_to(self.bucket_dir).as_posix()
                path.unlink()
                self._record_path(name).unlink(missing_ok=True)
                removed += 1
        return removed

    def _temp_file(self) -> Path:
        self._tmp.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self._tmp, prefix="part-")
        os.close(fd)
        return Path(name)

    def _replace(self, src: Path, dest: Path) -> None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dest)

    def _record(self, record: dict[str, str | int | None]) -> None:
        tmp = self._temp_file()
        try:
            tmp.write_text(json.dumps(record))
            self._replace(tmp, self._record_path(str(record["name"])))
        finally:
            tmp.unlink(missing_ok=True)

    def download(self, pairs: Sequence[tuple[storage.Blob, Path]], workers: int,
                 progress: _Progress | None) -> None:
        """Download each blob to its path, each via a temp file then renamed into place, and
        record its generation; ``workers`` at a time, a batch at a time, so the first failure
        stops the rest (the downloads that succeeded stay, recorded)."""
        batch = max(1, workers) * _BATCH_PER_WORKER
        for start in range(0, len(pairs), batch):
            self._download_batch(pairs[start:start + batch], workers, progress)

    def _download_batch(self, pairs: Sequence[tuple[storage.Blob, Path]], workers: int,
                        progress: _Progress | None) -> None:
        # Taken from the listing before downloading: the download refreshes the blob's
        # properties from response headers, which need not carry the generation.
        records = [{"name": blob.name, "generation": str(blob.generation), "size": blob.size}
                   for blob, _ in pairs]
        temps = [self._temp_file() for _ in pairs]
        try:
            # The listed blobs carry their generation, so this fetches exactly those versions.
            results = transfer_manager.download_many(
                [(blob, str(tmp)) for (blob, _), tmp in zip(pairs, temps, strict=True)],
                max_workers=max(1, workers), worker_type=transfer_manager.THREAD)
            failed: tuple[storage.Blob, BaseException] | None = None
            for (blob, path), tmp, record, result in zip(pairs, temps, records, results,
                                                          strict=True):
                if isinstance(result, BaseException):
                    failed = failed or (blob, result)
                    continue
                self._replace(tmp, path)
                # Written only after the data is in place: a crash in between leaves a stale
                # record, which just means one more download next time, never a wrong file
                # passed off as fresh.
                self._record(record)
                if progress is not None:
                    progress.advance(blob.size or 0)
        finally:
            for tmp in temps:
                tmp.unlink(missing_ok=True)
        if failed is not None:
            blob, err = failed
            where = _object_uri(blob.bucket.name, blob.name)
            if isinstance(err, DataCorruption):
                raise StorageError(f"checksum mismatch downloading {where}; try again") from err
            _raise_transfer_error(err, where)


# --------------------------------------------------------------------------------------------
# fetch


def _list_prefix(client: storage.Client, bucket: str, prefix: str, uri: str) -> list[storage.Blob]:
    """All objects under ``prefix``, skipping zero-byte "folder" placeholders ending in '/'."""
    try:
        blobs = [b for b in client.list_blobs(bucket, prefix=prefix) if not b.name.endswith("/")]
    except api_exceptions.NotFound as err:
        raise StorageError(f"bucket {bucket!r} not found (while fetching {uri})") from err
    if not blobs:
        raise StorageError(f"no objects under {GCS_SCHEME}{bucket}/{prefix}")
    return blobs


def _sync(
    blobs: Sequence[storage.Blob], cache: _Cache, uri: str, *, workers: int, progress: bool
) -> int:
    """Bring every blob's cached copy up to date; returns how many were downloaded."""
    # Map every name before downloading anything, so one bad name fails the whole fetch early.
    planned = [(blob, cache.path(blob.name, uri)) for blob in blobs]
    stale = [(blob, path) for blob, path in planned if not cache.is_current(blob, path)]
    if stale:
        total_bytes = sum(blob.size or 0 for blob, _ in stale)
        bar = _Progress(f"fetch {uri}", len(stale), total_bytes, sys.stderr) if progress else None
        cache.download(stale, workers, bar)
    log.info("%s: %d downloaded, %d already cached", uri, len(stale), len(blobs) - len(stale))
    return len(stale)


def fetch(
    uri: str, cache_dir: Path | None = None, *, workers: int = 8, progress: bool = True
) -> Path:
    """Return a local path for the ``gs://`` URI ``uri``, downloading into the cache when needed.

    - ``gs://bucket/path/file.ext`` names one object and returns its cached file;
    - ``gs://bucket/prefix/`` (or ``gs://bucket/prefix`` when no object has that exact name)
      downloads every object under the prefix, in parallel, and returns the directory that
      mirrors the prefix.

    Cached objects whose generation is unchanged are not downloaded again.
    """
    bucket_name, name = parse_gcs(uri)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cache = _Cache(root.resolve(), bucket_name)

    # Validates the name before any request (and before credentials are even looked for).
    local = cache.path(name.rstrip("/"), uri) if name.rstrip("/") else cache.bucket_dir
    with _gcs_errors(uri):
        client = _client(uri)
        if name and not name.endswith("/"):
            blob = client.bucket(bucket_name).get_blob(name)
            if blob is not None:
                _sync([blob], cache, uri, workers=1, progress=progress)
                return local
            name += "/"  # not an object: treat it as a directory-like prefix
        blobs = _list_prefix(client, bucket_name, name, uri)
        _sync(blobs, cache, uri, workers=workers, progress=progress)
        gone = cache.prune(local, {cache.path(blob.name, uri) for blob in blobs})
        if gone:
            log.info("%s: %d cached file(s) no longer in the bucket, removed", uri, gone)
    return local


# --------------------------------------------------------------------------------------------
# upload / exists


def _upload_plan(local: Path, name: str) -> list[tuple[Path, str]]:
    """Pair each file under the directory ``local`` with its object name: ``name`` then the
    file's path relative to ``local``."""
    base = name.rstrip("/")
    files = sorted(p for p in local.rglob("*") if p.is_file())
    return [(p, f"{base}/{p.relative_to(local).as_posix()}".lstrip("/")) for p in files]


def upload(local: Path, uri: str, *, workers: int = 8, no_overwrite: bool = False) -> None:
    """Upload a directory tree to the ``gs://`` prefix ``uri``, ``workers`` files at a time.
    ``no_overwrite``: every object is created only if absent (generation precondition 0), so
    a second writer of the same names fails instead of mixing its files with the first's."""
    src = Path(local).expanduser()
    if not src.is_dir():
        raise FileNotFoundError(f"no such directory: {src}")
    bucket_name, name = parse_gcs(uri)
    plan = _upload_plan(src, name)
    if not plan:
        log.warning("nothing to upload: %s contains no files", src)
        return
    with _gcs_errors(uri):
        bucket = _client(uri).bucket(bucket_name)
        results = transfer_manager.upload_many(
            [(str(path), bucket.blob(obj)) for path, obj in plan],
            upload_kwargs={"if_generation_match": 0} if no_overwrite else {},
            max_workers=max(1, workers), worker_type=transfer_manager.THREAD)
    for (_, obj), result in zip(plan, results, strict=True):
        if not isinstance(result, BaseException):
            continue
        where = _object_uri(bucket_name, obj)
        if isinstance(result, api_exceptions.NotFound):
            msg = f"bucket {bucket_name!r} not found (while uploading {where})"
            raise StorageError(msg) from result
        if isinstance(result, api_exceptions.PreconditionFailed):
            raise StorageError(f"{where}: already exists; not overwritten") from result
        _raise_transfer_error(result, where)
    log.info("uploaded %d file(s) from %s to %s", len(plan), src, uri)


def exists(uri: str) -> bool:
    """True when the ``gs://`` URI ``uri`` names an existing bucket, object or non-empty
    prefix."""
    bucket_name, name = parse_gcs(uri)
    with _gcs_errors(uri):
        client = _client(uri)
        bucket = client.bucket(bucket_name)
        if not name:
            return bool(bucket.exists())
        if not name.endswith("/") and bucket.blob(name).exists():
            return True
        prefix = name if name.endswith("/") else name + "/"
        try:
            return any(True for _ in client.list_blobs(bucket_name, prefix=prefix, max_results=1))
        except api_exceptions.NotFound:
            return False


def read_generation(uri: str) -> tuple[bytes, int] | None:
    """The bytes of the object ``uri`` and its generation, or None when it does not exist. The
    bytes are those of that generation (the read is pinned to it)."""
    bucket_name, name = parse_gcs(uri)
    with _gcs_errors(uri):
        blob = _client(uri).bucket(bucket_name).get_blob(name)
        if blob is None:
            return None
        generation = int(blob.generation)
        return blob.download_as_bytes(if_generation_match=generation), generation


def write_if_generation(uri: str, content: bytes, generation: int) -> int:
    """Write ``content`` to the object ``uri`` only if its generation is still ``generation``
    (0: only if it does not exist): a compare-and-swap. Returns the new generation; raises
    :class:`PreconditionError` when another writer got there first."""
    bucket_name, name = parse_gcs(uri)
    with _gcs_errors(uri):
        blob = _client(uri).bucket(bucket_name).blob(name)
        try:
            blob.upload_from_string(content, content_type="application/json",
                                    if_generation_match=generation)
        except api_exceptions.PreconditionFailed as err:
            raise PreconditionError(f"{uri} changed since generation {generation} was read "
                                    f"(another writer); not written") from err
        return int(blob.generation or 0)


def delete_prefix(uri: str) -> int:
    """Delete every object under the prefix ``uri`` (a folder-like name); returns how many."""
    bucket_name, name = parse_gcs(uri)
    prefix = name.rstrip("/") + "/"
    with _gcs_errors(uri):
        blobs = list(_client(uri).list_blobs(bucket_name, prefix=prefix))
        for blob in blobs:
            blob.delete()
    return len(blobs)


def list_top(uri: str, limit: int = 1000) -> list[str]:
    """The names directly under the prefix ``uri``: objects, and folder-like prefixes (ending in
    '/'), at most ``limit`` of them."""
    bucket_name, name = parse_gcs(uri)
    prefix = name.rstrip("/") + "/" if name.rstrip("/") else ""
    with _gcs_errors(uri):
        pages = _client(uri).list_blobs(bucket_name, prefix=prefix, delimiter="/",
                                        max_results=limit)
        names = [blob.name[len(prefix):] for blob in pages]
        names += [sub[len(prefix):] for sub in pages.prefixes]
    return names[:limit]
