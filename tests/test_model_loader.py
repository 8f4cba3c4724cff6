"""The bounded model loader (issue 34): a model folder is checked before zipfile, h5py or Keras
opens any file, so a FIFO, a link to /dev/zero, a directory, an oversized or damaged archive,
or a network or weights file declaring gigabytes is one ModelError line within seconds."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from lungxray import model_loader
from lungxray.artifacts import ENSEMBLE_FILE, INFO_FILE, MEMBERS_DIR, MODEL_FILE
from lungxray.errors import ModelError
from lungxray.limits import Limits

ROOT = Path(__file__).resolve().parents[1]
SIZE = 28
CLASSES = ["normal", "pneumonia"]
FAST_S = 10  # a refusal is quick; generous for a shared CI machine


def small_model_dir(path: Path, seed: int = 0) -> Path:
    """An untrained SmallCNN (1.2 MB) saved as `lungxray train` saves a model."""
    import keras

    from lungxray import models

    keras.utils.set_random_seed(seed)
    model = models.build_classifier("SmallCNN", SIZE, 1, len(CLASSES), None, augment=0.0,
                                    seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / MODEL_FILE)
    (path / INFO_FILE).write_text(json.dumps({
        "model_name": "SmallCNN", "class_names": CLASSES, "threshold": 0.5,
        "image_size": SIZE, "channels": 1, "positive_class": 1}))
    return path


def small_ensemble_dir(path: Path, members: dict[str, Path]) -> Path:
    """best_model/ of an ensemble of ``members`` as compare writes it."""
    for name, source in members.items():
        shutil.copytree(source, path / MEMBERS_DIR / name)
    spec = {"model_name": "Ensemble-top2", "members": list(members), "class_names": CLASSES,
            "threshold": 0.5, "image_size": SIZE, "channels": 1}
    (path / ENSEMBLE_FILE).write_text(json.dumps(spec))
    (path / INFO_FILE).write_text(json.dumps(spec))
    return path


def rezip(source: Path, target: Path, replace: dict[str, bytes | None] | None = None,
          compress: frozenset[str] = frozenset()) -> Path:
    """``source`` archive rewritten to ``target``: members replaced (None drops one, a new name
    is added), those in ``compress`` deflated."""
    replace = replace or {}
    with zipfile.ZipFile(source) as old:
        members = {n: old.read(n) for n in old.namelist()}
    members.update(replace)
    target.unlink(missing_ok=True)
    with zipfile.ZipFile(target, "w") as new:
        for name, body in members.items():
            if body is not None:
                kind = zipfile.ZIP_DEFLATED if name in compress else zipfile.ZIP_STORED
                new.writestr(name, body, compress_type=kind)
    return target


def h5_bytes(build) -> bytes:
    """An HDF5 file made by ``build(h5py.File)``, as bytes."""
    import h5py

    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as h5:
        build(h5)
    return buffer.getvalue()


def dense_config(units: int) -> bytes:
    """config.json of a Sequential 28x28 -> Flatten -> Dense(``units``): a few hundred bytes
    that would allocate 784 x units float32 weights while Keras builds the network."""
    import keras

    model = keras.Sequential([keras.Input((SIZE, SIZE, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="probs")])
    config = json.loads(model.to_json())
    for layer in config["config"]["layers"]:
        layer.pop("build_config", None)
        if layer["class_name"] == "Dense":
            layer["config"]["units"] = units
    return json.dumps(config).encode()


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return small_model_dir(tmp_path_factory.mktemp("good") / "model")


@pytest.fixture()
def model(good, tmp_path) -> Path:
    return Path(shutil.copytree(good, tmp_path / "model"))


def _refused(folder: Path, message: str, limits: Limits | None = None,
             load: bool = False) -> str:
    started = time.monotonic()
    with pytest.raises(ModelError) as caught:
        if load:
            model_loader.load(folder, limits)
        else:
            model_loader.open_folder(folder, limits)
    text = str(caught.value)
    assert message in text, text
    assert "\n" not in text and len(text) < 1000, text
    assert time.monotonic() - started < FAST_S
    return text


def replace_with(path: Path, kind: str, outside: Path) -> None:
    """Put a FIFO, a directory or a link where the file ``path`` is; ``outside`` is a copy of
    the file out of the folder."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "outside":
        path.symlink_to(outside)
    elif kind == "inside":
        shutil.copyfile(outside, path.with_name("copy-" + path.name))
        path.symlink_to("copy-" + path.name)
    elif kind == "loop":
        path.symlink_to(path.name)


