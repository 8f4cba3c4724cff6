"""bench/gpu_profile.py on the CPU: every part of an epoch is timed after its compile, the numbers
are consistent with each other, and the epoch run with the pipeline's callbacks leaves nothing
behind."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import keras
import pytest

from bench import gpu_profile


def test_profile_times_each_part_of_an_epoch(tmp_path, small_dataset, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    result = gpu_profile.profile(small_dataset, "VGG16", tmp_path / "out", batch_size=16)

    assert result == json.loads((tmp_path / "out" / "profile.json").read_text())
    assert result["train_images"] == 160 and result["val_images"] == 160
    assert result["train_steps"] == 10 and result["backend"] == "tensorflow"
    seconds = result["seconds"]
    assert set(seconds) == {
        "first (compiles)", "pipeline input", "arrays in memory",
        "pipeline input, under cProfile", "validation: evaluate", "validation: predict",
        "save weights", "whole epoch as lungxray train runs it"}
    assert min(seconds.values()) > 0
    for part, per_s in result["train_images_per_s"].items():
        # seconds are rounded to ms in the JSON, so the derived figures match to 1%
        assert per_s == pytest.approx(160 / seconds[part], rel=0.01)
        assert result["train_ms_per_step"][part] == pytest.approx(100 * seconds[part], rel=0.01)

    profile_text = (tmp_path / "out" / "profile.txt").read_text()
    assert "top 40 by tottime" in profile_text and "top 40 by cumulative" in profile_text
    assert "keras/src/backend/tensorflow/trainer.py" in profile_text  # Keras' fit loop
    assert str(Path(keras.__file__).parents[1]) not in profile_text  # no machine's folders
    # its checkpoints and logs are removed (TensorFlow's autograph leaves .py files there)
    assert [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()] == []
