"""Issue 34: a full disk is one error line naming the path and the space it needs, with nothing
half-written, and the re-run after freeing space works. Real full disks: a small tmpfs mounted
per test (root only; skipped with the reason elsewhere)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest

from lungxray import safeio
from lungxray.errors import OutputError
from tests.conftest import ROOT


def error_lines(stderr: str) -> list[str]:
    """stderr's lines (TensorFlow's native ones are kept off it: lungxray.quiet)."""
    return [line for line in stderr.splitlines() if line.strip()]


@dataclass
class Disk:
    """A mounted tmpfs at ``path``; :meth:`resize` frees space by remounting it larger."""

    path: Path

    def resize(self, mib: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={mib}m", str(self.path)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs: a disk that fills up; unmounted afterwards."""
    if shutil.which("mount") is None or shutil.which("umount") is None:
        pytest.skip("no mount command")
    point = tmp_path / "disk"
    point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield Disk(point)
    finally:
        subprocess.run(["umount", "-l", str(point)], check=False)


def _cli(*args: object, no_precheck: bool = False, timeout: int = 600
         ) -> subprocess.CompletedProcess:
    """``python -m lungxray.cli`` in a subprocess; ``no_precheck`` turns the free-space check
    off, so that the disk fills up while writing."""
    code = "import sys; from lungxray import cli; sys.exit(cli.main(sys.argv[1:]))"
    if no_precheck:
        code = "from lungxray import safeio; safeio.check_free_space = lambda *a: None; " + code
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
           "TF_CPP_MIN_LOG_LEVEL": "2"}
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _one_line_error(done: subprocess.CompletedProcess, command: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stderr[-3000:])
    lines = error_lines(done.stderr)
    assert len(lines) == 1, lines
    assert "Traceback" not in done.stderr and "Exception ignored" not in done.stderr
    assert lines[0].startswith(f"lungxray {command}: error: "), lines[0]
    return lines[0]


def _everything_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------------------------- helpers

def test_a_full_disk_is_a_storage_error_naming_the_path_and_the_bytes(tmp_path, monkeypatch):
    target = tmp_path / "state.json"

    def full(out):
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OutputError, match=r"no space left for '.*state.json': it needs about "
                                           r"1,234 bytes, [0-9,]+ bytes free"):
        safeio.replace_atomically(target, full, need=1234)
    assert list(tmp_path.iterdir()) == []
    # Other errors pass unchanged.
    with pytest.raises(PermissionError), safeio.no_space_as_error(target):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=1))
    with pytest.raises(OutputError, match=r"output '.*out' needs about 5,000 bytes of disk "
                                           r"space, only 1 free on its file system"):
        safeio.check_free_space(tmp_path / "not" / "yet" / "out", 5000, "output")


def test_an_atomic_write_keeps_the_usual_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        safeio.write_text_atomic(tmp_path / "a.json", "{}")
        safeio.replace_via_temp(tmp_path / "b.png", lambda t: t.write_bytes(b"x"), ".tmp.png")
    finally:
        os.umask(old)
    for name in ("a.json", "b.png"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.png"]


def test_a_memory_mapped_array_on_a_full_disk_is_an_error_not_a_sigbus(small_disk):
    # In a child: a regression would kill it with SIGBUS, not the test run.
    code = textwrap.dedent("""
        import errno, sys
        from pathlib import Path
        from lungxray import pools
        try:
            pools.new_array_file(Path(sys.argv[1]), (300, 128, 128, 1))  # 4.9 MB
        except OSError as err:
            print("OSError", err.errno == errno.ENOSPC)
    """)
    done = subprocess.run([sys.executable, "-c", code, str(small_disk.path / "pool.npy")],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "OSError True"


# --------------------------------------------------------------------------- preprocess

@pytest.mark.parametrize("precheck", [True, False], ids=["refused first", "full while writing"])
def test_preprocess_on_a_full_disk(precheck, small_disk, shared_npz):
    output = small_disk.path / "data"
    args = ["preprocess", "--source", shared_npz, "--output", output, "--image-size", 32,
            "--max-per-split", 160]
    line = _one_line_error(_cli(*args, no_precheck=not precheck), "preprocess")
    if precheck:
        assert f"output '{output}' needs about " in line and " bytes of disk space, only " in line
    else:
        assert f"no space left for '{output}': it needs about " in line and "bytes free" in line
    assert _everything_under(small_disk.path) == []  # no staging, no half-written output
    small_disk.resize(64)
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((output / "manifest.json").read_text())["image_size"] == 32
    assert [p for p in _everything_under(small_disk.path) if p.startswith(".")] == []


# --------------------------------------------------------------------------- train

@pytest.mark.slow
@pytest.mark.parametrize("precheck", [True, False], ids=["refused first", "full while writing"])
def test_train_on_a_full_disk(precheck, small_disk, small_dataset):
    """The first checkpoint does not fit: one line naming it (no h5py traceback, no crash), no
    half-written file; the re-run after freeing space trains every epoch once."""
    output = small_disk.path / "model"
    args = ["train", "--data", small_dataset, "--model", "SmallCNN", "--output", output,
            "--epochs", 2, "--seed", 0]
    line = _one_line_error(_cli(*args, no_precheck=not precheck), "train")
    checkpoint = output / ".state" / "scratch.epoch-1.weights.h5"
    if precheck:
        assert f"training state '{checkpoint}' needs about " in line, line
    else:
        assert f"no space left for '{checkpoint}': it needs about " in line, line
    assert _everything_under(small_disk.path) == ["model", "model/.state", "model/.state/job.json"]
    small_disk.resize(64)
    done = _cli(*args)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "note:" not in done.stderr and "Traceback" not in done.stderr
    history = json.loads((output / "history.json").read_text())
    assert history["phases"] == [{"name": "scratch", "epochs": 2}]
    assert len(history["history"]["val_auc"]) == 2
    assert sorted(p.name for p in output.iterdir()) == [
        "curves.png", "history.json", "model.keras", "model_info.json"]
