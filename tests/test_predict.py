"""`lungxray predict`: unlabeled folders, CSVs and npz files through a tiny real model."""

from __future__ import annotations

import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungxray import artifacts, cli, predict
from lungxray import images as imaging
from lungxray.errors import ConfigError, DataError, ModelError
from tests.data_helpers import real_images, write_dicom

SIZE = 32
CLASSES = ["normal", "pneumonia"]


def tiny_model_dir(path: Path, seed: int = 0, channels: int = 1, size: int = SIZE,
                   threshold: float | None = 0.5, info_size: int | None = None) -> Path:
    """An untrained VGG16 classifier (weights=None) saved as `lungxray train` saves one. Its
    head is scaled up so the probabilities spread (an untrained head predicts ~0.5 everywhere).
    ``info_size`` writes another size into model_info.json than the network has."""
    import keras

    from lungxray import models

    keras.utils.set_random_seed(seed)
    model = models.build_classifier("VGG16", size, channels, len(CLASSES), None, augment=0.0,
                                    seed=seed)
    head = model.get_layer("probs")
    head.kernel.assign(head.kernel * 8.0)
    path.mkdir(parents=True, exist_ok=True)
    model.save(path / artifacts.MODEL_FILE)
    info = {"model_name": "VGG16", "class_names": CLASSES, "threshold": threshold,
            "image_size": info_size or size, "channels": channels, "positive_class": 1}
    (path / artifacts.INFO_FILE).write_text(json.dumps(info))
    return path


def ensemble_dir(path: Path, members: dict[str, Path], threshold: float = 0.5) -> Path:
    """best_model/ of an ensemble as compare writes it: ensemble.json + members/<name>/."""
    for name, source in members.items():
        shutil.copytree(source, path / artifacts.MEMBERS_DIR / name)
    spec = {"model_name": "Ensemble-top2", "members": list(members), "class_names": CLASSES,
            "threshold": threshold, "image_size": SIZE, "channels": 1}
    (path / artifacts.ENSEMBLE_FILE).write_text(json.dumps(spec))
    (path / artifacts.INFO_FILE).write_text(json.dumps(spec))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return tiny_model_dir(tmp_path_factory.mktemp("model") / "VGG16")


@pytest.fixture(scope="module")
def keras_model(model_dir):
    from lungxray import models

    return models.load_model(model_dir / artifacts.MODEL_FILE)


@pytest.fixture(scope="module")
def pixels(shared_npz) -> np.ndarray:
    return real_images(shared_npz, per_class=6)[0]  # (12, 28, 28) real X-rays


@pytest.fixture()
def folder(tmp_path, pixels) -> Path:
    """Unlabeled images of different sizes and formats, nested, no class folders."""
    root = tmp_path / "incoming"
    (root / "ward_a").mkdir(parents=True)
    (root / "ward_b" / "deep").mkdir(parents=True)
    for i, image in enumerate(pixels[:8]):
        size = (40 + 8 * i, 56 + 4 * i)  # not square, never the model's size
        Image.fromarray(image).resize(size).save(root / "ward_a" / f"img{i}.png")
    Image.fromarray(pixels[8]).resize((64, 64)).convert("RGB").save(root / "ward_b" / "c.jpg")
    Image.fromarray(pixels[9]).save(root / "ward_b" / "deep" / "small.png")
    write_dicom(root / "ward_b" / "scan.dcm", pixels[10].astype(np.uint16) * 16)
    (root / ".DS_Store").write_bytes(b"junk")  # OS litter is never an image
    return root


def expected_probs(model, root: Path, origins: list[str]) -> np.ndarray:
    """The model's own output on the data step's decoding of each file."""
    x = np.stack([imaging.decode((root / o).read_bytes(), o, SIZE, 1) for o in origins])
    return model.predict(x.astype(np.float32), verbose=0)


