"""Issue 26 (part B): train and tune check every argument before writing state, a tampered
dataset is refused by train and evaluate, model files and folders are read within limits, and
the CLI prints one line for input errors only. (Staging on SIGTERM: test_staging.py.)"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest

from lungxray import artifacts, cli, data, integrity, resume
from lungxray.errors import ConfigError, DataError
from tests.fuzz import hostile_state


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, small_dataset) -> Path:
    """An untrained MobileNetV2 at 32 px saved as a `lungxray train` output (seconds)."""
    from lungxray import models

    out = tmp_path_factory.mktemp("tiny") / "model"
    out.mkdir()
    manifest = json.loads((small_dataset / "manifest.json").read_text())
    model = models.build_classifier("MobileNetV2", 32, manifest["channels"], 2, None)
    model.save(out / artifacts.MODEL_FILE)
    (out / artifacts.INFO_FILE).write_text(json.dumps({
        "model_name": "MobileNetV2", "class_names": manifest["class_names"], "threshold": 0.5,
        "threshold_method": "youden", "image_size": 32, "channels": manifest["channels"],
        "positive_class": 1}))
    return out


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _main(args: list[str], capsys) -> tuple[int, str]:
    code = cli.main([str(a) for a in args])
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, command: str, message: str) -> None:
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"lungxray {command}: error: ") and message in lines[0], lines[0]


@pytest.mark.parametrize("extra, message", [
    (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
    (["--batch-size", "0"], "--batch-size must be between 1 and 65536, got 0"),
    (["--epochs", "-5"], "epochs must be >= 1, got -5"),
    (["--patience", "-1"], "--patience must be between 0"),
    (["--model", "VGG61"], "unknown model 'VGG61'"),
    (["--weights", "JUNK"], "is not an HDF5 (.h5 / .weights.h5) file"),
    (["--hparams", "BAD"], "hyperparameter dropout must be a number, got str 'x'"),
    (["--hparams", "DEEP"], "nested"),
    (["--hparams", "UNKNOWN"], "unknown hyperparameters 'dropuot'"),
    (["--target-sensitivity", "2"], "target_sensitivity"),
])
def test_train_refuses_bad_settings_before_any_state(extra, message, small_dataset, tmp_path,
                                                     capsys):
    # Issue 26: these left .state/job.json behind, so the corrected re-run was refused.
    files = {"JUNK": ("junk.weights.h5", "not HDF5\n" * 50),
             "BAD": ("bad.json", json.dumps({"hparams": {"dropout": "x"}})),
             "DEEP": ("deep.json", hostile_state.deep_json(100_000, "hparams")),
             "UNKNOWN": ("unknown.json", json.dumps({"dropuot": 0.1}))}
    extra = list(extra)
    for i, arg in enumerate(extra):
        if arg in files:
            name, text = files[arg]
            (tmp_path / name).write_text(text)
            extra[i] = str(tmp_path / name)
    args = ["train", "--data", small_dataset, "--model", "MobileNetV2", "--output",
            tmp_path / "out", "--epochs", "1", *extra]
    _assert_one_line_error(*_main(args, capsys), "train", message)
    assert not (tmp_path / "out").exists()


def test_tune_refuses_bad_settings_before_any_state(small_dataset, tmp_path, capsys):
    for extra, message in [(["--seed", "-1"], "--seed must be between 0"),
                           (["--batch-size", "0"], "batch_size must be >= 1"),
                           (["--batch-size", "100000"], "--batch-size must be between 1"),
                           (["--max-trials", "0"], "max_trials and epochs must be >= 1"),
                           (["--max-trials", "100000"], "--max-trials must be between 1"),
                           (["--weights", str(Path(__file__))], "is not an HDF5")]:
        args = ["tune", "--data", small_dataset, "--model", "MobileNetV2", "--output",
                tmp_path / "out", *extra]
        _assert_one_line_error(*_main(args, capsys), "tune", message)
        assert not (tmp_path / "out").exists()


def test_a_state_dir_holding_only_its_job_file_does_not_block_a_corrected_run(tmp_path):
    state = tmp_path / ".state"
    resume.check_state(state, {"seed": 1}, resume.JOB_FILE, "training job")
    # The earlier run stopped before its first checkpoint: nothing to resume, nothing refused.
    resume.check_state(state, {"seed": 2}, resume.JOB_FILE, "training job")
    assert json.loads((state / resume.JOB_FILE).read_text()) == {"seed": 2}
    (state / "scratch.epochs.csv").write_text("epoch\n0\n")  # progress: now it is refused
    with pytest.raises(ConfigError, match="differs in: seed"):
        resume.check_state(state, {"seed": 3}, resume.JOB_FILE, "training job")


def _tamper(data_dir: Path, split: str, what: str) -> None:
    if what == "labels":
        path = data_dir / f"{split}_labels.npy"
        labels = np.load(path)
        labels[:] = -1
        np.save(path, labels)
    elif what == "pixels":
        path = data_dir / f"{split}_images.npy"
        images = np.load(path)
        images[0] ^= 1
        np.save(path, images)
    else:
        manifest = json.loads((data_dir / "manifest.json").read_text())
        manifest["splits"][split]["n"] += 1
        (data_dir / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("what, message", [
    ("labels", "split 'test' holds labels [-1] outside [0, 2)"),
    ("pixels", "split 'test' does not match the sha256 its manifest recorded"),
    ("count", "the manifest says"),
])
def test_evaluate_refuses_a_tampered_dataset(what, message, tiny_model, small_dataset,
                                             tmp_path, capsys):
    # Issue 26: test labels edited to -1 scored accuracy 1.0 and exited 0.
    data_dir = _copy(small_dataset, tmp_path / "data")
    _tamper(data_dir, "test", what)
    args = ["evaluate", "--model", tiny_model, "--data", data_dir, "--output", tmp_path / "e",
            "--no-gradcam"]
    _assert_one_line_error(*_main(args, capsys), "evaluate", message)
    assert not (tmp_path / "e").exists()


def test_train_refuses_a_tampered_dataset(small_dataset, tmp_path, capsys):
    data_dir = _copy(small_dataset, tmp_path / "data")
    _tamper(data_dir, "train", "labels")
    args = ["train", "--data", data_dir, "--model", "MobileNetV2", "--output", tmp_path / "m"]
    _assert_one_line_error(*_main(args, capsys), "train", "split 'train' holds labels")
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_evaluate_on_an_untouched_dataset_still_scores(tiny_model, small_dataset, tmp_path,
                                                       capsys):
    args = ["evaluate", "--model", tiny_model, "--data", small_dataset, "--output",
            tmp_path / "e", "--no-gradcam"]
    assert cli.main([str(a) for a in args]) == 0
    assert (tmp_path / "e" / "test" / "metrics.json").is_file()
    assert not list((tmp_path / "e").glob(".eval-build-*"))


@pytest.mark.parametrize("what, message", [
    ("config", "config.json inflates to 70000000 bytes, more than the limit of 67108864"),
    ("info", "is nested too deeply"),
    ("ensemble", "ensemble spec"),
    ("junk", "cannot load model file"),
])
def test_evaluate_refuses_hostile_model_files(what, message, tiny_model, small_dataset,
                                              tmp_path, capsys):
    # Issue 26: a config.json inflating to 2.7 GB took 6 GB; a deep model_info.json a traceback.
    model = _copy(tiny_model, tmp_path / "model")
    if what == "config":
        hostile_state.keras_bomb(model / artifacts.MODEL_FILE, 70_000_000)
    elif what == "info":
        (model / artifacts.INFO_FILE).write_text(hostile_state.deep_json(100_000, "model_name"))
    elif what == "ensemble":
        (model / "ensemble.json").write_text("[" * 100 + "]" * 100)
    else:
        import zipfile

        with zipfile.ZipFile(model / artifacts.MODEL_FILE, "w") as archive:
            archive.writestr("config.json", json.dumps({"class_name": "Nope", "config": {}}))
    args = ["evaluate", "--model", model, "--data", small_dataset, "--output", tmp_path / "e",
            "--no-gradcam"]
    _assert_one_line_error(*_main(args, capsys), "evaluate", message)
    assert not (tmp_path / "e").exists()


def test_cli_prints_project_errors_in_one_line_and_keeps_tracebacks_for_bugs(monkeypatch,
                                                                            capsys):
    def refuse(args):
        raise DataError("x" * 5000)

    def crash(args):
        raise KeyError("a bug")

    parser = cli.build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), refuse))
    code, err = _main(["models"], capsys)
    assert code == 2 and err.startswith("lungxray models: error: xxx") and "\n" not in err
    assert err.endswith("... (5000 characters)") and len(err) < 2100
    monkeypatch.setattr(cli, "build_parser", lambda: _with_func(parser(), crash))
    with pytest.raises(KeyError):
        cli.main(["models"])


def _with_func(parser, func):
    parser._subparsers._group_actions[0].choices["models"].set_defaults(func=func)
    return parser


def test_refusals_are_fast(small_dataset, tmp_path, capsys):
    started = time.monotonic()
    code, _ = _main(["train", "--data", small_dataset, "--model", "MobileNetV2", "--output",
                     tmp_path / "o", "--seed", "-1"], capsys)
    assert code == 2 and time.monotonic() - started < 10
    assert not os.path.exists(tmp_path / "o")


def test_split_digest_matches_the_manifest_in_any_chunk_size(small_dataset, monkeypatch):
    """integrity.split_sha256 is the recipe prepare writes with, however many rows it hashes
    at a time (the feature cache keys train subsets with it too)."""
    manifest = data.read_manifest(small_dataset)
    for chunk in (integrity.HASH_CHUNK_BYTES, 1000):  # 1000 bytes: one row at a time
        monkeypatch.setattr(integrity, "HASH_CHUNK_BYTES", chunk)
        for name in ("train", "val"):
            split = data.load_split(small_dataset, name)
            assert integrity.split_sha256(split) == manifest["splits"][name]["sha256"]
