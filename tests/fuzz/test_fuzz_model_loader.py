"""Property-based fuzzing of the bounded model loader (issue 34): a real model folder (one
SmallCNN, or an ensemble of two), mutated a few ways at once (a file swapped for a FIFO, a
directory or a link, truncated, bytes flipped, archive members dropped, compressed or replaced,
JSON replaced), either loads or is refused with one ModelError line, within the time bound, and
the folder is left as it was given."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import stat
import tempfile
import zipfile
import zlib
from pathlib import Path

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from lungxray import model_loader
from lungxray.artifacts import ENSEMBLE_FILE, INFO_FILE, MEMBERS_DIR, MODEL_FILE
from lungxray.errors import ModelError
from tests.test_model_loader import replace_with

TIMEOUT = 300 if settings().max_examples < 1000 else 3600
SINGLE = [MODEL_FILE, INFO_FILE]
ENSEMBLE = [ENSEMBLE_FILE, f"{MEMBERS_DIR}/A/{MODEL_FILE}", f"{MEMBERS_DIR}/A/{INFO_FILE}",
            f"{MEMBERS_DIR}/B/{MODEL_FILE}"]
OPS = ["fifo", "dir", "dev-zero", "outside", "inside", "loop", "missing", "empty", "truncate",
       "flip", "junk", "member", "json"]
MEMBER_OPS = ["drop", "deflate", "junk", "json", "extra", "rename"]
_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**40, 2**40) | st.text(max_size=8)
                     | st.floats(allow_nan=True), lambda inner: st.lists(inner, max_size=4)
                     | st.dictionaries(st.sampled_from(
                         ["members", "class_names", "image_size", "channels", "class_name",
                          "config", "layers", "units", "name", "threshold"]), inner, max_size=5),
                     max_leaves=12)


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    from tests.test_model_loader import small_ensemble_dir, small_model_dir

    root = tmp_path_factory.mktemp("bases")
    single = small_model_dir(root / "single")
    return {"single": single, "ensemble": small_ensemble_dir(root / "ensemble",
                                                             {"A": single, "B": single})}


@st.composite
def mutations(draw, targets: list[str]) -> list[tuple]:
    found = []
    for _ in range(draw(st.integers(1, 3))):
        target, op = draw(st.sampled_from(targets)), draw(st.sampled_from(OPS))
        if op in ("truncate", "flip"):
            arg = draw(st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1,
                                max_size=6))
        elif op == "junk":
            arg = draw(st.binary(max_size=400))
        elif op == "member":
            arg = (draw(st.sampled_from(MEMBER_OPS)),
                   draw(st.sampled_from(sorted(model_loader.KERAS_MEMBERS))),
                   json.dumps(draw(_JSON)).encode())
        elif op == "json":
            arg = json.dumps(draw(_JSON)).encode()
        else:
            arg = None
        found.append((target, op, arg))
    return found


def _rewrite(path: Path, op: str, member: str, body: bytes) -> None:
    with zipfile.ZipFile(path) as old:
        members = {n: old.read(n) for n in old.namelist()}
    kinds = dict.fromkeys(members, zipfile.ZIP_STORED)
    if op == "drop":
        members.pop(member, None)
    elif op == "deflate":
        kinds[member] = zipfile.ZIP_DEFLATED
    elif op == "rename" and member in members:
        members[member + ".old"] = members.pop(member)
    elif op == "extra":
        members["assets/" + member] = body
    else:
        members[member] = body if op == "json" else os.urandom(len(body))
    path.unlink()
    with zipfile.ZipFile(path, "w") as new:
        for name, data in members.items():
            new.writestr(name, data, compress_type=kinds.get(name, zipfile.ZIP_STORED))


def _mutate(folder: Path, outside: Path, target: str, op: str, arg) -> None:
    path = folder / target
    if not path.parent.is_dir() or not (path.is_file() and not path.is_symlink()):
        return  # an earlier mutation took its place
    if op in ("truncate", "flip", "junk", "json", "empty"):
        raw = bytearray(path.read_bytes())
        if op == "truncate":
            raw = raw[:int(arg[0][0] * len(raw))]
        elif op == "flip":
            for where, value in arg:
                if raw:
                    raw[min(int(where * len(raw)), len(raw) - 1)] = value
        else:
            raw = bytearray(arg if op in ("junk", "json") else b"")
        path.write_bytes(bytes(raw))
    elif op == "member":
        # An archive an earlier mutation broke stays as it is: the loader sees that instead.
        with contextlib.suppress(zipfile.BadZipFile, OSError, EOFError, ValueError, zlib.error):
            _rewrite(path, *arg)
    elif op == "missing":
        path.unlink()
    else:
        shutil.copyfile(path, outside / path.name)
        replace_with(path, op, outside / path.name)


def _snapshot(root: Path) -> dict[str, tuple]:
    """Mode, link target and content hash of everything under ``root``, links not followed
    and FIFOs never opened."""
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISLNK(info.st_mode):
            found[str(path)] = ("link", os.readlink(path))
        elif stat.S_ISREG(info.st_mode):
            found[str(path)] = ("file", hashlib.sha256(path.read_bytes()).hexdigest())
        else:
            found[str(path)] = (stat.S_IFMT(info.st_mode), None)
    return found


def _check(base: Path, changes: list[tuple]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        folder, outside = Path(tmp) / "model", Path(tmp) / "outside"
        shutil.copytree(base, folder)
        outside.mkdir()
        for change in changes:
            _mutate(folder, outside, *change)
        before = _snapshot(Path(tmp))
        try:
            predictor = model_loader.load(folder)
        except ModelError as err:
            text = str(err)
            assert "\n" not in text and "\r" not in text and len(text) < 4000, text[:300]
            event("refused: " + re.sub(r"'[^']*'", "PATH", text)[:70])
        else:
            assert predictor.members and predictor.info["class_names"]
            event("loaded")
        assert _snapshot(Path(tmp)) == before


@pytest.mark.timeout(TIMEOUT)
@settings(max_examples=max(10, settings().max_examples // 2))
@given(changes=mutations(SINGLE))
def test_fuzz_a_mutated_model_folder_loads_or_is_refused_in_one_line(bases, changes):
    _check(bases["single"], changes)


@pytest.mark.timeout(TIMEOUT)
@settings(max_examples=max(10, settings().max_examples // 2))
@given(changes=mutations(ENSEMBLE))
def test_fuzz_a_mutated_ensemble_loads_or_is_refused_in_one_line(bases, changes):
    _check(bases["ensemble"], changes)
