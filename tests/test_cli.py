"""The installed `lungxray` command: help, exit codes, one-line errors, real runs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from lungxray import cli

SUBCOMMANDS = ["preprocess", "tune", "train", "evaluate", "compare", "models", "predict", "export",
               "challenge", "promote"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    exe = shutil.which("lungxray") or f"{sys.executable} -m lungxray.cli"
    result = subprocess.run([*exe.split(), *args], capture_output=True, text=True, timeout=600)
    if check:
        assert result.returncode == 0, result.stderr[-2000:]
    return result


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: lungxray " + command in capsys.readouterr().out


def test_models_lists_the_registry():
    out = run("models").stdout
    assert "ResNet152V2" in out and "InceptionV3" in out and "75" in out


def test_preprocess_then_evaluate_then_compare(shared_npz, trained_model, tmp_path):
    data_dir = tmp_path / "data"
    manifest = json.loads(run("preprocess", "--source", str(shared_npz), "--output",
                              str(data_dir), "--image-size", "32", "--max-per-split", "80",
                              "--seed", "3").stdout)
    assert manifest["splits"]["test"]["n"] == 80 and manifest["image_size"] == 32

    trial = tmp_path / "trials" / "VGG16"
    shutil.copytree(trained_model, trial / "model")
    metrics = json.loads(run("evaluate", "--model", str(trial / "model"), "--data",
                             str(data_dir), "--output", str(trial / "eval"), "--split", "val",
                             "test", "--no-robustness").stdout)  # the suite: its own tests
    assert set(metrics) == {"val", "test"}
    summary = json.loads(run("compare", "--trials", str(trial), "--output",
                             str(tmp_path / "report")).stdout)
    assert summary["best_model"] == "VGG16"
    assert (tmp_path / "report" / "report.html").is_file()
    assert (tmp_path / "report" / "best_model" / "model.keras").is_file()


def test_evaluate_adds_external_data_to_one_report(small_dataset, trained_model, tmp_path,
                                                  capsys):
    out = tmp_path / "eval"
    out.mkdir()
    (out / "report.html").write_text("an earlier report")
    assert cli.main(["evaluate", "--model", str(trained_model), "--data", str(small_dataset),
                     "--output", str(out), "--split", "val", "test", "--external-data",
                     str(small_dataset), "--external-class-map", "normal=normal",
                     "--no-robustness", "--no-gradcam"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["val", "test", "external"]
    assert results["external"]["class_map"] == {"normal": "normal"}
    # Calibrated on the val predictions just written, as the test split is.
    assert results["external"]["calibration"] == results["test"]["calibration"]
    page = (out / "report.html").read_text()
    assert all(f"<h2>{split}</h2>" in page for split in results)


def test_challenge_then_promote(small_dataset, trained_model, tmp_path):
    home = tmp_path / "champion"
    (home / ".promote-r0-killed").mkdir(parents=True)  # what a SIGKILLed promotion leaves
    out = json.loads(run("challenge", "--model", str(trained_model), "--data",
                         str(small_dataset), "--champion", str(home), "--run-id", "r1",
                         "--output", str(tmp_path / "c1")).stdout)
    assert out["decision"] == "promote" and out["reason"] == "no champion yet"
    assert "no champion yet" in (tmp_path / "c1" / "champion.md").read_text()
    promoted = json.loads(run("promote", "--model", str(trained_model), "--decision",
                              out["decision_file"], "--champion", str(home)).stdout)
    assert promoted["history_entry"] == str(home / "history" / "r1")
    assert (home / "history" / "r1" / "model" / "model.keras").is_file()
    assert sorted(p.name for p in home.iterdir()) == ["champion.json", "history"]  # swept
    # promoting the same run again is refused in one line, and the champion is unchanged
    again = run("promote", "--model", str(trained_model), "--decision", out["decision_file"],
                "--champion", str(home), check=False)
    assert again.returncode == 2 and again.stderr.count("\n") == 1
    assert "run r1 was already promoted" in again.stderr


def test_challenge_stopped_by_sigterm_leaves_no_staging(tmp_path):
    """SIGTERM while challenge works: exit 143, its staging folder removed, and the one a
    SIGKILLed run left before it swept."""
    import os
    import signal
    import time

    from tests.champion_helpers import fake_model

    model = fake_model(tmp_path / "model")
    out = tmp_path / "out"
    stale = out / ".challenge-killed"
    stale.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-m", "lungxray.cli", "challenge", "--model",
                             str(model), "--data", str(tmp_path / "data"), "--champion",
                             str(tmp_path / "champion"), "--run-id", "r1", "--output", str(out)],
                            stderr=subprocess.PIPE, text=True, env={**os.environ})
    deadline = time.monotonic() + 60
    while not [p for p in out.glob(".challenge-*") if p != stale]:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=60)[1]
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "lungxray challenge: stopped by SIGTERM; removed the staging folder" in stderr
    assert "Traceback" not in stderr
    assert not list(out.iterdir())  # no staging, no half decision


@pytest.mark.parametrize("args, message", [
    (["preprocess", "--source", "nowhere.npz", "--output", "OUT"], "no such file"),
    (["tune", "--data", "DATA", "--model", "VGG61", "--output", "OUT"], "unknown model"),
    (["train", "--data", "DATA", "--model", "VGG16", "--output", "OUT"], "not a prepared"),
    (["compare", "--trials", "DATA", "--output", "OUT", "--select-metric", "test_roc_auc"],
     "never select on the test split"),
    (["crossfold", "--data", "DATA", "--model", "DATA", "--folds", "1", "--output", "OUT"],
     "shift_folds must be 0 (none) or 2..10, got '1'"),
    (["crossfold", "--data", "DATA", "--model", "DATA", "--folds", "3", "--output", "OUT"],
     "no model_info.json"),
])
def test_bad_input_is_one_line_on_stderr_and_exit_2(args, message, tmp_path):
    args = [str(tmp_path / a) if a in ("OUT", "DATA") else a for a in args]
    (tmp_path / "DATA").mkdir()
    result = run(*args, check=False)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"lungxray {args[0]}: error:") and message in last
    assert not (tmp_path / "OUT").exists()
