"""Issue 34: train's resume state is written atomically and checked on read. A state that is
empty, truncated, edited or of other settings is discarded with one note and training starts
afresh; a run killed before its first checkpoint or after its last epoch resumes without
refusing and without counting an epoch twice."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lungxray import artifacts, resume
from lungxray.errors import ConfigError

HDF5 = resume.HDF5_SIGNATURE + b"\0" * 200  # passes the cheap check, not a real load
CONFIG = {"state_format": resume.STATE_FORMAT, "model_name": "SmallCNN", "epochs": 2}
PLAN = [("scratch", 2)]


def _notes(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.strip()]


def _job(state: Path, config: dict | None = None) -> Path:
    state.mkdir(parents=True, exist_ok=True)
    (state / resume.JOB_FILE).write_text(json.dumps(config or CONFIG))
    return state


def _committed(state: Path, count: int = 1, **changes: object) -> Path:
    """A state as the new code leaves it after ``count`` committed epochs of 'scratch'."""
    _job(state)
    rows = [{"epoch": i, "loss": 1.0, "val_auc": 0.5 + i / 10} for i in range(count)]
    record = {"format": resume.STATE_FORMAT, "epochs": rows, "stopped": False,
              "latest": f"scratch.epoch-{count}.weights.h5",
              "best": {"epoch": count - 1, "value": rows[-1]["val_auc"],
                       "weights": f"scratch.epoch-{count}.weights.h5"}, **changes}
    (state / f"scratch.epoch-{count}.weights.h5").write_bytes(HDF5)
    (state / "scratch.progress.json").write_text(json.dumps(record))
    return state


def test_a_state_with_nothing_saved_is_taken_over_by_a_corrected_run(tmp_path, capsys):
    # Killed in the first seconds of epoch 1: the job file, a half-written weights file.
    state = _job(tmp_path / ".state", {**CONFIG, "epochs": 4})
    (state / ".scratch.epoch-1.weights.h5.1f2e3d4c.tmp.weights.h5").write_bytes(b"\x89HDF")
    resume.check_state(state, CONFIG, resume.JOB_FILE, "training job", ours=resume.is_ours)
    assert sorted(p.name for p in state.iterdir()) == [resume.JOB_FILE]
    assert json.loads((state / resume.JOB_FILE).read_text()) == CONFIG
    assert _notes(capsys) == []  # nothing was saved: nothing to say


@pytest.mark.parametrize("case", ["other job", "empty job file and epoch log", "truncated job",
                                  "job file is /dev/zero", "no job file", "older format"])
def test_an_unusable_state_or_one_of_another_job_is_discarded_with_one_note(case, tmp_path,
                                                                           capsys):
    state = _job(tmp_path / ".state")
    if case == "other job":
        _committed(state)
        (state / resume.JOB_FILE).write_text(json.dumps({**CONFIG, "epochs": 9}))
    elif case == "empty job file and epoch log":  # what a kill left before issue 34
        (state / resume.JOB_FILE).write_text("")
        (state / "scratch.epochs.csv").write_text("")
    elif case == "truncated job":
        (state / resume.JOB_FILE).write_text(json.dumps(CONFIG)[:20])
        (state / "scratch.epoch-1.weights.h5").write_bytes(HDF5)
    elif case == "job file is /dev/zero":
        (state / resume.JOB_FILE).unlink()
        (state / resume.JOB_FILE).symlink_to("/dev/zero")
        (state / "phases.json").write_text("[]")
    elif case == "no job file":
        (state / resume.JOB_FILE).unlink()
        (state / "scratch.weights.h5").write_bytes(HDF5)
    else:  # format 3: Keras' BackupAndRestore and ModelCheckpoint files
        (state / resume.JOB_FILE).write_text(json.dumps({**CONFIG, "state_format": 3}))
        (state / "scratch.backup").mkdir()
        (state / "scratch.backup" / "latest.weights.h5").write_bytes(HDF5)
        (state / "scratch.best.weights.h5").write_bytes(HDF5)
        (state / "scratch.epochs.csv").write_text("epoch,val_auc\n0,0.5\n")
    started = time.monotonic()
    resume.PhaseState(state).open(CONFIG, PLAN)
    assert time.monotonic() - started < 5
    assert sorted(p.name for p in state.iterdir()) == [resume.JOB_FILE]
    assert json.loads((state / resume.JOB_FILE).read_text()) == CONFIG
    (note,) = _notes(capsys)
    assert note.startswith(f"lungxray train: note: {state} ") and "Traceback" not in note
    assert note.endswith("discarded it, training starts afresh")


def test_files_train_did_not_write_are_refused_never_deleted(tmp_path):
    state = _committed(tmp_path / ".state")
    (state / resume.JOB_FILE).write_text(json.dumps({**CONFIG, "epochs": 9}))
    (state / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="differs in: epochs"):
        resume.PhaseState(state).open(CONFIG, PLAN)
    assert (state / "notes.txt").read_text() == "mine"
    assert (state / "scratch.progress.json").is_file()
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ConfigError, match="exists and is not a directory"):
        resume.PhaseState(tmp_path / "file").open(CONFIG, PLAN)
    assert (tmp_path / "file").read_text() == "mine"


def _fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _link_out(path: Path) -> None:
    path.unlink()
    path.symlink_to("/dev/zero")


HOSTILE_RECORDS = {
    "truncated record": lambda s: (s / "scratch.progress.json").write_text('{"format": 4, "ep'),
    "empty record": lambda s: (s / "scratch.progress.json").write_text(""),
    "deep record": lambda s: (s / "scratch.progress.json").write_text("[" * 100_000),
    "more epochs than planned": lambda s: _committed(s, 3),
    "latest outside the state": lambda s: _committed(s, latest="../../etc/passwd"),
    "best not one of its epochs": lambda s: _committed(
        s, best={"epoch": 5, "value": 0.9, "weights": "scratch.epoch-6.weights.h5"}),
    "epoch index out of order": lambda s: _committed(
        s, epochs=[{"epoch": 1, "loss": 1.0}]),
    "a metric that is not a number": lambda s: _committed(
        s, epochs=[{"epoch": 0, "loss": "x"}]),
    "weights file missing": lambda s: (s / "scratch.epoch-1.weights.h5").unlink(),
    "weights file empty": lambda s: (s / "scratch.epoch-1.weights.h5").write_bytes(b""),
    "weights file truncated to junk": lambda s: (s / "scratch.epoch-1.weights.h5").write_bytes(
        b"junk" * 10),
    "weights file a FIFO": lambda s: _fifo(s / "scratch.epoch-1.weights.h5"),
    "weights file a link to /dev/zero": lambda s: _link_out(s / "scratch.epoch-1.weights.h5"),
    "finished phase not in the plan": lambda s: (s / "phases.json").write_text(json.dumps(
        [{"name": "head", "epochs": 1, "history": {}}])),
    "finished phase without weights": lambda s: (s / "phases.json").write_text(json.dumps(
        [{"name": "scratch", "epochs": 1, "history": {"loss": [1.0]}}])),
    "history of another length": lambda s: (s / "phases.json").write_text(json.dumps(
        [{"name": "scratch", "epochs": 2, "history": {"loss": [1.0]}}])),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_hostile_epoch_and_phase_records_are_discarded_not_trusted(case, tmp_path, capsys):
    state = _committed(tmp_path / ".state")
    HOSTILE_RECORDS[case](state)
    started = time.monotonic()
    resume.PhaseState(state).open(CONFIG, PLAN)
    assert time.monotonic() - started < 5
    assert sorted(p.name for p in state.iterdir()) == [resume.JOB_FILE]
    (note,) = _notes(capsys)
    assert "discarded the training state, training starts afresh" in note


def test_a_sound_record_is_kept(tmp_path, capsys):
    state = _committed(tmp_path / ".state")
    phases = resume.PhaseState(state)
    phases.open(CONFIG, PLAN)
    progress = phases.progress("scratch", 2)
    assert [row["epoch"] for row in progress.rows] == [0] and not progress.stopped
    assert progress.latest == state / "scratch.epoch-1.weights.h5" == progress.best[2]
    assert _notes(capsys) == []


def test_discarding_and_removing_a_state_touch_only_what_train_wrote(tmp_path, capsys):
    target = _committed(tmp_path / "elsewhere")
    (target / "scratch.progress.json").write_text("{")  # truncated: discarded
    (target / "notes.txt").write_text("mine")  # beside a matching job: resumed, then kept
    link = tmp_path / ".state"
    link.symlink_to(target)
    state = resume.PhaseState(link)
    state.open(CONFIG, PLAN)
    assert "discarded the training state" in _notes(capsys)[0]
    assert link.is_symlink() and sorted(p.name for p in target.iterdir()) == [
        resume.JOB_FILE, "notes.txt"]
    state.remove()
    assert link.is_symlink() and [p.name for p in target.iterdir()] == ["notes.txt"]
    plain = resume.PhaseState(_committed(tmp_path / "plain"))
    plain.remove()
    assert not plain.root.exists()


# --------------------------------------------------------------------------- real runs

def _train(small_dataset: Path, output: Path, epochs: int = 2, **kwargs: object) -> dict:
    from lungxray import train

    return train.train(small_dataset, "SmallCNN", output, epochs=epochs, weights="none",
                       seed=0, **kwargs)


def _history(output: Path) -> dict:
    return json.loads((output / "history.json").read_text())


@pytest.mark.slow
def test_killed_before_the_first_checkpoint_then_rerun_with_other_epochs(small_dataset,
                                                                         tmp_path, capsys):
    """(a) and (c): what a kill in the first seconds of epoch 1 leaves, from before issue 34
    (empty epoch log, format 3) and from now (a half-written weights file); the re-run with
    other --epochs trains them all, once each."""
    from lungxray import train

    output = tmp_path / "model"
    state = _job(output / ".state", {**CONFIG, "state_format": 3})
    (state / "scratch.epochs.csv").write_text("")
    info = _train(small_dataset, output, epochs=2)
    assert info["epochs"] == 2 and not state.exists()
    assert len(_history(output)["history"]["val_auc"]) == 2
    assert "discarded it" in capsys.readouterr().err

    def killed(*args, **kwargs):
        (state / ".scratch.epoch-1.weights.h5.0a1b2c3d.tmp.weights.h5").write_bytes(b"\x89H")
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train, "make_dataset", killed)
        with pytest.raises(KeyboardInterrupt):
            _train(small_dataset, output, epochs=2)
    info = _train(small_dataset, output, epochs=3)
    assert info["epochs"] == 3 and _history(output)["phases"] == [{"name": "scratch",
                                                                   "epochs": 3}]
    assert [len(v) for v in _history(output)["history"].values()] == [3] * len(
        _history(output)["history"])
    assert "note" not in capsys.readouterr().err  # nothing was saved: nothing discarded


@pytest.mark.slow
@pytest.mark.parametrize("where", ["before the phase was recorded", "before model_info.json"])
def test_killed_after_the_last_epoch_finishes_without_training_again(where, small_dataset,
                                                                     tmp_path, monkeypatch):
    """(b): the re-run writes the model from the saved epochs, counting each once."""
    import keras

    from lungxray import train

    output = tmp_path / "model"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        if where == "before the phase was recorded":
            patch.setattr(resume.PhaseState, "finish", killed)
        else:
            patch.setattr(train, "_write_outputs", killed)
        with pytest.raises(KeyboardInterrupt):
            _train(small_dataset, output, epochs=2)
    state = resume.PhaseState(output / ".state")
    if where == "before the phase was recorded":
        logged = [row["val_auc"] for row in state.progress("scratch", 2).rows]
    else:
        logged = state.finished(PLAN)[0]["history"]["val_auc"]
    assert len(logged) == 2 and not (output / artifacts.INFO_FILE).exists()

    def trained_again(*args, **kwargs):
        raise AssertionError("trained again")

    monkeypatch.setattr(keras.Model, "fit", trained_again)
    info = _train(small_dataset, output, epochs=2)
    assert info["epochs"] == 2 and _history(output)["phases"] == [{"name": "scratch",
                                                                   "epochs": 2}]
    assert _history(output)["history"]["val_auc"] == pytest.approx(logged)
    assert (output / artifacts.MODEL_FILE).is_file() and not (output / ".state").exists()


@pytest.mark.slow
def test_a_checkpoint_that_does_not_load_restarts_training_with_a_note(small_dataset, tmp_path,
                                                                      capsys):
    output = tmp_path / "model"
    commit = resume.PhaseState.commit

    def commit_then_kill(self, phase, progress):
        commit(self, phase, progress)
        raise KeyboardInterrupt

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(resume.PhaseState, "commit", commit_then_kill)
        with pytest.raises(KeyboardInterrupt):
            _train(small_dataset, output, epochs=2)
    weights = output / ".state" / "scratch.epoch-1.weights.h5"
    weights.write_bytes(weights.read_bytes()[:4096])  # HDF5 header intact, the rest cut off
    capsys.readouterr()
    info = _train(small_dataset, output, epochs=2)
    assert info["epochs"] == 2 and len(_history(output)["history"]["val_auc"]) == 2
    (note,) = [line for line in capsys.readouterr().err.splitlines() if "note:" in line]
    assert "scratch.epoch-1.weights.h5 cannot be loaded" in note
    assert note.endswith("discarded the training state, training starts afresh")


@pytest.mark.slow
def test_a_real_kill_in_epoch_one_never_blocks_the_corrected_rerun(small_dataset, tmp_path):
    """SIGKILL a real `lungxray train` as soon as its state exists, then re-run it with other
    --epochs: it trains, and records each epoch once."""
    output = tmp_path / "model"
    command = [sys.executable, "-m", "lungxray.cli", "train", "--data", str(small_dataset),
               "--model", "SmallCNN", "--output", str(output), "--seed", "1"]
    first = subprocess.Popen([*command, "--epochs", "50"], stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 300
    while not (output / ".state" / resume.JOB_FILE).exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(first.pid, signal.SIGKILL)
    first.wait()
    rerun = subprocess.run([*command, "--epochs", "2"], capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "Traceback" not in rerun.stderr
    history = _history(output)
    assert history["phases"] == [{"name": "scratch", "epochs": 2}]
    assert len(history["history"]["val_auc"]) == 2


@pytest.mark.slow
def test_sigterm_mid_training_leaves_no_temporary_file_and_the_rerun_resumes(small_dataset,
                                                                            tmp_path):
    output = tmp_path / "model"
    command = [sys.executable, "-m", "lungxray.cli", "train", "--data", str(small_dataset),
               "--model", "SmallCNN", "--output", str(output), "--seed", "1", "--epochs", "3",
               "--patience", "9"]
    first = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    record = output / ".state" / "scratch.progress.json"
    deadline = time.monotonic() + 300
    while not record.exists():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if "lungxray" in line] == [
        f"lungxray train: note: stopped by SIGTERM; {output / '.state'} keeps the finished "
        "epochs, the same command resumes from them"]
    assert not [p for p in output.rglob(".*") if ".tmp" in p.name]
    committed = len(json.loads(record.read_text())["epochs"])
    rerun = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert f"Epoch {committed + 1}/3" in rerun.stdout, rerun.stderr[-3000:]
    assert "Epoch 1/3" not in rerun.stdout, rerun.stderr[-3000:]
    history = _history(output)
    assert history["phases"] == [{"name": "scratch", "epochs": 3}]
    assert len(history["history"]["val_auc"]) == 3


@pytest.mark.slow
def test_a_kill_after_any_rename_of_a_training_run_resumes_to_the_same_epochs(small_dataset,
                                                                             tmp_path):
    """Fault injection: stop a run right after each of its atomic renames in turn (state and
    outputs; one epoch, as each epoch renames the same files); every re-run completes and
    records its epoch once, leaving no temporary file."""
    from lungxray import safeio

    replace = safeio.replace_via_temp
    renames: list[str] = []

    def counted(path, *args, **kwargs):
        replace(path, *args, **kwargs)
        renames.append(Path(path).name)
        if len(renames) == stop_after:
            raise KeyboardInterrupt

    stop_after = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(safeio, "replace_via_temp", counted)
        _train(small_dataset, tmp_path / "clean", epochs=1)
    names = list(renames)
    assert "scratch.progress.json" in names and names[-1] == "model_info.json"
    for stop_after in range(1, len(names)):
        output = tmp_path / f"killed-{stop_after}"
        renames.clear()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(safeio, "replace_via_temp", counted)
            with pytest.raises(KeyboardInterrupt):
                _train(small_dataset, output, epochs=1)
        info = _train(small_dataset, output, epochs=1)
        history = _history(output)
        assert info["epochs"] == 1, names[stop_after - 1]
        assert history["phases"] == [{"name": "scratch", "epochs": 1}], names[stop_after - 1]
        assert {len(v) for v in history["history"].values()} == {1}, names[stop_after - 1]
        assert not [p for p in output.rglob("*") if ".tmp" in p.name], names[stop_after - 1]
        assert not (output / ".state").exists()
