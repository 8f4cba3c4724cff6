"""Choices on image-statistics folds (issue 33 items 3-5): every training image held out once.

``lungxray preprocess --shift-fold I/K`` makes ``test_shifted`` fold I of K bands of
image-statistics clusters (each site its own); preparing with 1/K .. K/K and training on the
rest each time holds every training image out exactly once, where the single carve
(``--shifted-test-fraction``) holds out one region. This bench trains SmallCNN variants
(bench/defaults.py) on each fold and scores them on the fold they did not see. Per variant: val
AUC (mean over folds), the pooled out-of-fold AUC (every held-out image once; all sites and per
site), the mean and the worst fold's AUC, and beside them the single carve's ``test_shifted``
AUC from bench/defaults.json. Per threshold rule (each fold model's own validation threshold by
that rule, from its metrics.json): mean and worst-fold balanced accuracy.

    python -m bench.folds --folds 4 --seeds 42 --work /tmp/folds

Runs already in ``--work`` are reused (their predictions stay there). Writes bench/folds.json (each
fold's figures and both tables) and prints the tables in Markdown."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from bench.defaults import SAME_DATA, SIZE, auc_of, slug, trained
from bench.thresholds import ROOT, SETUPS, evaluated, prepared, site_parts
from lungxray import metrics

SPLIT = "test_shifted"


def fold_run(work: Path, setup: str, variant: str, seed: int, fold: int, folds: int) -> dict:
    """Prepare fold ``fold`` of ``folds`` (once per setup and seed), train ``variant`` on the
    rest and score it on val and on that fold: its held-out predictions and rule thresholds."""
    data = work / f"data-{slug(setup)}-{seed}-fold{fold}of{folds}"
    prepared(data, setup, seed, "--image-size", str(SIZE), "--shift-fold", f"{fold}/{folds}")
    run = work / f"{slug(setup)}-{slug(variant)}-{seed}-fold{fold}of{folds}"
    model = trained(run, data, variant, seed)
    evaluated(model, data, run / "eval", ["val", SPLIT])
    held = pd.read_csv(run / "eval" / SPLIT / "predictions.csv")
    rules = json.loads((run / "eval" / SPLIT / "metrics.json").read_text())["threshold_rules"]
    val, _ = site_parts(run / "eval", "val")
    return {"setup": setup, "variant": variant, "seed": seed, "fold": fold, "folds": folds,
            "val_auc": val["roc_auc"],
            "thresholds": {rule: entry["threshold"] for rule, entry in rules.items()},
            "y_true": held["y_true"].tolist(), "prob_pneumonia": held["prob_pneumonia"].tolist(),
            "site": held["site"].tolist() if "site" in held else ["all"] * len(held)}


def summary(runs: list[dict], carve: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The variants' table (AUCs) and the threshold rules' table (balanced accuracy), each
    over the folds of every setup, variant and seed (means over seeds)."""
    variants, rules = [], []
    frame = pd.DataFrame(runs)
    for (setup, variant, seed), part in frame.groupby(["setup", "variant", "seed"], sort=False):
        y = np.concatenate(part["y_true"].tolist())
        score = np.concatenate(part["prob_pneumonia"].tolist())
        site = np.concatenate(part["site"].tolist())
        fold_auc = [auc_of(np.asarray(r.y_true), np.asarray(r.prob_pneumonia))
                    for r in part.itertuples()]
        row = {"setup": setup, "variant": variant, "seed": seed,
               "val AUC": part["val_auc"].mean(), "out-of-fold AUC": auc_of(y, score)}
        for name in sorted(set(site.tolist()) - {"all"}):
            row[f"out-of-fold AUC {name}"] = auc_of(y[site == name], score[site == name])
        row["mean fold AUC"] = float(np.mean(fold_auc))
        row["worst fold AUC"] = float(np.min(fold_auc))
        row["carve test_shifted AUC"] = carve.get((setup, variant, seed))
        variants.append(row)
        for rule in part["thresholds"].iloc[0]:
            balanced = [metrics.rates_at(np.asarray(r.y_true), np.asarray(r.prob_pneumonia),
                                         r.thresholds[rule])["balanced_accuracy"]
                        for r in part.itertuples() if r.thresholds.get(rule) is not None]
            if len(balanced) == len(part):
                rules.append({"setup": setup, "variant": variant, "seed": seed, "rule": rule,
                              "mean fold bal. acc.": float(np.mean(balanced)),
                              "worst fold bal. acc.": float(np.min(balanced))})
    keys = ["setup", "variant"]
    table = pd.DataFrame(variants).groupby(keys, sort=False).mean(numeric_only=True)
    rule_table = pd.DataFrame(rules).groupby([*keys, "rule"], sort=False).mean(numeric_only=True)
    return table.drop(columns="seed"), rule_table.drop(columns="seed")


def carveauc_of(path: Path) -> dict:
    """bench/defaults.json's single-carve test_shifted AUC (all sites) per setup, variant and
    seed."""
    if not path.exists():
        return {}
    return {(run["setup"], run["variant"], run["seed"]): row["auc"]
            for run in json.loads(path.read_text()) for row in run["rows"]
            if row["split"] == SPLIT and row["site"] == "all"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--setups", nargs="+", default=["nih in training"], choices=list(SETUPS))
    parser.add_argument("--variants", nargs="+", choices=SAME_DATA,
                        default=["baseline", "class_weighting=false", "label_smoothing=0.1"])
    parser.add_argument("--work", type=Path, default=Path("/tmp/lungxray-folds"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "folds.json")
    args = parser.parse_args(argv)
    runs = [fold_run(args.work, setup, variant, seed, fold, args.folds)
            for seed in args.seeds for setup in args.setups for variant in args.variants
            for fold in range(1, args.folds + 1)]
    table, rules = summary(runs, carveauc_of(ROOT / "bench" / "defaults.json"))
    # The predictions stay in --work; the record keeps each fold's figures and the tables.
    folds = [{**{k: run[k] for k in ("setup", "variant", "seed", "fold", "folds", "val_auc",
                                     "thresholds")},
              "n": len(run["y_true"]),
              "auc": auc_of(np.asarray(run["y_true"]), np.asarray(run["prob_pneumonia"]))}
             for run in runs]
    args.output.write_text(json.dumps(
        {"folds": folds, "variants": table.reset_index().to_dict("records"),
         "rules": rules.reset_index().to_dict("records")}, indent=1) + "\n")
    print(table.round(3).reset_index().to_markdown(index=False))
    print(rules.round(3).reset_index().to_markdown(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