def test_folder_predictions_equal_the_model_on_the_data_steps_pixels(model_dir, keras_model,
                                                                     folder, tmp_path):
    out = tmp_path / "out"
    progress = io.StringIO()
    summary = predict.predict(model_dir, str(folder), out, batch_size=4, progress=progress)
    table = predict.read_predictions(out / predict.PREDICTIONS_FILE)
    assert list(table.columns) == ["path", "prob_normal", "prob_pneumonia", "predicted_index",
                                   "predicted_class"]
    assert len(table) == 11 and summary["n"] == 11 and summary["n_bad"] == 0
    assert table["path"].tolist() == sorted(table["path"])  # stable order, relative paths
    assert "ward_b/scan.dcm" in set(table["path"]) and "ward_b/c.jpg" in set(table["path"])
    probs = expected_probs(keras_model, folder, table["path"].tolist())
    np.testing.assert_allclose(table[["prob_normal", "prob_pneumonia"]], probs, atol=2e-6)
    assert probs[:, 1].std() > 0.01  # the comparison is not between constants
    decided = (table["prob_pneumonia"] >= 0.5).astype(int)
    assert table["predicted_index"].tolist() == decided.tolist()
    assert table["predicted_class"].tolist() == [CLASSES[i] for i in decided]
    assert summary["counts"] == table["predicted_class"].value_counts().to_dict() | {
        c: 0 for c in CLASSES if c not in set(table["predicted_class"])}
    assert progress.getvalue().strip().splitlines()[-1].startswith("predict: 11/11 images")
    assert not (out / predict.BAD_FILES).exists()
    assert sorted(p.name for p in out.iterdir()) == [predict.PREDICTIONS_FILE]  # no temp left


def test_the_saved_threshold_decides(model_dir, folder, tmp_path):
    strict = tmp_path / "strict"
    shutil.copytree(model_dir, strict)
    info = json.loads((strict / artifacts.INFO_FILE).read_text())
    low = predict.predict(model_dir, str(folder), tmp_path / "a")
    (strict / artifacts.INFO_FILE).write_text(json.dumps({**info, "threshold": 0.999}))
    predict.predict(strict, str(folder), tmp_path / "b")
    a = predict.read_predictions(tmp_path / "a" / predict.PREDICTIONS_FILE)
    b = predict.read_predictions(tmp_path / "b" / predict.PREDICTIONS_FILE)
    np.testing.assert_allclose(a["prob_pneumonia"], b["prob_pneumonia"])
    assert low["counts"]["pneumonia"] > 0 and b["predicted_class"].eq("normal").all()


