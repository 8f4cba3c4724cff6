"""Bounded readers for the JSON and YAML files we read back, a bounded model-folder copy, the
one atomic file write, and full disks reported in one line.

Every file is sized before it is read and its nesting is limited, so a small hostile file (a
YAML alias bomb, a 2.7 GB ``config.json`` deflated from a few MB, JSON nested 100000 deep)
ends in a one-line :class:`~lungxray.errors.LungxrayError` instead of exhausting memory.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import shutil
import stat
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import yaml

from lungxray.errors import (
    ConfigError,
    DataError,
    LungxrayError,
    ModelError,
    OutputError,
    quote,
)
from lungxray.limits import DEFAULT, Limits

COPY_CHUNK = 1 << 20


def kind_of(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in ((stat.S_ISFIFO, "FIFO"), (stat.S_ISSOCK, "socket"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISDIR, "directory")):
        if test(mode):
            return name
    return "special file"


def _one_line(err: BaseException, limit: int = 200) -> str:
    """A parser's message on one line, cut to ``limit`` characters (full length stated)."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def read_bounded(path: Path, what: str, max_bytes: int,
                 error: type[LungxrayError] = DataError) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; FIFOs, devices and larger files
    are refused before reading (``/dev/zero`` would never end)."""
    path = Path(path)
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise error(f"{what} {quote(str(path))} does not exist") from None
    except OSError as err:
        raise error(f"cannot read {what} {quote(str(path))}: {err.strerror}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{what} {quote(str(path))} is not a regular file")
        if info.st_size > max_bytes:
            raise error(f"{what} {quote(str(path))} has {info.st_size} bytes, more than the "
                        f"limit of {max_bytes}")
        content = fh.read(max_bytes + 1)  # the file may grow after fstat
    if len(content) > max_bytes:
        raise error(f"{what} {quote(str(path))} has more than {max_bytes} bytes")
    return content


def depth(value: Any) -> int:
    """Nesting depth of parsed JSON/YAML (a scalar is 0), walked without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, dict):
            children = list(item.values())
        elif isinstance(item, list):
            children = item
        else:
            deepest = max(deepest, level)
            continue
        deepest = max(deepest, level + 1)
        stack.extend((child, level + 1) for child in children)
    return deepest


def loads_json(content: bytes | str, what: str, limits: Limits = DEFAULT,
               error: type[LungxrayError] = DataError, kind: str = "JSON") -> Any:
    """Parse JSON text of at most ``max_json_bytes`` and ``max_json_depth`` levels (NaN stays
    readable: ``json.dumps`` writes it into metrics.json for an undefined metric)."""
    if len(content) > limits.max_json_bytes:
        raise error(f"{what} has {len(content)} bytes, more than the limit of "
                    f"{limits.max_json_bytes}")
    try:
        value = json.loads(content)
    except RecursionError:
        raise error(f"{what} is nested too deeply (limit {limits.max_json_depth})") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise error(f"{what} is not valid {kind}: {_one_line(err)}") from None
    if depth(value) > limits.max_json_depth:
        raise error(f"{what} is nested more than {limits.max_json_depth} levels deep")
    return value


def load_json(path: Path, what: str, limits: Limits = DEFAULT,
              error: type[LungxrayError] = DataError) -> Any:
    """A JSON file read with :func:`read_bounded` and parsed with :func:`loads_json`."""
    content = read_bounded(path, what, limits.max_json_bytes, error)
    return loads_json(content, f"{what} {quote(str(path))}", limits, error)


def load_json_object(path: Path, what: str, limits: Limits = DEFAULT,
                     error: type[LungxrayError] = DataError) -> dict:
    """:func:`load_json` that must hold a JSON object."""
    value = load_json(path, what, limits, error)
    if not isinstance(value, dict):
        raise error(f"{what} {quote(str(path))} must hold a JSON object, not "
                    f"{type(value).__name__}")
    return value


# --------------------------------------------------------------------------- YAML


class SafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader that refuses aliases and deep nesting while composing, i.e. before
    any Python object is built: a 401-byte alias bomb never expands."""

    max_depth = DEFAULT.max_json_depth

    def __init__(self, stream: Any) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"YAML aliases (*{quote(str(event.anchor), 40)[1:-1]}) are not "
                              f"allowed in a parameter file; write the value out{_mark(event)}")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                raise ConfigError(f"YAML nested more than {self.max_depth} levels deep"
                                  f"{_mark(self.peek_event())}")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _mark(event: Any) -> str:
    mark = getattr(event, "start_mark", None)
    return f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""


def loads_yaml(text: str, what: str, limits: Limits = DEFAULT,
               loader: type[SafeLoader] = SafeLoader, kind: str = "YAML") -> Any:
    """Parse YAML text with ``loader`` (a :class:`SafeLoader`), size and depth limited;
    ``kind`` names the format in the error ("YAML/JSON" for a params file)."""
    if len(text) > limits.max_json_bytes:
        raise ConfigError(f"{what} has {len(text)} characters, more than the limit of "
                          f"{limits.max_json_bytes}")
    bounded = type("BoundedLoader", (loader,), {"max_depth": limits.max_json_depth})
    try:
        return yaml.load(text, Loader=bounded)  # noqa: S506 - a SafeLoader subclass
    except LungxrayError:
        raise
    except RecursionError:
        raise ConfigError(f"{what} is nested too deeply") from None
    except (yaml.YAMLError, ValueError, TypeError, OverflowError) as err:
        # ValueError: e.g. an integer of 5000 digits; TypeError: an unhashable mapping key.
        raise ConfigError(f"{what} is not valid {kind}: {_one_line(err)}") from None


# --------------------------------------------------------------------------- Keras archives


def check_keras_archive(path: Path, limits: Limits = DEFAULT) -> dict[str, int]:
    """Refuse a ``.keras`` zip whose ``config.json`` (which Keras reads whole into memory) or
    whole content inflates beyond the limits, judged on the zip directory before inflating,
    and whose ``config.json`` is nested too deeply. Returns each member's inflated size."""
    return read_keras_archive(path, limits)[0]


def read_keras_archive(path: Path, limits: Limits = DEFAULT) -> tuple[dict[str, int], Any]:
    """(inflated size of each member, parsed ``config.json``), checked as
    :func:`check_keras_archive` says."""
    path = Path(path)
    what = f"model file {quote(str(path))}"
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            total = sum(m.file_size for m in members)
            if total > limits.max_model_folder_bytes:
                raise ModelError(f"{what} inflates to {total} bytes, more than the limit of "
                                 f"{limits.max_model_folder_bytes}")
            config = next((m for m in members if m.filename == "config.json"), None)
            if config is None:
                raise ModelError(f"{what} has no config.json; not a Keras .keras file")
            if config.file_size > limits.max_model_config_bytes:
                raise ModelError(f"{what}: config.json inflates to {config.file_size} bytes, "
                                 f"more than the limit of {limits.max_model_config_bytes}")
            with archive.open(config) as fh:
                content = fh.read(limits.max_model_config_bytes + 1)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error) as err:
        raise ModelError(f"{what} is not a valid .keras archive: {_one_line(err)}") from None
    except FileNotFoundError:
        raise ModelError(f"{what} does not exist") from None
    except (OSError, NotImplementedError, RuntimeError) as err:
        raise ModelError(f"cannot read {what}: {_one_line(err)}") from None
    if len(content) > limits.max_model_config_bytes:
        raise ModelError(f"{what}: config.json is larger than its zip entry says")
    json_limits = Limits(**{**limits.__dict__,
                            "max_json_bytes": limits.max_model_config_bytes})
    config_value = loads_json(content, f"{what}: config.json", json_limits, ModelError)
    return {m.filename: m.file_size for m in members}, config_value


# --------------------------------------------------------------------------- model folders


def check_dir_name(name: str) -> None:
    """Refuse a model name that cannot be a single directory name (empty, ``.``/``..``, a path
    separator, hidden)."""
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise DataError(f"model name {quote(name, 60)} cannot be used as a directory name")


