"""bench/gpu.sh end to end on the CPU, with a stand-in ``nvidia-smi`` on PATH: the pipeline CLIs
it calls, the summary it writes, and that its utilisation sampler never outlives it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FAKE_SMI = """#!/usr/bin/env bash
for arg in "$@"; do
  if [ "$arg" = -l ]; then
    while true; do echo "$(date '+%Y/%m/%d %H:%M:%S.%3N'), 42, 1234"; sleep 0.1; done
  fi
done
echo "name, driver_version, memory.total [MiB]"
echo "Fake GPU, 1.0, 1024 MiB"
"""


def run_gpu_bench(tmp_path: Path, data: Path, models: str) -> subprocess.CompletedProcess:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    smi = bin_dir / "nvidia-smi"
    smi.write_text(FAKE_SMI)
    smi.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "PY": sys.executable,
           "MODELS": models, "EPOCHS": "2", "BATCH_SIZE": "16", "IMAGE_SIZE": "32",
           "MAX_PER_SPLIT": "40"}
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), str(data),
                           str(tmp_path / "out")], env=env, capture_output=True, text=True,
                          timeout=600)


def assert_sampler_stopped(util_csv: Path) -> None:
    size = util_csv.stat().st_size
    time.sleep(0.5)
    assert util_csv.stat().st_size == size, "the nvidia-smi sampler is still running"


def test_gpu_bench_records_epochs_throughput_and_utilisation(tmp_path, shared_npz):
    result = run_gpu_bench(tmp_path, shared_npz, "VGG16")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["gpu"] == "Fake GPU, 1.0, 1024 MiB"
    assert summary["image_size"] == 32 and summary["train_images"] == 40
    vgg = summary["models"]["VGG16"]
    assert len(vgg["epoch_seconds"]) == 2 and min(vgg["epoch_seconds"]) > 0
    seconds = json.loads((tmp_path / "out" / "VGG16" / "history.json").read_text()
                         )["history"]["epoch_seconds"]
    assert vgg["epoch_seconds"] == [round(s, 1) for s in seconds]
    assert vgg["images_per_s"] == [round(40 / s, 1) for s in seconds]
    assert vgg["gpu_util_mean"] == 42.0
    # The stand-in samples every 0.1 s, so some fall inside the second (steady) epoch.
    assert vgg["gpu_util_mean_steady"] == 42.0 and vgg["gpu_util_samples_steady"] > 0
    assert vgg["devices"]["gpus"] == 0  # the real device count, not the stand-in's claim
    assert vgg["devices"]["backend"] == "tensorflow" and vgg["batch_size"] == 16
    assert_sampler_stopped(tmp_path / "out" / "VGG16.util.csv")


def test_gpu_bench_failing_model_exits_nonzero_and_stops_the_sampler(tmp_path, shared_npz):
    result = run_gpu_bench(tmp_path, shared_npz, "NoSuchNet")
    assert result.returncode != 0
    assert "training NoSuchNet failed" in result.stderr
    assert "NoSuchNet" in result.stderr.split("failed", 1)[1]  # the log's tail names the cause
    assert not (tmp_path / "out" / "summary.json").exists()
    assert_sampler_stopped(tmp_path / "out" / "NoSuchNet.util.csv")
