"""Build an output in a staging folder and publish it whole: a reader sees the old output or the
complete new one, never a part.

Staging folders never outlive their run: removed on errors, SIGTERM and SIGINT, and swept by the
next run after a SIGKILL (a live run holds a lock on its own). :func:`publish` moves a finished
one into place.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import os
import shutil
import signal
import sys
import tempfile
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(SystemExit):
    """SIGTERM (how Kubernetes stops a pod) or SIGINT arrived; exits 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise :class:`Stopped` in the main thread so ``finally`` blocks run;
    a second signal during that cleanup is ignored. Outside the main thread a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: object) -> None:
        if _held:  # inside signals_blocked(): stop when it ends
            _deferred.append(signum)
            return
        _stop(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    hook = sys.unraisablehook

    def unraisable(info: object) -> None:  # a swallowed stop: no traceback, check_stopped acts
        if not isinstance(getattr(info, "exc_value", None), Stopped):
            hook(info)

    sys.unraisablehook = unraisable
    try:
        yield
        check_stopped()
    except Stopped:
        _requested.clear()  # delivered: nothing left pending
        raise
    finally:
        sys.unraisablehook = hook
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _stop(signum: int) -> None:
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)
    _requested.append(signum)
    raise Stopped(signum)


_requested: list[int] = []  # stops raised; cleared once delivered (see check_stopped)


def check_stopped() -> None:
    """Raise a stop whose :class:`Stopped` was swallowed: raised while a garbage-collection
    callback or a ``__del__`` ran (JAX's ``_xla_gc_callback``, seen), Python reports it as
    "Exception ignored" and goes on, so the block would otherwise finish as if never stopped."""
    if _requested:
        signum = _requested[-1]
        _requested.clear()
        raise Stopped(signum)



_held: list[bool] = []  # one entry per signals_blocked() section open in the main thread
_deferred: list[int] = []  # stop signals that arrived in such a section


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for a few file operations that must not be cut in half. Blocked
    in this thread; a signal that another thread takes (numpy's and TensorFlow's threads do not
    block it) still runs the :func:`stop_on_signals` handler here, which defers it to the end
    of the section."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    _held.append(True)
    try:
        yield
    finally:
        _held.pop()
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        if not _held and _deferred:
            signum = _deferred[0]
            _deferred.clear()
            _stop(signum)


def sweep(parent: Path, prefix: str) -> None:
    """Remove ``parent/<prefix>*`` folders that no live run holds locked (left by SIGKILL)."""
    for old in Path(parent).glob(glob.escape(prefix) + "*"):
        try:
            fd = os.open(old, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue  # a run in progress
        else:
            shutil.rmtree(old, ignore_errors=True)
        finally:
            os.close(fd)


@contextlib.contextmanager
def staging_dir(parent: Path, prefix: str, what: str = "lungxray") -> Iterator[Path]:
    """A locked folder ``parent/<prefix>XXXX`` for building an output; removed when the block
    raises or a SIGTERM/SIGINT arrives (then exits 128 + signal), and so is ``parent`` when this
    made it and it is left empty: a failed first run leaves no output folder. On success the
    caller has moved what it needs out; whatever is left is removed too."""
    parent = Path(parent)
    created = not parent.exists()
    parent.mkdir(parents=True, exist_ok=True)
    try:
        yield from _locked_staging(parent, prefix, what)
    except BaseException:
        if created:
            with contextlib.suppress(OSError):
                parent.rmdir()
        raise


def _locked_staging(parent: Path, prefix: str, what: str) -> Iterator[Path]:
    sweep(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with stop_on_signals():
            try:
                yield path
                check_stopped()
            except Stopped as err:
                shutil.rmtree(path, ignore_errors=True)
                print(f"{what}: stopped by {signal.Signals(err.signum).name}; removed the "
                      f"staging folder {path}", file=sys.stderr)
                raise
            finally:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)


def check_replaceable(output: Path, markers: tuple[str, ...]) -> None:
    """Refuse to replace ``output`` unless it is absent, empty or an earlier output of the same
    kind (every file in ``markers`` present): a foreign directory is never removed."""
    output = Path(output)
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise FileExistsError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not all(
        (output / m).exists() for m in markers
    ):
        raise FileExistsError(f"output {output} is a non-empty directory that is not a report")


def _move_or_copy(build: Path, output: Path, markers: tuple[str, ...]) -> None:
    try:
        os.replace(build, output)
    except OSError:
        # Some mounts (e.g. object-store FUSE) cannot rename directories: copy instead, with the
        # files that make the output look complete (``markers``) copied last.
        output.mkdir(parents=True, exist_ok=True)
        for item in sorted(build.iterdir(), key=lambda p: p.name in markers):
            dest = output / item.name
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy2(item, dest)
        shutil.rmtree(build, ignore_errors=True)


def publish(build: Path, output: Path, markers: tuple[str, ...]) -> None:
    """Move the finished ``build`` folder to ``output`` in one rename, replacing an earlier
    output (checked first with :func:`check_replaceable`). Where directories cannot be renamed
    the copy writes ``markers`` last; a failed copy puts the previous output back."""
    build, output = Path(build), Path(output)
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
        else:
            output.rmdir()
    try:
        _move_or_copy(build, output, markers)
    except BaseException:
        if old is not None:  # put the previous output back rather than lose it
            shutil.rmtree(output, ignore_errors=True)  # a partial copy, if any
            os.replace(old, output)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