def _resolve_inside(root: Path, relative: Path, folder: Path,
                    error: type[LungxrayError] = ModelError) -> tuple[Path, os.stat_result]:
    """``root/relative`` with every link on its way resolved, and that path's ``lstat``; a
    link that leaves ``root`` (``root`` itself resolved), or names a device such as
    /dev/zero, is refused before anything opens it. ``folder`` is how messages name ``root``."""
    try:
        resolved = (root / relative).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise error(f"model folder {quote(str(folder))}: {quote(str(relative))} is a "
                    f"symlink loop") from None
    if root not in resolved.parents:
        raise error(f"model folder {quote(str(folder))}: {quote(str(relative))} links "
                    f"outside the folder")
    return resolved, resolved.lstat()


def _plan_copy(source: Path, limits: Limits) -> Iterator[tuple[Path, int]]:
    """(relative path, size) of every file to copy; refuses links out, special files and a
    total over ``max_model_folder_bytes``. Directories are walked without following links."""
    root = source.resolve()
    total = 0
    stack = [Path()]
    while stack:
        relative = stack.pop()
        with os.scandir(root / relative) as entries:
            for entry in sorted(entries, key=lambda e: e.name):
                rel = relative / entry.name
                # A link inside the folder is copied as the file it names; one that leaves
                # the folder (or names a device such as /dev/zero) is refused.
                _, info = _resolve_inside(root, rel, source)
                if stat.S_ISDIR(info.st_mode):
                    if entry.is_symlink():
                        raise ModelError(f"model folder {quote(str(source))}: "
                                         f"{quote(str(rel))} is a link to a folder")
                    stack.append(rel)
                    continue
                if not stat.S_ISREG(info.st_mode):
                    raise ModelError(f"model folder {quote(str(source))}: {quote(str(rel))} is "
                                     f"not a regular file")
                total += info.st_size
                if total > limits.max_model_folder_bytes:
                    raise ModelError(f"model folder {quote(str(source))} holds more than "
                                     f"{limits.max_model_folder_bytes} bytes")
                yield rel, info.st_size


def check_model_file(folder: Path, relative: Path | str, what: str, max_bytes: int,
                     error: type[LungxrayError] = ModelError) -> tuple[Path, int]:
    """(resolved path, size) of the file ``folder/relative``, checked before anything opens
    it: inside ``folder`` once links are resolved, a regular file (a FIFO would hang its
    reader, /dev/zero never end, a directory is no file) of at most ``max_bytes``. Raises
    FileNotFoundError when there is nothing at that path, so a caller can say what is missing."""
    folder, relative = Path(folder), Path(relative)
    path = folder / relative
    try:
        resolved, info = _resolve_inside(folder.resolve(), relative, folder, error)
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} {quote(str(path))} does not exist") from None
    except OSError as err:
        raise error(f"cannot read {what} {quote(str(path))}: {err.strerror or err}") from None
    if not stat.S_ISREG(info.st_mode):
        raise error(f"{what} {quote(str(path))} is a {kind_of(info.st_mode)}, not a regular "
                    f"file")
    if info.st_size > max_bytes:
        raise error(f"{what} {quote(str(path))} has {info.st_size} bytes, more than the limit "
                    f"of {max_bytes}")
    return resolved, info.st_size


def check_model_folder(source: Path, limits: Limits = DEFAULT) -> list[tuple[Path, int]]:
    """What :func:`copy_model_folder` would copy ((relative path, size) pairs); raises its
    ModelError first, so a caller can refuse a folder before doing any other work."""
    source = Path(source)
    if not source.is_dir():
        raise ModelError(f"model folder {quote(str(source))} is not a directory")
    try:
        return list(_plan_copy(source, limits))
    except OSError as err:
        raise ModelError(f"cannot read model folder {quote(str(source))}: "
                         f"{err.strerror or err}") from None


def copy_model_folder(source: Path, dest: Path, limits: Limits = DEFAULT) -> None:
    """Copy a model folder: regular files inside ``source`` only, links never followed out,
    at most ``max_model_folder_bytes`` in all. Everything is checked before ``dest`` is
    created; ``dest`` must not exist. Used by ``compare`` (best_model/) and promotion."""
    source, dest = Path(source), Path(dest)
    plan = check_model_folder(source, limits)
    root = source.resolve()
    dest.mkdir(parents=True)
    for rel, size in plan:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        _copy_file(root / rel, dest / rel, size)


