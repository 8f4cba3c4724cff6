"""`lungxray export`: a SavedModel whose signatures give the Keras model's outputs."""

from __future__ import annotations

import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from lungxray import artifacts, cli, export, models, predict
from lungxray import images as imaging
from lungxray.errors import ConfigError, ModelError, OutputError
from tests.data_helpers import real_images
from tests.test_predict import CLASSES, SIZE, ensemble_dir, tiny_model_dir

TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "VGG16", threshold=0.6)


@pytest.fixture(scope="module")
def exported(model_dir, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("serving") / "lungxray"
    export.export(model_dir, base, version=3)
    return base


@pytest.fixture(scope="module")
def xrays(shared_npz) -> np.ndarray:
    return real_images(shared_npz, per_class=4)[0]  # (8, 28, 28) uint8


def png(pixels: np.ndarray, size: tuple[int, int] | None = None, fmt: str = "PNG",
        mode: str = "L") -> bytes:
    image = Image.fromarray(pixels).convert(mode)
    if size:
        image = image.resize(size, Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_layout_and_signatures(exported):
    version = exported / "3"
    assert (version / "saved_model.pb").is_file() and (version / "variables").is_dir()
    meta = json.loads((version / export.METADATA_DIR / export.METADATA_FILE).read_text())
    assert meta["class_names"] == CLASSES and meta["threshold"] == 0.6 and meta["version"] == 3
    loaded = tf.saved_model.load(str(version))
    assert set(loaded.signatures) == set(export.SIGNATURES)
    for name in export.SIGNATURES:
        assert set(loaded.signatures[name].structured_outputs) == set(export.OUTPUTS)
    assert not [p for p in exported.iterdir() if p.name.startswith(".")]  # no staging left


def test_pixel_signatures_equal_the_keras_model(model_dir, exported, xrays):
    keras_model = models.load_model(model_dir / artifacts.MODEL_FILE)
    x = imaging.convert_array(xrays[..., None], SIZE, 1)
    expected = keras_model.predict(x.astype(np.float32), verbose=0)
    assert expected[:, 1].std() > 0.01
    serving = tf.saved_model.load(str(exported / "3")).signatures
    for name, batch in (("serving_default", tf.constant(x, tf.float32)),
                        ("predict_uint8", tf.constant(x, tf.uint8))):
        out = serving[name](images=batch)
        diff = np.abs(out["probabilities"].numpy() - expected).max()
        assert diff <= TOLERANCE, (name, diff)
        decided = (expected[:, 1] >= 0.6).astype(np.int64)
        np.testing.assert_array_equal(out["class_index"].numpy(), decided)
        assert [c.decode() for c in out["class_name"].numpy()] == [CLASSES[i] for i in decided]


def test_image_bytes_signature_decodes_as_the_data_step(model_dir, exported, xrays):
    keras_model = models.load_model(model_dir / artifacts.MODEL_FILE)
    serving = tf.saved_model.load(str(exported / "3")).signatures["predict_image_bytes"]
    at_size = imaging.convert_array(xrays[..., None], SIZE, 1)
    # PNGs at the model's size: decoded losslessly, so the outputs match to 1e-5.
    files = [png(image[..., 0]) for image in at_size]
    expected = keras_model.predict(at_size.astype(np.float32), verbose=0)
    out = serving(image_bytes=tf.constant(files))
    assert np.abs(out["probabilities"].numpy() - expected).max() <= TOLERANCE
    # Other sizes, RGB and JPEG (large ones decoded at reduced scale, as PIL's draft does):
    # resized in the graph as PIL resizes in the data step, to within one grey level.
    others = [png(xrays[0], (50, 70)), png(xrays[1], (64, 64), mode="RGB"),
              png(xrays[2], (96, 80), fmt="JPEG"), png(xrays[3], (900, 700), fmt="JPEG",
                                                       mode="RGB")]
    pil = np.stack([imaging.decode(f, "x", SIZE, 1) for f in others]).astype(np.float32)
    settings = predict.settings_for(json.loads((model_dir / artifacts.INFO_FILE).read_text()))
    graph = export.decode_images(tf.constant(others), settings).numpy()
    assert np.abs(graph - pil).max() <= 1.0
    out = serving(image_bytes=tf.constant(others))
    np.testing.assert_allclose(out["probabilities"].numpy(),
                               keras_model.predict(pil, verbose=0), atol=0.01)


def test_ensemble_exports_the_mean_of_its_members(model_dir, tmp_path, xrays):
    other = tiny_model_dir(tmp_path / "other", seed=5)
    best = ensemble_dir(tmp_path / "best_model", {"NetA": model_dir, "NetB": other},
                        threshold=0.5)
    result = export.export(best, tmp_path / "serving")
    assert result["members"] == 2
    x = imaging.convert_array(xrays[..., None], SIZE, 1).astype(np.float32)
    expected = np.mean([models.load_model(d / artifacts.MODEL_FILE).predict(x, verbose=0)
                        for d in (model_dir, other)], axis=0)
    loaded = tf.saved_model.load(str(tmp_path / "serving" / "1"))
    out = loaded.signatures["serving_default"](images=tf.constant(x))
    assert np.abs(out["probabilities"].numpy() - expected).max() <= TOLERANCE


def test_existing_versions_and_unusable_models_are_refused(model_dir, exported, tmp_path):
    before = (exported / "3" / "saved_model.pb").read_bytes()
    with pytest.raises(ConfigError, match="version 3 exists; pass --force"):
        export.export(model_dir, exported, version=3)
    assert (exported / "3" / "saved_model.pb").read_bytes() == before
    for version in (0, 2**63):  # TF Serving reads version folders as int64
        with pytest.raises(ConfigError, match="positive integer up to"):
            export.export(model_dir, tmp_path / "s", version=version)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="not a lungxray model"):
        export.export(tmp_path / "empty", tmp_path / "s")
    lying = tiny_model_dir(tmp_path / "lying", info_size=64)
    with pytest.raises(ModelError, match=r"takes \(32, 32, 1\) images but its info says"):
        export.export(lying, tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_cli_export_force_replaces_a_version(model_dir, tmp_path, capsys):
    args = ["export", "--model", str(model_dir), "--output", str(tmp_path / "m"), "--version",
            "2"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["saved_model"] == str(tmp_path / "m" / "2")
    assert cli.main(args) == 2
    assert "lungxray export: error: " in capsys.readouterr().err
    assert cli.main([*args, "--force"]) == 0
    assert (tmp_path / "m" / "2" / "saved_model.pb").is_file()


# --------------------------------------------------------------------------- kills, full disks

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def small_model(tmp_path_factory) -> Path:
    from tests.test_model_loader import small_model_dir

    return small_model_dir(tmp_path_factory.mktemp("small") / "model")


def test_sigterm_mid_export_leaves_no_staging_and_a_later_run_succeeds(small_model, tmp_path):
    # Issue 34: SIGTERM left .export-* behind, and later runs never removed it.
    out = tmp_path / "serving"
    stale = out / ".export-stale"  # what a SIGKILLed run leaves: swept by the next run
    stale.mkdir(parents=True)
    (stale / "variables.data").write_bytes(b"x" * 1000)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}",
           "TF_CPP_MIN_LOG_LEVEL": "3"}
    child = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "export", "--model",
                              str(small_model), "--output", str(out)], env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not [p for p in out.glob(".export-*") if p != stale]:  # its own staging: writing
        assert child.poll() is None and time.monotonic() < deadline, child.communicate()
        time.sleep(0.02)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and "Traceback" not in err
    # No staging left; a version only if the signal came after its rename (signals wait
    # during the rename, so it is then whole).
    left = [p.name for p in out.iterdir()]
    assert left in ([], ["1"]), left
    assert all((out / name / "saved_model.pb").is_file() for name in left)
    version = str(len(left) + 1)
    export.export(small_model, out, version=int(version))
    assert (out / version / "saved_model.pb").is_file()
    assert sorted(p.name for p in out.iterdir()) == [*left, version]


