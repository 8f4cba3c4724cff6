"""`make bench`: measure speed and accuracy side by side on this machine.

Writes bench/results.json and bench/RESULTS.md. Each section records its settings; the machine
is recorded once at the top. Sections: preprocess, tuning (cached features vs naive), input
pipeline, training throughput per model, `make local` end to end (wall time, peak RSS) and the
accuracy of every model and of the pipeline's pick on validation and on the carved test split.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"
# MedMNIST v2 (Yang et al., Scientific Data 2023), PneumoniaMNIST official test split.
PUBLISHED = [
    {"method": "ResNet-18 (28)", "accuracy": 0.854, "roc_auc": 0.944},
    {"method": "ResNet-50 (224)", "accuracy": 0.884, "roc_auc": 0.962},
    {"method": "auto-sklearn", "accuracy": 0.855, "roc_auc": 0.942},
    {"method": "AutoKeras", "accuracy": 0.878, "roc_auc": 0.947},
    {"method": "Google AutoML Vision", "accuracy": 0.946, "roc_auc": 0.991},
]


def machine() -> dict:
    """What produced the numbers."""
    import tensorflow as tf

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU")),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_local(profile: str, data: Path, weights: str, pipeline_root: Path) -> dict:
    """`make local` as a user runs it; wall time and the peak RSS of its largest process."""
    started = time.time()
    subprocess.run(["make", "-C", str(ROOT), "local", f"PROFILE={profile}", f"DATA={data}",
                    f"WEIGHTS={weights}", f"PIPELINE_ROOT={pipeline_root}"], check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    runs = sorted(pipeline_root.glob("lungxray-*"), key=lambda p: p.stat().st_mtime)
    return {"profile": profile, "weights": weights, "data": str(data),
            "wall_seconds": round(time.time() - started, 1),
            "peak_rss_mib": round(peak_kib / 1024), "run_dir": str(runs[-1])}


def accuracy(run_dir: Path) -> dict:
    """Per model: ACC at 0.5, ACC at the validation threshold, ROC AUC (95% CI when recorded),
    on val and on the carved test split; and which model the pipeline picked (on val)."""
    rows = []
    for iteration in sorted(run_dir.glob("for-loop-*-iteration-*")):
        info = json.loads((iteration / "train" / "model" / "model_info.json").read_text())
        row = {"model": info["model_name"], "threshold": info["threshold"]}
        for split in ("val", "test"):
            path = iteration / "evaluate" / "evaluation" / split / "metrics.json"
            metrics = json.loads(path.read_text())
            row[f"{split}_acc_at_0.5"] = metrics.get("accuracy_at_0.5")
            row[f"{split}_acc"] = metrics["accuracy"]
            row[f"{split}_auc"] = metrics["roc_auc"]
            row[f"{split}_auc_ci"] = metrics.get("ci", {}).get("roc_auc")
            row[f"{split}_n"] = metrics["n"]
        rows.append(row)
    best = json.loads((run_dir / "compare" / "best_model" / "model_info.json").read_text())
    return {"models": rows, "pick": best["model_name"], "published_test": PUBLISHED}


def markdown(results: dict) -> str:
    """RESULTS.md from results.json."""
    m = results["machine"]
    lines = ["# Benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['gpus']} GPU(s); Python "
             f"{m['python']}, TensorFlow {m['tensorflow']}; {m['date']}. "
             "Produced by `make bench` (bench/run.py); raw numbers in results.json.", ""]
    for name, section in results.items():
        if name == "machine":
            continue
        lines += [f"## {name}", "", "```json", json.dumps(section, indent=2), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    parser.add_argument("--only", nargs="*", default=None,
                        help="sections to run (preprocess tuning input training local)")
    parser.add_argument("--profile", default="quick", help="profile of the `make local` run")
    parser.add_argument("--weights", default="none", help="weights of the `make local` run")
    parser.add_argument("--output", type=Path, default=BENCH)
    args = parser.parse_args(argv)
    wanted = set(args.only or ["preprocess", "tuning", "input", "training", "local"])
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()

    from lungxray import data

    with tempfile.TemporaryDirectory(prefix="lungxray-bench-") as tmp:
        work = Path(tmp)
        prepared = work / "data32"
        data.preprocess(str(args.data), prepared, image_size=32)
        if "preprocess" in wanted:
            from bench.preprocess_bench import bench_preprocess

            results["preprocess"] = bench_preprocess(3000, 512, work / "preprocess")
        if "tuning" in wanted:
            from bench.tuning_bench import bench_tuning

            results["tuning"] = bench_tuning_default(bench_tuning, args.data, work)
        if "input" in wanted:
            from bench.training_bench import bench_input_pipeline

            results["input_pipeline"] = bench_input_pipeline(prepared)
        if "training" in wanted:
            from bench.training_bench import bench_train_throughput

            results["train_throughput"] = bench_train_throughput(prepared, workdir=work)
        if "local" in wanted:
            local = run_local(args.profile, args.data, args.weights, work / "runs")
            results["make_local"] = {k: v for k, v in local.items() if k != "run_dir"}
            results["accuracy"] = {"settings": f"make local PROFILE={args.profile} "
                                               f"WEIGHTS={args.weights}",
                                   **accuracy(Path(local["run_dir"]))}
        args.output.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2))
        (args.output / "RESULTS.md").write_text(markdown(results))
    print(f"wrote {results_path} and {args.output / 'RESULTS.md'}")
    return 0


def bench_tuning_default(bench_tuning, source: Path, work: Path) -> dict:
    """The tuning comparison at a realistic CPU size, with a weights file as the frozen
    backbone (no ImageNet download here)."""
    import keras

    from lungxray import data

    prepared = work / "data64"
    data.preprocess(str(source), prepared, image_size=64, max_per_split=2000)
    weights = work / "vgg16_notop.weights.h5"
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(64, 64, 3)).save_weights(weights)
    return bench_tuning(prepared, "VGG16", weights, 5, 2, work / "tuning")


if __name__ == "__main__":
    sys.exit(main())
