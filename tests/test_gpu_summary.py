"""bench/gpu_summary.py: which nvidia-smi samples count as steady-state GPU utilisation."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from bench import gpu_summary

T0 = 1_795_700_000.0


def write_run(tmp_path, util_at) -> tuple:
    """A model dir with two phases of two 8 s epochs (starting at T0+0, 10, 20, 30) and a
    one-sample-a-second utilisation log from T0 to T0+40."""
    model_dir = tmp_path / "VGG16"
    model_dir.mkdir()
    history = {"epoch_started": [T0, T0 + 10, T0 + 20, T0 + 30], "epoch_seconds": [8.0] * 4}
    phases = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 2}]
    (model_dir / "history.json").write_text(json.dumps({"history": history, "phases": phases}))
    (model_dir / "model_info.json").write_text(json.dumps({"devices": {"gpus": 1},
                                                           "batch_size": 32}))
    util_csv = tmp_path / "VGG16.util.csv"
    rows = [f"{datetime.fromtimestamp(T0 + s).strftime(gpu_summary.NVIDIA_SMI_TIME)[:-3]}, "
            f"{util_at(s)}, 1000" for s in range(41)]
    util_csv.write_text("\n".join(rows) + "\n")
    return model_dir, util_csv


def test_steady_utilisation_leaves_out_each_phases_first_epoch_and_the_gaps(tmp_path):
    def util_at(second: int) -> int:
        if second % 10 > 8:
            return 0  # between epochs: callbacks and checkpoints
        return 90 if second // 10 in (1, 3) else 5  # epochs 0 and 2 compile

    model_dir, util_csv = write_run(tmp_path, util_at)
    summary = gpu_summary.summarise_model(model_dir, util_csv, n_train=800)
    assert summary["gpu_util_mean_steady"] == 90.0
    assert summary["gpu_util_samples_steady"] == 18  # seconds 10..18 and 30..38
    assert summary["gpu_util_mean"] == pytest.approx(
        sum(util_at(s) for s in range(41)) / 41, abs=0.05)
    assert summary["images_per_s"] == [100.0] * 4 and summary["devices"] == {"gpus": 1}


def test_a_run_of_first_epochs_only_has_no_steady_utilisation(tmp_path):
    model_dir, util_csv = write_run(tmp_path, lambda second: 50)
    recorded = json.loads((model_dir / "history.json").read_text())
    recorded["phases"] = [{"name": "head", "epochs": 1}, {"name": "a", "epochs": 1},
                          {"name": "b", "epochs": 1}, {"name": "c", "epochs": 1}]
    (model_dir / "history.json").write_text(json.dumps(recorded))
    summary = gpu_summary.summarise_model(model_dir, util_csv, n_train=800)
    assert summary["gpu_util_mean_steady"] is None and summary["gpu_util_samples_steady"] == 0
    assert summary["gpu_util_mean"] == 50.0