def _full_disk(kind: str):
    def write(members, info, path):
        (path / "variables").mkdir(parents=True)
        (path / "variables" / "variables.data-00000-of-00001").write_bytes(b"x" * 1000)
        if kind == "tensorflow":
            raise tf.errors.ResourceExhaustedError(
                None, None, "{{function_node __wrapped__SaveV2_dtypes_66_device_/job:localhost"
                f"/replica:0/task:0/device:CPU:0}}}} {path}/variables/variables_temp/part-00000"
                "-of-00001.data-00000-of-00001.tempstate1; No space left on device [Op:SaveV2]")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path / "saved_model.pb"))
    return write


@pytest.mark.parametrize("kind", ["tensorflow", "python"])
def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(small_model, tmp_path, kind,
                                                                 monkeypatch, capsys):
    # Issue 34: a full disk gave TensorFlow's ResourceExhaustedError traceback.
    out = tmp_path / "serving"
    export.export(small_model, out, version=1)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    monkeypatch.setattr(export, "_write", _full_disk(kind))
    for version, force in ((2, False), (1, True)):  # a new version; one replacing another
        args = ["export", "--model", str(small_model), "--output", str(out), "--version",
                str(version), *(["--force"] if force else [])]
        assert cli.main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("lungxray export: error: "), err
        assert f"no space left for '{out / str(version)}': it needs about 1,152," in err[0]
        assert "bytes free on its file system" in err[0]
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before  # v1 untouched
    # The first export into a new folder leaves no empty folder either.
    with pytest.raises(OutputError, match="no space left for"):
        export.export(small_model, tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


@pytest.fixture()
def tiny_disk(tmp_path):
    """A 512 KiB tmpfs (root only; skipped where mounting is not permitted)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(disk)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        done = None
    if done is None or done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True, timeout=30)


def test_a_real_full_disk(small_model, tiny_disk):
    with pytest.raises(OutputError, match=r"no space left for '.*serving/1': it needs about "
                                          r"1,152,\d\d\d bytes"):
        export.export(small_model, tiny_disk / "serving")
    assert list(tiny_disk.iterdir()) == []