def _copy_file(src: Path, dst: Path, size: int) -> None:
    """Copy at most ``size`` bytes (what was planned; a file that grew is cut, never endless)."""
    fd = os.open(src, os.O_RDONLY | os.O_NONBLOCK)
    with os.fdopen(fd, "rb") as fin, open(dst, "xb") as fout:
        if not stat.S_ISREG(os.fstat(fin.fileno()).st_mode):
            raise ModelError(f"{quote(str(src))} changed into a non-regular file")
        left = size
        while left > 0:
            chunk = fin.read(min(COPY_CHUNK, left))
            if not chunk:
                break
            fout.write(chunk)
            left -= len(chunk)
    os.utime(dst, ns=(os.stat(src).st_atime_ns, os.stat(src).st_mtime_ns))


def replace_atomically(path: Path, write: Callable[[IO[bytes]], Any], fsync: bool = False,
                       need: int | None = None) -> None:
    """Write ``path`` through ``write(binary file)`` into a unique temporary file beside it, then
    rename it over ``path``: a reader sees the old file or the whole new one, never a part; a
    killed writer, or ``write`` raising, leaves no temporary file and the old file in place;
    two writers (two pods on a shared volume) never share a temporary file. A full disk is a
    :class:`OutputError` naming ``path`` (and ``need``, the bytes it takes, when known)."""

    def write_file(temp: Path) -> None:
        with open(temp, "wb") as out:
            write(out)
            if fsync:
                out.flush()
                os.fsync(out.fileno())

    with no_space_as_error(path, need):
        replace_via_temp(path, write_file)


def write_text_atomic(path: Path, text: str, fsync: bool = False) -> None:
    """:func:`replace_atomically` for UTF-8 text."""
    data = text.encode("utf-8")
    replace_atomically(path, lambda out: out.write(data), fsync=fsync, need=len(data))


def replace_via_temp(path: Path, write: Callable[[Path], Any], suffix: str = ".tmp") -> None:
    """:func:`replace_atomically` for writers that want a file name (Keras, h5py, matplotlib):
    ``write(temp)`` fills a unique ``.<name>.XXXX<suffix>`` beside ``path`` (``suffix`` keeps
    the extension such writers insist on), which is then renamed over ``path``; removed if
    ``write`` raises or the process is stopped by a signal."""
    path = Path(path)
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")
        try:
            # Not mkstemp: its 0600 would outlive the rename; the umask decides, as for any file.
            os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            break
        except FileExistsError:
            continue
    try:
        write(temp)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- full disks

NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})


def free_bytes(path: Path) -> int | None:
    """Free bytes on the file system that holds ``path`` (or, not yet created, its nearest
    existing parent); None where that cannot be told."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def no_space(path: Path, need: int | None = None) -> OutputError:
    """The one-line error for a full disk: the path, the bytes needed (when known), the bytes
    free."""
    free = free_bytes(Path(path).parent)
    needed = f"needs about {need:,} bytes" if need else "needs more space"
    shown = f", {free:,} bytes free on its file system" if free is not None else ""
    return OutputError(f"no space left for {quote(str(path))}: it {needed}{shown}")


@contextlib.contextmanager
def no_space_as_error(path: Path, need: int | None = None) -> Iterator[None]:
    """Turn a full disk (ENOSPC, EDQUOT) inside the block into :func:`no_space` for ``path``
    and the ``need`` bytes it takes; other errors pass."""
    try:
        yield
    except OSError as err:
        if err.errno not in NO_SPACE:
            raise
        raise no_space(Path(path), need) from None


def check_free_space(path: Path, need: int, what: str) -> None:
    """Refuse before starting when the file system of ``path`` has less than ``need`` bytes
    free (``what`` names the output in the error)."""
    free = free_bytes(path)
    if free is not None and free < need:
        raise OutputError(f"{what} {quote(str(path))} needs about {need:,} bytes of disk "
                           f"space, only {free:,} free on its file system")


def reserve(path: Path, size: int) -> None:
    """Allocate ``size`` bytes of ``path`` on disk now. A memory-mapped file is sparse: on a
    full disk, writing one of its pages kills the process with SIGBUS and no message; reserved
    first, the full disk is an OSError (ENOSPC) here instead, for the caller to report with
    :func:`no_space_as_error`."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as err:
        # A file system that cannot allocate ahead is written as before.
        if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
    finally:
        os.close(fd)