@pytest.mark.parametrize("name", [MODEL_FILE, INFO_FILE])
@pytest.mark.parametrize("kind, message", [
    ("fifo", "is a FIFO, not a regular file"),
    ("dir", "is a directory, not a regular file"),
    ("dev-zero", "links outside the folder"),
    ("outside", "links outside the folder"),
    ("loop", "symlink loop"),
])
def test_model_files_that_are_not_regular_files_inside_are_refused(model, good, tmp_path,
                                                                   name, kind, message):
    outside = Path(shutil.copy(good / name, tmp_path / f"elsewhere-{name}"))
    replace_with(model / name, kind, outside)
    _refused(model, message)


def test_a_link_inside_the_folder_is_followed(model, good):
    (model / MODEL_FILE).rename(model / "weights-v1.keras")
    (model / MODEL_FILE).symlink_to("weights-v1.keras")
    predictor = model_loader.load(model)
    assert predictor.info["class_names"] == CLASSES
    assert tuple(predictor.members[0].inputs[0].shape[1:]) == (SIZE, SIZE, 1)


def test_sizes_are_checked_before_reading(model, monkeypatch):
    size = (model / MODEL_FILE).stat().st_size
    _refused(model, f"has {size} bytes, more than the limit of 1000",
             Limits(max_model_folder_bytes=1000))
    monkeypatch.setenv("LUNGXRAY_MAX_JSON_BYTES", "50")  # the environment's limits apply
    _refused(model, "more than the limit of 50")
    monkeypatch.delenv("LUNGXRAY_MAX_JSON_BYTES")
    # A sparse 9 GiB model.keras: refused on its size, nothing read.
    with open(model / MODEL_FILE, "r+b") as fh:
        fh.truncate(9 << 30)
    _refused(model, f"has {9 << 30} bytes, more than the limit of")


