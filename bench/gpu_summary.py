"""Summarise a bench/gpu.sh run: per-epoch seconds and images/s of each trained model, and the
GPU utilisation that nvidia-smi sampled, over the whole run and inside the steady epochs (all but
the first epoch of each training phase, which also traces and compiles the graph).

    python bench/gpu_summary.py OUT DATA_DIR MODEL...
"""

from __future__ import annotations

import csv
import json
import os
import sys
from datetime import datetime
from pathlib import Path
from statistics import mean

NVIDIA_SMI_TIME = "%Y/%m/%d %H:%M:%S.%f"  # nvidia-smi's timestamp, in the machine's local time


def utilisation(util_csv: Path) -> list[tuple[float, float]]:
    """(Unix time, GPU utilisation %) per sample of ``nvidia-smi --query-gpu=timestamp,...``."""
    rows = [row for row in csv.reader(util_csv.open()) if len(row) > 2]
    return [(datetime.strptime(row[0].strip(), NVIDIA_SMI_TIME).timestamp(), float(row[1]))
            for row in rows]


def steady_windows(history: dict, phases: list[dict]) -> list[tuple[float, float]]:
    """(start, end) Unix times of the epochs that compile nothing: each phase's first epoch
    compiles its training step, so it is left out. Gaps between epochs are not inside."""
    firsts, epoch = set(), 0
    for phase in phases:
        firsts.add(epoch)
        epoch += phase["epochs"]
    return [(start, start + seconds) for i, (start, seconds)
            in enumerate(zip(history["epoch_started"], history["epoch_seconds"], strict=True))
            if i not in firsts]


def summarise_model(model_dir: Path, util_csv: Path, n_train: int) -> dict:
    recorded = json.loads((model_dir / "history.json").read_text())
    seconds = recorded["history"]["epoch_seconds"]
    samples = utilisation(util_csv)
    windows = steady_windows(recorded["history"], recorded["phases"])
    steady = [u for t, u in samples if any(start <= t <= end for start, end in windows)]
    info = json.loads((model_dir / "model_info.json").read_text())
    return {
        "epoch_seconds": [round(s, 1) for s in seconds],
        "images_per_s": [round(n_train / s, 1) for s in seconds],
        "gpu_util_mean": round(mean(u for _, u in samples), 1) if samples else None,
        "gpu_util_mean_steady": round(mean(steady), 1) if steady else None,
        "gpu_util_samples_steady": len(steady),
        "batch_size": info["batch_size"],
        "devices": info["devices"],
    }


def summarise(out: Path, data_dir: Path, models: list[str]) -> dict:
    manifest = json.loads((data_dir / "manifest.json").read_text())
    n_train = manifest["splits"]["train"]["n"]
    return {
        "gpu": (out / "gpu.csv").read_text().splitlines()[-1],
        "train_images": n_train,
        "image_size": manifest["image_size"],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),  # autotuning level etc. change the numbers
        "models": {model: summarise_model(out / model, out / f"{model}.util.csv", n_train)
                   for model in models},
        "note": "epoch seconds include the validation pass; images/s = train images / them; "
                "the first epoch of each phase also compiles the graph; steady utilisation "
                "averages the samples (one a second) inside the other epochs",
    }


def main(argv: list[str]) -> None:
    out, data_dir, models = Path(argv[0]), Path(argv[1]), argv[2:]
    (out / "summary.json").write_text(json.dumps(summarise(out, data_dir, models), indent=2))


if __name__ == "__main__":
    main(sys.argv[1:])
