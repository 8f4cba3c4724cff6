"""lungxray.staging: a finished output replaces the previous one whole, or not at all; a staging
folder goes away on SIGTERM/SIGINT, and a killed run's is swept by the next (issue 26)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lungxray import staging
from lungxray.artifacts import REPORT_MARKERS


def test_a_failed_copy_fallback_puts_the_previous_report_back(tmp_path, monkeypatch):
    """On a mount that cannot rename directories the report is copied; if that copy fails
    half-way, the previous report comes back whole and no partial one is left."""
    output, build = tmp_path / "report", tmp_path / ".report.build"
    output.mkdir()
    (output / "summary.json").write_text("old summary")
    build.mkdir()
    for name in ("a_chart.png", "summary.json", "report.html"):
        (build / name).write_text(f"new {name}")
    real_replace, real_copy = staging.os.replace, staging.shutil.copy2

    def no_dir_rename(src, dst):
        if Path(src) == build:
            raise OSError("Operation not supported")
        return real_replace(src, dst)

    def disk_full_after_first(src, dst):
        if Path(src).name != "a_chart.png":
            raise OSError("No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(staging.os, "replace", no_dir_rename)
    monkeypatch.setattr(staging.shutil, "copy2", disk_full_after_first)
    with pytest.raises(OSError, match="No space left"):
        staging.publish(build, output, REPORT_MARKERS)
    assert sorted(p.name for p in output.iterdir()) == ["summary.json"]
    assert (output / "summary.json").read_text() == "old summary"
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name] == []


def test_publish_replaces_an_earlier_output_and_refuses_a_foreign_one(tmp_path):
    output = tmp_path / "report"
    for text in ("first", "second"):
        build = tmp_path / f".build-{text}"
        build.mkdir()
        for name in REPORT_MARKERS:
            (build / name).write_text(text)
        staging.check_replaceable(output, REPORT_MARKERS)
        staging.publish(build, output, REPORT_MARKERS)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    assert (output / REPORT_MARKERS[0]).read_text() == "second"
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a report"):
        staging.check_replaceable(foreign, REPORT_MARKERS)


def test_signals_blocked_defers_a_stop_that_another_thread_takes():
    """Issue 34: with numpy's or TensorFlow's threads running, a SIGTERM is delivered to one of
    them and its handler runs in the main thread all the same: inside signals_blocked() it must
    wait for the section's end (a promotion's pointer swap and its note are one step)."""
    import os
    import signal
    import threading

    from lungxray import staging

    go, done = threading.Event(), threading.Event()

    def other_thread() -> None:  # started before the block: SIGTERM is not blocked here
        go.wait(10)
        os.kill(os.getpid(), signal.SIGTERM)
        done.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    steps = []
    with pytest.raises(staging.Stopped) as stopped, staging.stop_on_signals():
        with staging.signals_blocked():
            go.set()
            assert done.wait(10)
            for step in range(1000):  # bytecodes at which a handler could run
                steps.append(step)
        steps.append("after")
    thread.join()
    assert stopped.value.signum == signal.SIGTERM
    assert steps[-1] == 999  # the section finished, nothing after it ran


def test_a_failed_first_run_leaves_no_output_folder(tmp_path):
    fresh, kept = tmp_path / "new" / "out", tmp_path / "old"
    kept.mkdir()
    for parent in (fresh, kept):
        with pytest.raises(RuntimeError), staging.staging_dir(parent, ".x-") as build:
            (build / "part").write_text("half")
            raise RuntimeError("failed")
    assert not fresh.exists() and (tmp_path / "new").is_dir()  # only the folder it made
    assert kept.is_dir() and list(kept.iterdir()) == []
    with staging.staging_dir(fresh, ".x-") as build:  # success keeps it
        (build / "done").write_text("ok")
    assert fresh.is_dir()


def test_a_stop_swallowed_in_a_finalizer_still_stops_the_block(tmp_path, capfd):
    """Seen with JAX loaded: SIGTERM arrived while its gc callback ran, Python printed
    "Exception ignored" and export finished with exit 0 as if never stopped."""

    class Finalized:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10_000):  # the handler runs in here, so Python swallows its raise
                pass

    went_on = []
    with pytest.raises(staging.Stopped) as stop, staging.staging_dir(tmp_path / "out",
                                                                      ".x-") as build:
        Finalized()
        went_on.append((build / "after").write_text("the block went on"))
    assert went_on and stop.value.code == 128 + signal.SIGTERM
    assert not (tmp_path / "out").exists()  # staging and the folder it made are gone
    err = capfd.readouterr().err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    assert signal.getsignal(signal.SIGTERM) is not signal.SIG_IGN  # handlers restored


STAGING_CHILD = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from lungxray import staging
    with staging.staging_dir(Path(sys.argv[1]), ".eval-build-", "lungxray evaluate") as d:
        (d / "partial.bin").write_bytes(b"x" * 1000)
        print(d, flush=True)
        time.sleep(60)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_staging_is_removed_on_sigterm_and_sigint(tmp_path, signum):
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    folder = Path(child.stdout.readline().strip())
    assert folder.is_dir()
    child.send_signal(signum)
    _, err = child.communicate(timeout=30)
    assert child.returncode == 128 + signum
    assert not folder.exists() and list(tmp_path.iterdir()) == []
    assert f"stopped by {signal.Signals(signum).name}" in err and "Traceback" not in err


def test_a_killed_runs_staging_is_swept_but_a_live_one_is_kept(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", STAGING_CHILD, str(tmp_path)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    live = Path(child.stdout.readline().strip())
    dead = tmp_path / ".eval-build-dead"
    dead.mkdir()
    (dead / "partial.bin").write_bytes(b"x")
    try:
        with staging.staging_dir(tmp_path, ".eval-build-") as mine:
            assert mine.is_dir()
        assert not dead.exists() and live.is_dir() and not mine.exists()
    finally:
        child.kill()
        child.wait()