@pytest.mark.parametrize("damage, message", [
    ("truncated", "not a valid .keras archive"),
    ("garbage", "not a valid .keras archive"),
    ("empty", "not a valid .keras archive"),
])
def test_damaged_archives_are_refused(model, damage, message):
    path = model / MODEL_FILE
    body = path.read_bytes()
    path.write_bytes({"truncated": body[:len(body) // 2], "garbage": os.urandom(5000),
                      "empty": b""}[damage])
    _refused(model, message)


def test_missing_and_unusable_model_info(model):
    (model / INFO_FILE).unlink()
    _refused(model, "not a lungxray model (no model_info.json")
    (model / INFO_FILE).write_text(json.dumps({"class_names": CLASSES, "image_size": "big",
                                               "channels": 1}))
    _refused(model, "lacks a usable image_size/channels")
    (model / INFO_FILE).write_text("[" * 10_000 + "]" * 10_000)
    _refused(model, "nested")
    info = {"class_names": CLASSES, "image_size": SIZE, "channels": 1, "threshold": 0.5}
    for change, message in [({"class_names": None}, "needs 'class_names'"),
                            ({"clas_names": CLASSES, "class_names": None}, "'class_names'"),
                            ({"class_names": ["a", "a"]}, "2 to 1000 distinct names"),
                            ({"threshold": 2}, "'threshold' must be a number in 0..1"),
                            ({"site_thresholds": [0.5]}, "must map at most 16 site names"),
                            ({"site_thresholds": {"../x": 0.5}}, "site name '../x' must be"),
                            ({"site_thresholds": {"nih": True}},
                             "the threshold of site 'nih' must be a number in 0..1"),
                            ({"site_thresholds": {"nih": 1.5}}, "must be a number in 0..1"),
                            ({"model_name": ["x"]}, "'model_name' must be text")]:
        (model / INFO_FILE).write_text(json.dumps({**info, **change}))
        _refused(model, message)
    # Three class names for a network with two outputs: every column would be wrong.
    (model / INFO_FILE).write_text(json.dumps({**info, "class_names": ["a", "b", "c"]}))
    _refused(model, "the network gives 2 class probabilities but its info names 3", load=True)
    (model / MODEL_FILE).unlink()
    (model / INFO_FILE).write_text(json.dumps({"class_names": CLASSES, "image_size": SIZE,
                                               "channels": 1}))
    _refused(model, "not a lungxray model (model file")
    _refused(model.parent / "nowhere", "no such model directory")


def test_ensembles_are_checked_member_by_member(good, tmp_path):
    other = small_model_dir(tmp_path / "other", seed=3)
    best = small_ensemble_dir(tmp_path / "best", {"NetA": good, "NetB": other})
    assert len(model_loader.load(best).members) == 2
    shutil.rmtree(best / MEMBERS_DIR / "NetB")
    _refused(best, "member 'NetB' is not a directory in")
    (best / MEMBERS_DIR / "NetB").symlink_to(other, target_is_directory=True)  # out of best/
    _refused(best, "links outside the folder")
    (best / MEMBERS_DIR / "NetB").unlink()
    shutil.copytree(other, best / MEMBERS_DIR / "NetB")
    os.remove(best / MEMBERS_DIR / "NetB" / MODEL_FILE)
    os.mkfifo(best / MEMBERS_DIR / "NetB" / MODEL_FILE)
    _refused(best, "is a FIFO, not a regular file")
    spec = json.loads((best / ENSEMBLE_FILE).read_text())
    for members, message in ([["NetA", "../../other"], "is not a directory in"],
                             [["NetA"], "must list 2 to"], [["NetA", 5], "is not a directory"]):
        (best / ENSEMBLE_FILE).write_text(json.dumps({**spec, "members": members}))
        _refused(best, message)
    (best / ENSEMBLE_FILE).unlink()
    os.mkfifo(best / ENSEMBLE_FILE)
    _refused(best, "ensemble spec")


def test_archives_hold_only_what_keras_writes(model, tmp_path):
    path = model / MODEL_FILE
    original = tmp_path / "original.keras"
    shutil.copy(path, original)
    rezip(original, path, {"assets/x.bin": b"x" * 100})
    _refused(model, "it holds 'assets/x.bin'")
    rezip(original, path, {"model.weights.h5": None})
    _refused(model, "has no model.weights.h5")
    rezip(original, path, compress=frozenset({"model.weights.h5"}))
    _refused(model, "model.weights.h5 is compressed")
    rezip(original, path, {"model.weights.h5": b"not HDF5" * 100})
    _refused(model, "model.weights.h5 is not a readable HDF5 file")
    rezip(original, path)  # the same members, stored: loads
    assert model_loader.load(model).members


def test_a_weights_file_declaring_more_than_it_holds_is_refused(model, tmp_path):
    import h5py
    import numpy as np

    path = model / MODEL_FILE
    original = tmp_path / "original.keras"
    shutil.copy(path, original)

    def gzip_bomb(h5):  # 256 MB of float32 declared in a file of a few KB
        h5.create_dataset("layers/probs/vars/0", shape=(8000, 8000), dtype="float32",
                          chunks=(1000, 1000), compression="gzip", fillvalue=0)

    rezip(original, path, {"model.weights.h5": h5_bytes(gzip_bomb)})
    _refused(model, "declares 256000000 bytes of weights in a file of")
    for build, message in [
        (lambda h5: h5.__setitem__("layers", h5py.ExternalLink("/dev/zero", "/")),
         "'layers' is a ExternalLink"),
        (lambda h5: h5.create_dataset("x", shape=(4,), dtype="float32",
                                      external=[("/dev/zero", 0, 16)]),
         "'x' is stored outside the file"),
        (lambda h5: h5.create_dataset("s", data=np.array([b"a", b"b"], dtype=object),
                                      dtype=h5py.string_dtype()), "'s' holds object"),
    ]:
        rezip(original, path, {"model.weights.h5": h5_bytes(build)})
        _refused(model, message)


def test_a_network_needing_more_than_its_weights_is_refused_unbuilt(model, good, tmp_path):
    import resource

    from keras.src.backend.common import global_state

    path = model / MODEL_FILE
    # Dense(200000) on 784 inputs: 628 MB of weights (~2 GB while Keras initialises them)
    # from a config.json of a few hundred bytes, beside SmallCNN's 1.2 MB weights file.
    rezip(good / MODEL_FILE, path, {"config.json": dense_config(200_000)})
    model_loader.open_folder(model)  # the files themselves are fine
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _refused(model, "its network needs 628000000 bytes of weights but model.weights.h5 holds",
             load=True)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200 << 10  # KiB
    # Nothing of it is left to be allocated later, and a good model still loads.
    assert not global_state.get_global_attribute("uninitialized_variables")
    assert model_loader.load(good).members


def _cli(args: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    return subprocess.run([sys.executable, "-m", "lungxray.cli", *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_cli_refuses_a_fifo_model_in_one_line_without_hanging(tmp_path):
    # Issue 34: predict waited forever on a FIFO model.keras; export and challenge read a link
    # to /dev/zero past 3 GiB. No real model is needed: nothing may open the FIFO.
    model = tmp_path / "model"
    model.mkdir()
    (model / INFO_FILE).write_text(json.dumps({"class_names": CLASSES, "image_size": SIZE,
                                               "channels": 1}))
    os.mkfifo(model / MODEL_FILE)
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(b"\x89PNG")
    data = tmp_path / "data"
    data.mkdir()
    for command, extra in [("predict", ["--source", images]), ("export", []),
                           ("evaluate", ["--data", data, "--no-gradcam"])]:
        done = _cli([command, "--model", model, "--output", tmp_path / f"out-{command}",
                     *extra])
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        errors = [line for line in lines if line.startswith(f"lungxray {command}: error: ")]
        assert errors == [lines[-1]], done.stderr
        assert "model.keras' is a FIFO, not a regular file" in errors[0]
        assert not (tmp_path / f"out-{command}").exists()


def test_challenge_loads_the_champion_through_the_loader(good, small_dataset, tmp_path):
    # Issue 34: a champion whose model.keras linked to /dev/zero took challenge past 3 GiB.
    from lungxray import champion, promotion

    home = tmp_path / "champion"
    promotion.promote(good, home, champion.challenge(good, small_dataset, str(home), "run-1"))
    held = champion.read_champion(str(home))
    (held / MODEL_FILE).unlink()
    (held / MODEL_FILE).symlink_to("/dev/zero")
    started = time.monotonic()
    with pytest.raises(ModelError, match="model.keras' links outside the folder"):
        champion.challenge(good, small_dataset, str(home), "run-2")
    assert time.monotonic() - started < FAST_S


def test_read_model_info_reads_the_info_alone_and_names_a_folder_without_one(tmp_path):
    (tmp_path / INFO_FILE).write_text(json.dumps({"model_name": "VGG16"}))
    (tmp_path / MODEL_FILE).write_bytes(b"not an archive: the info is read, not the network")
    assert model_loader.read_model_info(tmp_path) == {"model_name": "VGG16"}
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'empty'}: no {INFO_FILE}; is "
                                                "this a `lungxray train` output"):
        model_loader.read_model_info(tmp_path / "empty")
