"""Where a run reads or writes: a local path or ``gs://bucket/path``, checked before any work.

The champion (``champion_uri``, ``--champion``) and the target site's images (``target_data``)
are only used at the end of a run, hours after it started: a URI that cannot work is refused
here, up front, by the pipeline's parameter schema and by the CLI. Import-light on purpose (no
Google Cloud or TensorFlow import): the schema calls it before anything runs.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path, PurePosixPath

from lungxray.errors import ConfigError, quote

GCS_SCHEME = "gs://"
# GCS bucket naming rules, loosely: 3-222 chars of lowercase letters, digits, '-', '_' and '.',
# starting and ending with a letter or digit.
BUCKET_RE = re.compile(r"[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]")
# "s3://", "http://", "file:/", "GS://": anything that looks like a URI scheme.
_SCHEME_RE = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):/")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")


def is_gcs(uri: str | os.PathLike[str]) -> bool:
    """True when ``uri`` is a ``gs://`` URI."""
    return str(uri).startswith(GCS_SCHEME)


def parse_gcs(uri: str) -> tuple[str, str]:
    """Split ``gs://bucket/some/prefix`` into ``("bucket", "some/prefix")``.

    The object part is returned verbatim (a trailing ``/`` is kept, so callers can tell a
    prefix from an object name); it is ``""`` for ``gs://bucket`` and ``gs://bucket/``.
    """
    if not is_gcs(uri):
        raise ConfigError(f"not a gs:// URI: {quote(str(uri))}")
    bucket, _, name = uri[len(GCS_SCHEME):].partition("/")
    problem = _bucket_problem(bucket)
    if problem:
        raise ConfigError(f"malformed GCS URI {quote(uri)}: {problem}")
    return bucket, name


def _bucket_problem(bucket: str) -> str:
    if not bucket:
        return "no bucket name (expected gs://BUCKET/PATH)"
    if not BUCKET_RE.fullmatch(bucket):
        return (f"{quote(bucket, 60)} is not a valid bucket name (3-222 characters: lowercase "
                f"letters, digits, '-', '_', '.')")
    return ""


def _check_text(value: str, what: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{what} must be a non-empty local path or gs:// URI")
    found = _CONTROL_RE.search(value)
    if found:
        kind = "a NUL byte" if found.group() == "\x00" else "a control character"
        raise ConfigError(f"{what} {quote(value)} holds {kind} at position {found.start()}")
    try:
        os.fsencode(value)
    except UnicodeEncodeError:
        raise ConfigError(f"{what} {quote(value)} cannot be encoded as a file name") from None


def _check_gcs(value: str, what: str) -> None:
    bucket, _, name = value[len(GCS_SCHEME):].partition("/")
    problem = _bucket_problem(bucket)
    if problem:
        raise ConfigError(f"{what} {quote(value)}: {problem}")
    parts = name.rstrip("/").split("/") if name.rstrip("/") else []
    if any(part in ("", ".", "..") for part in parts):
        raise ConfigError(f"{what} {quote(value)}: an object path has no empty, '.' or '..' "
                          f"parts (gs://{bucket}/a/b)")


def _climbs_out(path: str) -> bool:
    """True when a '..' of ``path`` goes above where the path starts (the working folder for a
    relative path, the root for an absolute one)."""
    depth = 0
    for part in PurePosixPath(path).parts[1 if path.startswith("/") else 0:]:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            return True
    return False


def _stat(path: str, what: str) -> os.stat_result | None:
    """The status of what ``path`` names (links followed), None when nothing is there."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{what} {quote(path)} is a link to nothing") from None
        return None
    except NotADirectoryError:
        raise ConfigError(f"{what} {quote(path)}: a part of the path is a file, not a "
                          f"folder") from None
    except OSError as err:
        raise ConfigError(f"{what} {quote(path)} cannot be checked: "
                          f"{err.strerror or err}") from None


def check_location(value: str, what: str, *, folder: bool = False,
                   must_exist: bool = False) -> str:
    """``value`` if it is a local path or a ``gs://bucket/path`` URI that can be used; else a
    one-line ConfigError naming ``what``. Refused: NUL bytes and control characters, any other
    scheme (``s3://``, ``http://``), a malformed or empty bucket, '.'/'..'/empty parts in an
    object path, a local '..' that climbs above where the path starts, and an existing local
    path that is a device, FIFO or socket (or, with ``folder``, not a folder). ``must_exist``:
    a local path must exist (a run on this machine reads it)."""
    _check_text(value, what)
    if is_gcs(value):
        _check_gcs(value, what)
        return value
    scheme = _SCHEME_RE.match(value)
    if scheme:
        raise ConfigError(f"{what} {quote(value)}: the scheme {quote(scheme.group(1) + '://')} "
                          f"is not supported; give a local path or gs://BUCKET/PATH")
    if "://" in value:
        raise ConfigError(f"{what} {quote(value)}: a local path with '://' in it is a mistyped "
                          f"URI; give a local path or gs://BUCKET/PATH")
    if _climbs_out(value):
        raise ConfigError(f"{what} {quote(value)}: its '..' climbs out of "
                          f"{'the root' if value.startswith('/') else 'the working folder'}; "
                          f"give the path without it")
    info = _stat(value, what)
    if info is None:
        if must_exist:
            raise ConfigError(f"{what} {quote(value)} does not exist")
        return value
    if folder and not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"{what} {quote(value)} is {_kind(info.st_mode)}, not a folder")
    if not (stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode)):
        raise ConfigError(f"{what} {quote(value)} is {_kind(info.st_mode)}, not a file or "
                          f"folder")
    return value


def _kind(mode: int) -> str:
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISREG, "a file"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "a special file"


def _key(value: str) -> tuple[str, ...]:
    """A comparable form: a GCS URI as (bucket, *parts), a local path as its resolved parts."""
    if is_gcs(value):
        bucket, name = parse_gcs(value)
        return ("gs://" + bucket, *(p for p in name.split("/") if p))
    return Path(value).expanduser().resolve().parts


def check_apart(value: str, other: str, what: str, other_what: str) -> None:
    """``value`` (written to) must not be ``other`` (read from), nor inside it, nor hold it:
    promoting a model into the data source would change the data."""
    if not value or not other:
        return
    try:
        a, b = _key(value), _key(other)
    except (OSError, RuntimeError, ValueError):  # an unresolvable path: left to the steps
        return
    if a == b or a[:len(b)] == b or b[:len(a)] == a:
        relation = "is" if a == b else "is inside" if len(a) > len(b) else "holds"
        raise ConfigError(f"{what} {quote(value)} {relation} {other_what} {quote(other)}; "
                          f"give a separate folder")


def check_distinct(value: str, other: str, what: str, other_what: str) -> None:
    """``value`` must not name the same file or folder as ``other``."""
    if not value or not other:
        return
    try:
        same = _key(value) == _key(other)
        if not same and not is_gcs(value) and not is_gcs(other):
            same = os.path.exists(value) and os.path.exists(other) and os.path.samefile(
                value, other)
    except (OSError, RuntimeError, ValueError):
        return
    if same:
        raise ConfigError(f"{what} {quote(value)} is {other_what} itself; give other data")
