"""Staging folders that never outlive their run: removed on errors, SIGTERM and SIGINT, and
swept by the next run after a SIGKILL (a live run holds a lock on its own)."""

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
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        raise Stopped(signum)

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def signals_blocked() -> Iterator[None]:
    """Hold SIGTERM/SIGINT back for a few file operations that must not be cut in half."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


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
    raises or a SIGTERM/SIGINT arrives (then exits 128 + signal). On success the caller has
    moved what it needs out; whatever is left is removed too."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    sweep(parent, prefix)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with stop_on_signals():
            try:
                yield path
            except Stopped as err:
                shutil.rmtree(path, ignore_errors=True)
                print(f"{what}: stopped by {signal.Signals(err.signum).name}; removed the "
                      f"staging folder {path}", file=sys.stderr)
                raise
            finally:
                shutil.rmtree(path, ignore_errors=True)
    finally:
        os.close(fd)
