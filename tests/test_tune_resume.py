"""A real `lungxray tune` killed with SIGKILL after its first trial, then run again, finishes the
search without redoing the finished trial."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from lungxray import tune


def trial_files(project) -> dict[str, dict]:
    """``{trial_id: trial.json}`` of a keras-tuner project (skipping half-written files)."""
    trials = {}
    for path in project.glob("trial_*/trial.json"):
        try:
            content = json.loads(path.read_text())
        except json.JSONDecodeError:
            continue
        trials[content["trial_id"]] = content
    return trials


@pytest.mark.slow
def test_killed_tune_resumes_where_it_stopped(small_dataset, tmp_path):
    output = tmp_path / "tune"
    project = output / tune.STATE_DIR / "scratch"
    command = [sys.executable, "-m", "lungxray.cli", "tune", "--data", str(small_dataset),
               "--model", "VGG16", "--output", str(output), "--weights", "none",
               "--max-trials", "3", "--epochs", "2", "--seed", "3"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            # keras-tuner writes tuner0.json right after saving a finished trial: from then on
            # the first trial is safely on disk.
            deadline = time.monotonic() + 600
            while not (project / "tuner0.json").is_file():
                assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "the first trial did not finish in 10 min"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
            first.wait(timeout=60)
        finally:
            if first.poll() is None:
                first.kill()
                first.wait()
    assert first.returncode == -signal.SIGKILL
    at_kill = trial_files(project)
    times_at_kill = json.loads((project / tune.TIMES_FILE).read_text())
    finished = {tid for tid, t in at_kill.items() if t["status"] == "COMPLETED"}
    assert "0" in finished and len(finished) < 3, at_kill.keys()  # killed mid-search
    assert not (output / tune.BEST_FILE).exists()

    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    best = json.loads((output / tune.BEST_FILE).read_text())
    assert best["trials"] == 3
    trials = pd.read_csv(output / tune.TRIALS_FILE, dtype={"trial_id": str})
    assert list(trials["trial_id"]) == ["0", "1", "2"]
    assert set(trials["status"]) == {"COMPLETED"}

    times = json.loads((project / tune.TIMES_FILE).read_text())
    for trial_id in finished:
        # Not run again: same single start, same timestamp, same score.
        assert times[trial_id] == times_at_kill[trial_id]
        assert times[trial_id]["starts"] == 1
        row = trials[trials["trial_id"] == trial_id].iloc[0]
        assert row["score"] == pytest.approx(at_kill[trial_id]["score"])
    for trial_id in set(times) - finished:
        # An interrupted trial runs once more, from its start; the others once.
        before = times_at_kill.get(trial_id, {"starts": 0})["starts"]
        assert times[trial_id]["starts"] == before + 1