def test_a_bad_file_fails_naming_it_and_leaves_the_previous_result(model_dir, folder, tmp_path):
    out = tmp_path / "out"
    predict.predict(model_dir, str(folder), out)
    before = (out / predict.PREDICTIONS_FILE).read_bytes()
    (folder / "ward_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (folder / "ward_b" / "empty.jpg").write_bytes(b"")
    with pytest.raises(DataError) as err:
        predict.predict(model_dir, str(folder), out, batch_size=3)
    message = str(err.value)
    assert "\n" not in message and "2 of 13 file(s) unreadable" in message
    assert "ward_a/broken.png" in message and "ward_b/empty.jpg: empty file" in message
    assert "--skip-bad" in message
    assert (out / predict.PREDICTIONS_FILE).read_bytes() == before  # untouched, not partial
    assert sorted(p.name for p in out.iterdir()) == [predict.PREDICTIONS_FILE]
    fresh = tmp_path / "fresh"
    with pytest.raises(DataError):
        predict.predict(model_dir, str(folder), fresh)
    assert not fresh.exists()  # a folder the failed run created is gone too


def test_skip_bad_lists_unreadable_files_and_predicts_the_rest(model_dir, folder, tmp_path):
    (folder / "ward_a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    summary = predict.predict(model_dir, str(folder), tmp_path / "out", skip_bad=True,
                              batch_size=5)
    table = predict.read_predictions(tmp_path / "out" / predict.PREDICTIONS_FILE)
    bad = pd.read_csv(tmp_path / "out" / predict.BAD_FILES)
    assert len(table) == 11 and summary["n_bad"] == 1
    assert bad["path"].tolist() == ["ward_a/broken.png"]
    with pytest.raises(imaging.ImageError) as why:  # the data step's own reason
        imaging.decode((folder / "ward_a" / "broken.png").read_bytes(), "broken.png", SIZE, 1)
    assert bad["problem"].tolist() == [str(why.value)]
    assert "ward_a/broken.png" not in set(table["path"])


def test_batches_stream_and_give_the_same_rows(model_dir, folder, tmp_path, monkeypatch):
    seen = []
    real = predict.predict_probs
    monkeypatch.setattr(predict, "predict_probs",
                        lambda members, x, bs: seen.append(len(x)) or real(members, x, bs))
    predict.predict(model_dir, str(folder), tmp_path / "small", batch_size=3)
    assert seen == [3, 3, 3, 2]  # never more than one batch of pixels at a time
    predict.predict(model_dir, str(folder), tmp_path / "big", batch_size=64)
    small = predict.read_predictions(tmp_path / "small" / predict.PREDICTIONS_FILE)
    big = predict.read_predictions(tmp_path / "big" / predict.PREDICTIONS_FILE)
    pd.testing.assert_frame_equal(small, big, atol=2e-6)


def test_unlabeled_npz_and_csv_sources(model_dir, keras_model, pixels, folder, tmp_path):
    npz = tmp_path / "new.npz"
    np.savez_compressed(npz, train_images=pixels[:5], test_images=pixels[5:12])  # no labels
    predict.predict(model_dir, str(npz), tmp_path / "npz", batch_size=4)
    table = predict.read_predictions(tmp_path / "npz" / predict.PREDICTIONS_FILE)
    assert table["path"].tolist() == ([f"train_images[{i}]" for i in range(5)]
                                      + [f"test_images[{i}]" for i in range(7)])
    x = imaging.convert_array(pixels[:12, ..., None], SIZE, 1).astype(np.float32)
    np.testing.assert_allclose(table[["prob_normal", "prob_pneumonia"]],
                               keras_model.predict(x, verbose=0), atol=2e-6)
    listed = ["ward_b/c.jpg", "ward_a/img3.png"]
    pd.DataFrame({"path": listed, "note": ["x", "y"]}).to_csv(folder / "todo.csv", index=False)
    predict.predict(model_dir, str(folder / "todo.csv"), tmp_path / "csv")
    table = predict.read_predictions(tmp_path / "csv" / predict.PREDICTIONS_FILE)
    assert table["path"].tolist() == listed
    np.testing.assert_allclose(table[["prob_normal", "prob_pneumonia"]],
                               expected_probs(keras_model, folder, listed), atol=2e-6)
    pd.DataFrame({"path": ["../outside.png"]}).to_csv(folder / "evil.csv", index=False)
    with pytest.raises(DataError, match=r"line 2: path '../outside.png' contains '\.\.'"):
        predict.predict(model_dir, str(folder / "evil.csv"), tmp_path / "evil")


def test_ensemble_predicts_the_mean_of_its_members(model_dir, folder, tmp_path):
    other = tiny_model_dir(tmp_path / "other", seed=7)
    best = ensemble_dir(tmp_path / "best_model", {"NetA": model_dir, "NetB": other})
    predict.predict(best, str(folder), tmp_path / "ens")
    for name, source in (("a", model_dir), ("b", other)):
        predict.predict(source, str(folder), tmp_path / name)
    read = [predict.read_predictions(tmp_path / n / predict.PREDICTIONS_FILE)
            for n in ("ens", "a", "b")]
    mean = (read[1]["prob_pneumonia"] + read[2]["prob_pneumonia"]) / 2
    np.testing.assert_allclose(read[0]["prob_pneumonia"], mean, atol=2e-6)
    assert not np.allclose(read[1]["prob_pneumonia"], read[2]["prob_pneumonia"], atol=1e-3)


def test_gradcam_overlays_at_each_images_own_resolution(model_dir, folder, tmp_path):
    summary = predict.predict(model_dir, str(folder), tmp_path / "out", explain=True)
    table = predict.read_predictions(tmp_path / "out" / predict.PREDICTIONS_FILE)
    assert summary["gradcam"] == str(tmp_path / "out" / predict.GRADCAM_DIR)
    for origin, overlay in zip(table["path"], table["gradcam"], strict=True):
        assert overlay == f"gradcam/{origin}.png"
        drawn = Image.open(tmp_path / "out" / overlay)
        source = imaging.open_image((folder / origin).read_bytes(), origin, 4096, 1)[0]
        assert drawn.mode == "RGB" and drawn.size == source.size, origin
    # A heatmap is drawn, not just the image: the overlay is coloured.
    first = np.asarray(Image.open(tmp_path / "out" / table["gradcam"][0]), dtype=int)
    assert np.abs(first[..., 0] - first[..., 2]).max() > 20


def test_models_that_cannot_be_used_are_refused(model_dir, folder, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ModelError, match=r"empty: not a lungxray model .*no model_info.json"):
        predict.predict(empty, str(folder), tmp_path / "o1")
    with pytest.raises(ModelError, match="no such model directory"):
        predict.predict(tmp_path / "missing", str(folder), tmp_path / "o2")
    lying = tiny_model_dir(tmp_path / "lying", info_size=64)  # info says 64 px, network 32
    with pytest.raises(ModelError, match=r"takes \(32, 32, 1\) images but its info says "
                                         r"\(64, 64, 1\)"):
        predict.predict(lying, str(folder), tmp_path / "o3")
    assert not any((tmp_path / n).exists() for n in ("o1", "o2", "o3"))


def test_bad_sources_and_outputs_are_refused(model_dir, folder, tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        predict.predict(model_dir, str(tmp_path / "nope"), tmp_path / "o")
    (tmp_path / "void").mkdir()
    with pytest.raises(DataError, match="holds no image files"):
        predict.predict(model_dir, str(tmp_path / "void"), tmp_path / "o")
    with pytest.raises(ConfigError, match="lies inside the source folder"):
        predict.predict(model_dir, str(folder), folder / "predictions")
    labels_only = tmp_path / "labels.npz"
    np.savez(labels_only, train_labels=np.zeros(3, dtype=np.int64))
    with pytest.raises(DataError, match="no image key"):
        predict.predict(model_dir, str(labels_only), tmp_path / "o")


def test_cli_predict_and_its_one_line_errors(model_dir, folder, tmp_path, capsys):
    assert cli.main(["predict", "--model", str(model_dir), "--source", str(folder),
                     "--output", str(tmp_path / "out"), "--batch-size", "4"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 11
    assert "predict: 11/11 images" in captured.err
    (folder / "bad.png").write_bytes(b"nope")
    assert cli.main(["predict", "--model", str(model_dir), "--source", str(folder),
                     "--output", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("lungxray predict: error: ") and "bad.png" in err[-1]


def test_fifos_and_symlinks_out_of_the_folder_are_bad_files(model_dir, folder, tmp_path):
    secret = tmp_path / "secret.png"
    shutil.copyfile(folder / "ward_a" / "img0.png", secret)
    (folder / "ward_a" / "link.png").symlink_to(secret)
    os.mkfifo(folder / "ward_b" / "pipe.png")  # reading it would hang
    predict.predict(model_dir, str(folder), tmp_path / "out", skip_bad=True)
    bad = pd.read_csv(tmp_path / "out" / predict.BAD_FILES)
    assert dict(zip(bad["path"], bad["problem"], strict=True)) == {
        "ward_a/link.png": "leads outside the source folder (symlink)",
        "ward_b/pipe.png": "not a regular file (FIFO)"}


def test_the_data_steps_limits_apply(model_dir, folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGXRAY_MAX_IMAGE_PIXELS", "2500")  # 40x56 = 2240 px passes, 48x60 not
    predict.predict(model_dir, str(folder), tmp_path / "out", skip_bad=True)
    bad = pd.read_csv(tmp_path / "out" / predict.BAD_FILES)
    table = predict.read_predictions(tmp_path / "out" / predict.PREDICTIONS_FILE)
    assert "ward_a/img0.png" in set(table["path"]) and "ward_a/img1.png" in set(bad["path"])
    assert bad["problem"].str.contains("max_image_pixels").all()


@pytest.mark.timeout(180)
def test_gs_folder_and_csv_sources(model_dir, folder, emulator_host, monkeypatch, tmp_path):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
    bucket = gcs.Client(project="test", credentials=AnonymousCredentials()).create_bucket(
        "lx-predict")
    listed = ["ward_a/img1.png", "ward_b/scan.dcm", "ward_b/c.jpg"]
    for name in listed:
        bucket.blob(f"new/{name}").upload_from_filename(str(folder / name))
        bucket.blob(f"batch/{name}").upload_from_filename(str(folder / name))
    bucket.blob("batch/todo.csv").upload_from_string("path\nward_b/c.jpg\nward_a/img1.png\n")
    predict.predict(model_dir, f"gs://{bucket.name}/new/", tmp_path / "gs",
                    cache_dir=tmp_path / "cache")
    predict.predict(model_dir, str(folder), tmp_path / "local")
    remote = predict.read_predictions(tmp_path / "gs" / predict.PREDICTIONS_FILE)
    local = predict.read_predictions(tmp_path / "local" / predict.PREDICTIONS_FILE)
    assert remote["path"].tolist() == sorted(listed)  # named relative to the prefix
    merged = local.merge(remote, on="path", suffixes=("", "_gs"))
    np.testing.assert_allclose(merged["prob_pneumonia"], merged["prob_pneumonia_gs"], atol=2e-6)
    predict.predict(model_dir, f"gs://{bucket.name}/batch/todo.csv", tmp_path / "gscsv",
                    cache_dir=tmp_path / "cache")
    table = predict.read_predictions(tmp_path / "gscsv" / predict.PREDICTIONS_FILE)
    assert table["path"].tolist() == ["ward_b/c.jpg", "ward_a/img1.png"]


def test_a_calibrated_model_estimates_the_prevalence_of_what_it_predicted(model_dir, pixels,
                                                                          tmp_path):
    from lungxray import prevalence

    calibrated = tmp_path / "calibrated"
    shutil.copytree(model_dir, calibrated)
    info = json.loads((calibrated / artifacts.INFO_FILE).read_text())
    calibration = prevalence.Calibration(slope=1.5, intercept=-0.2, prior=0.74, n=524)
    info["calibration"] = calibration.as_dict()
    (calibrated / artifacts.INFO_FILE).write_text(json.dumps(info))
    source = tmp_path / "target.npz"
    np.savez(source, images=pixels)
    out = tmp_path / "out"
    result = predict.predict(calibrated, str(source), out)
    table = predict.read_predictions(out / predict.PREDICTIONS_FILE)
    saved = json.loads((out / predict.PREVALENCE_FILE).read_text())
    # The estimate is EM on exactly the scores in predictions.csv (6 decimals there).
    expected = prevalence.target_report(calibration, table["prob_pneumonia"].to_numpy(), 0.5)
    assert saved["estimate"] == pytest.approx(expected["estimate"], abs=1e-4)
    assert saved["n"] == len(table) == len(pixels) and saved["positive_class"] == "pneumonia"
    assert saved["positive_share_at_model_threshold"] == pytest.approx(
        np.mean(table["predicted_class"] == "pneumonia"))
    assert result["prevalence"]["estimate"] == saved["estimate"]
    # A model saved without a calibration (older, or an uncalibratable one) writes none, and
    # a re-run into the same folder leaves no stale estimate behind.
    predict.predict(model_dir, str(source), out)
    assert not (out / predict.PREVALENCE_FILE).exists()
    info["calibration"] = {**calibration.as_dict(), "slope": -1.0}
    (calibrated / artifacts.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ModelError, match="slope > 0"):
        predict.predict(calibrated, str(source), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ------------------------------------------------------------------ issue 34: hostile input


def _write_named(root: Path, raw_name: bytes, data: bytes) -> None:
    """A file whose name is any bytes the file system allows (not UTF-8, a newline, ...)."""
    Path(os.fsdecode(os.fsencode(root) + b"/" + raw_name)).write_bytes(data)


def test_names_are_data_written_escaped_never_dropped(model_dir, folder, tmp_path, capsys):
    """Issue 34: non-UTF-8 names made predict die with UnicodeEncodeError after writing its
    CSVs, with or without --skip-bad. Every name is now written, escaped, to predictions.csv,
    bad_files.csv, the JSON summary, the overlays and the error line."""
    png = (folder / "ward_a" / "img0.png").read_bytes()
    for raw in (b"\xff\xfe.png", b'new\nline, "quoted".png', b"tab\t.png"):
        _write_named(folder / "ward_a", raw, png)
    _write_named(folder / "ward_b", b"broken\xe9.png", b"\x89PNG\r\n\x1a\n not really")
    assert cli.main(["predict", "--model", str(model_dir), "--source", str(folder),
                     "--output", str(tmp_path / "o1")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lungxray predict: error: ")
    assert r"1 of 15 file(s) unreadable" in err[0] and r"ward_b/broken\xe9.png: " in err[0]
    assert not (tmp_path / "o1").exists()
    assert cli.main(["predict", "--model", str(model_dir), "--source", str(folder),
                     "--output", str(tmp_path / "o2"), "--skip-bad", "--gradcam"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["n"] == 14 and summary["n_bad"] == 1
    table = predict.read_predictions(tmp_path / "o2" / predict.PREDICTIONS_FILE)
    assert {r"ward_a/\xff\xfe.png", r'ward_a/new\nline, "quoted".png',
            r"ward_a/tab\t.png"} <= set(table["path"])
    assert len((tmp_path / "o2" / predict.PREDICTIONS_FILE).read_text().splitlines()) == 15
    row = table.set_index("path").loc[r"ward_a/\xff\xfe.png"]
    same = table.set_index("path").loc["ward_a/img0.png"]
    assert row["prob_pneumonia"] == same["prob_pneumonia"]  # predicted, not only listed
    assert (tmp_path / "o2" / row["gradcam"]).is_file()
    bad = pd.read_csv(tmp_path / "o2" / predict.BAD_FILES)
    assert bad["path"].tolist() == [r"ward_b/broken\xe9.png"]


def test_a_csv_of_missing_files_streams_and_stops_once_the_run_is_lost(
        model_dir, folder, tmp_path, monkeypatch):
    """Issue 34: a CSV of missing paths was listed whole, silently, before anything else.
    It now streams with progress; missing files are bad files like any other, and without
    --skip-bad the run stops at the batch where MAX_NAMED of them are known."""
    rows = ["ward_a/img1.png", *(f"gone/m{i}.png" for i in range(3000)), "ward_b/c.jpg"]
    (folder / "todo.csv").write_text("path\n" + "\n".join(rows) + "\n")
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
    progress = io.StringIO()
    with pytest.raises(DataError) as err:
        predict.predict(model_dir, str(folder / "todo.csv"), tmp_path / "o1", progress=progress)
    message = str(err.value)
    assert "\n" not in message
    assert "63 of the first 64 file(s) unreadable, stopped there" in message
    assert "gone/m0.png: no such file; gone/m1.png: no such file" in message
    assert f"gone/m{predict.MAX_NAMED - 1}.png" in message
    assert f"gone/m{predict.MAX_NAMED}.png" not in message
    assert message.endswith(f"... and {63 - predict.MAX_NAMED} more")
    lines = progress.getvalue().splitlines()
    assert lines == ["predict: 64 images, " + lines[0].split(", ")[1] + ", 63 unreadable"]
    assert not (tmp_path / "o1").exists()
    progress = io.StringIO()
    summary = predict.predict(model_dir, str(folder / "todo.csv"), tmp_path / "o2",
                              skip_bad=True, progress=progress)
    assert summary["n"] == 2 and summary["n_bad"] == 3000
    lines = progress.getvalue().splitlines()
    assert lines[-1].startswith("predict: 3002/3002 images")
    assert len(lines) > 2 and not any("/3002" in line for line in lines[:-1])  # no total yet
    bad = pd.read_csv(tmp_path / "o2" / predict.BAD_FILES)
    assert bad["path"].tolist() == [f"gone/m{i}.png" for i in range(3000)]
    assert set(bad["problem"]) == {predict.MISSING}
    table = predict.read_predictions(tmp_path / "o2" / predict.PREDICTIONS_FILE)
    assert table["path"].tolist() == ["ward_a/img1.png", "ward_b/c.jpg"]


_SLOW_CLI = """
import sys, time
from lungxray import cli, predict
real = predict.predict_probs
def slow(*args):
    time.sleep(120)  # the signal arrives while the run is in its staging folder
    return real(*args)
predict.predict_probs = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigterm_and_sigint_remove_the_staging_and_a_later_run_sweeps_leftovers(
        model_dir, folder, tmp_path):
    """Issue 34: SIGTERM left `.predict-*` behind, and a later successful run left it there."""
    import signal
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    kept = tmp_path / "kept"
    predict.predict(model_dir, str(folder), kept)
    before = (kept / predict.PREDICTIONS_FILE).read_bytes()
    runs = {}
    for signum, output in ((signal.SIGTERM, tmp_path / "fresh"), (signal.SIGINT, kept)):
        runs[signum] = output, subprocess.Popen(
            [sys.executable, "-c", _SLOW_CLI, "predict", "--model", str(model_dir),
             "--source", str(folder), "--output", str(output)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for signum, (output, process) in runs.items():
        deadline = time.monotonic() + 120
        while not list(output.glob(".predict-*")):
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
        assert process.returncode == 128 + signum, err
        assert "Traceback" not in err and f"stopped by {signal.Signals(signum).name}" in err
        assert not list(output.glob(".predict-*"))
    assert not (tmp_path / "fresh").exists()  # the stopped run's own folder is gone too
    assert (kept / predict.PREDICTIONS_FILE).read_bytes() == before  # the old result stays
    (kept / ".predict-killed").mkdir()  # as SIGKILL leaves it
    (kept / ".predict-killed" / predict.PREDICTIONS_FILE).write_text("partial")
    predict.predict(model_dir, str(folder), kept)
    assert sorted(p.name for p in kept.iterdir()) == [predict.PREDICTIONS_FILE]
