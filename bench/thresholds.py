"""Threshold rules measured (issue 33 item 4): SmallCNN trained with its defaults on
PneumoniaMNIST, with the NIH site either held out whole (``--holdout-site nih``: the off-site
test) or in training; every rule's threshold chosen on validation, its accuracy, balanced
accuracy, sensitivity and specificity on each held-out split and site.

    python -m bench.thresholds --seeds 42 7 --work /tmp/thr

Writes bench/thresholds.json and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from lungxray import metrics

ROOT = Path(__file__).resolve().parents[1]
NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"
NIH = ROOT.parent / "shared" / "data" / "nih_cxr_1000" / "manifest.csv"
SETUPS = {"nih held out": ["--holdout-site", "nih"], "nih in training": []}


def cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "lungxray.cli", *args], check=True,
                   stdout=subprocess.DEVNULL)


def prepared(data: Path, setup: str, seed: int, *extra: str) -> list[str]:
    """``data`` preprocessed once for this setup and seed (kept when it exists; ``extra`` are
    further preprocess options); the names of its held-out splits."""
    if not data.exists():
        cli("preprocess", "--source", str(NPZ), "--output", str(data), "--seed", str(seed),
            "--site-name", "pneumoniamnist", "--site", f"nih={NIH}", *SETUPS[setup], *extra)
    manifest = json.loads((data / "manifest.json").read_text())
    return [s for s in manifest["splits"] if s != "train"]


def evaluated(model: Path, data: Path, evaluation: Path, splits: list[str]) -> None:
    """``model`` evaluated once on ``splits`` of ``data`` into ``evaluation`` (again when a
    split's metrics.json is missing, e.g. after a kill)."""
    if not all((evaluation / split / "metrics.json").exists() for split in splits):
        cli("evaluate", "--model", str(model), "--data", str(data), "--output",
            str(evaluation), "--split", *splits, "--no-robustness", "--no-gradcam")


def site_parts(evaluation: Path, split: str) -> tuple[dict, list[tuple[str, pd.DataFrame]]]:
    """A split's metrics.json and its predictions: all of them ("all") and, where the split
    holds several sites, each site's; a part with one class only is left out."""
    result = json.loads((evaluation / split / "metrics.json").read_text())
    table = pd.read_csv(evaluation / split / "predictions.csv")
    groups = [("all", table)]
    if "site" in table and table["site"].nunique() > 1:
        groups += list(table.groupby("site"))
    return result, [(site, part) for site, part in groups if part["y_true"].nunique() >= 2]


def one_run(work: Path, setup: str, seed: int) -> dict:
    """Preprocess, train and evaluate once; the rules' rates per split and per site."""
    run = work / f"{setup.replace(' ', '_')}-{seed}"
    data, model, evaluation = run / "data", run / "model", run / "eval"
    start = time.time()
    splits = prepared(data, setup, seed)
    if not model.exists():
        cli("train", "--data", str(data), "--model", "SmallCNN", "--output", str(model),
            "--seed", str(seed))
    evaluated(model, data, evaluation, splits)
    rows = []
    for split in splits:
        result, parts = site_parts(evaluation, split)
        for rule, block in result["threshold_rules"].items():
            for site, part in parts:
                rates = metrics.rates_at(part["y_true"].to_numpy(),
                                         part["prob_pneumonia"].to_numpy(), block["threshold"])
                rows.append({"setup": setup, "seed": seed, "split": split, "site": site,
                             "rule": rule, "threshold": block["threshold"], **rates,
                             "auc": result["roc_auc"] if site == "all" else None})
    return {"rows": rows, "seconds": time.time() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lungxray-thresholds"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "thresholds.json")
    args = parser.parse_args(argv)
    runs = [one_run(args.work, setup, seed) for setup in args.setups for seed in args.seeds]
    rows = [row for run in runs for row in run["rows"]]
    args.output.write_text(json.dumps({"runs": [{"seconds": r["seconds"]} for r in runs],
                                       "rows": rows}, indent=1) + "\n")
    frame = pd.DataFrame(rows)
    mean = frame.groupby(["setup", "split", "site", "rule"], sort=False)[
        ["threshold", "accuracy", "balanced_accuracy", "sensitivity", "specificity"]].mean()
    print(mean.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
