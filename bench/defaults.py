"""Training defaults measured (issue 33 item 5): SmallCNN, the from-scratch baseline every
profile runs, trained with `lungxray train` defaults at the profiles' prepared size (32 px)
(geometric augmentation on, as it was: ``STUDY_BASE``) against one changed default at a time,
with the NIH site either held out whole (``--holdout-site nih``) or in training, as in
bench/thresholds.py. Per split and site: ROC AUC, accuracy and balanced accuracy at the model's
own threshold (model_info.json) and at 0.5.

    python -m bench.defaults --seeds 42 --work /tmp/defaults

Runs already in ``--work`` are reused; variants that change training only share one prepared
dataset per setup, size and seed. Writes bench/defaults.json after every run (runs recorded
there before are kept) and prints two Markdown tables (means over seeds): the variants, and
mean-probability ensembles of the top-k variants by val AUC (:func:`ensembles`)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from bench.thresholds import ROOT, SETUPS, cli, evaluated, prepared, site_parts
from lungxray import metrics

SIZE = 32  # the prepared size of the quick and full profiles (pipelines/profiles.py)
# The baseline of this study is train's defaults as they were when it ran: SmallCNN has since
# dropped the geometric augmentation on its evidence (variant augment=0), so every variant
# pins it, and a re-run measures the same settings.
STUDY_BASE = {"augment": 1.0}
NO_CARVE = ["--shifted-test-fraction", "0"]
# name: (prepared size, extra train options, hyperparameters over the defaults, extra
# preprocess options)
VARIANTS: dict[str, tuple[int, list[str], dict, list[str]]] = {
    "baseline": (SIZE, [], {}, []),
    "class_weighting=false": (SIZE, [], {"class_weighting": False}, []),
    "label_smoothing=0.1": (SIZE, [], {"label_smoothing": 0.1}, []),
    "epochs=9": (SIZE, ["--epochs", "9"], {}, []),
    "size=28": (28, [], {}, []),
    "size=48": (48, [], {}, []),
    # The augmentation levers (bench/levers.md measured them on test_shifted only).
    "augment=0": (SIZE, [], {"augment": 0.0}, []),
    "augment=0.5": (SIZE, [], {"augment": 0.5}, []),
    "intensity_augment=1": (SIZE, [], {"intensity_augment": 1.0}, []),
    "randaugment=0.2": (SIZE, [], {"randaugment": 0.2}, []),
    "mixup=0.2": (SIZE, [], {"mixup": 0.2}, []),
    # Every site the same total weight (x class); alone and over the shipped augment 0.
    "site_weighting=true": (SIZE, [], {"site_weighting": True}, []),
    "augment=0,site_weighting=true": (SIZE, [], {"augment": 0.0, "site_weighting": True}, []),
    # Per-image intensity standardisation over the shipped augment 0 (sites differ in exposure).
    "augment=0,standardize=true": (SIZE, [], {"augment": 0.0, "standardize": True}, []),
    # Earlier defaults again over the shipped augment 0 (under augment 1 NIH's patients leaned
    # towards label smoothing and no class weighting); 9 epochs as in PROFILE=full.
    "augment=0,epochs=9": (SIZE, ["--epochs", "9"], {"augment": 0.0}, []),
    "augment=0,label_smoothing=0.1": (SIZE, [], {"augment": 0.0, "label_smoothing": 0.1}, []),
    "augment=0,class_weighting=false": (SIZE, [], {"augment": 0.0, "class_weighting": False}, []),
    # No shift carve: its images stay in train (no test_shifted to score).
    "shifted_test_fraction=0": (SIZE, [], {}, NO_CARVE),
}
# Measured after the ensemble study (over augment 0, on four seeds); left out of its
# members so that its table re-runs as recorded.
LATER = {name for name in VARIANTS if name.startswith(("site_weighting", "augment=0,"))}
# Variants trained on one prepared dataset (same images, same rows): their predictions can be
# averaged into ensembles.
SAME_DATA = [name for name, (size, _, _, prep) in VARIANTS.items()
             if size == SIZE and not prep and name not in LATER]


def slug(text: str) -> str:
    return text.replace(" ", "_").replace("=", "-")


def trained(run: Path, data: Path, variant: str, seed: int) -> Path:
    """SmallCNN trained once on ``data`` with ``variant``'s options into ``run``/model (a run
    killed before its model_info.json, written last, is resumed by train)."""
    _, options, hparams, _ = VARIANTS[variant]
    model = run / "model"
    if not (model / "model_info.json").exists():
        options = [*options, "--hparams", str(run / "hparams.json")]
        run.mkdir(parents=True, exist_ok=True)
        (run / "hparams.json").write_text(json.dumps({**STUDY_BASE, **hparams}) + "\n")
        cli("train", "--data", str(data), "--model", "SmallCNN", "--output", str(model),
            "--seed", str(seed), *options)
    return model


def one_run(work: Path, setup: str, variant: str, seed: int) -> dict:
    """Preprocess (once per setup, size and seed), train and evaluate one variant; its rows per
    split and site."""
    size, _, _, prep = VARIANTS[variant]
    run = work / f"{slug(setup)}-{slug(variant)}-{seed}"
    data = work / f"data-{slug(setup)}-{size}{'-nocarve' if prep else ''}-{seed}"
    model, evaluation, timing = run / "model", run / "eval", run / "seconds.json"
    start = time.time()
    splits = prepared(data, setup, seed, "--image-size", str(size), *prep)
    trained(run, data, variant, seed)
    evaluated(model, data, evaluation, splits)
    if not timing.exists():  # a reused run keeps the seconds it took (preprocess included)
        timing.write_text(json.dumps(time.time() - start) + "\n")
    threshold = json.loads((model / "model_info.json").read_text())["threshold"]
    rows = []
    for split in splits:
        _, parts = site_parts(evaluation, split)
        for site, part in parts:
            y = part["y_true"].to_numpy()
            probs = part[["prob_normal", "prob_pneumonia"]].to_numpy()
            own = metrics.rates_at(y, probs[:, 1], threshold)
            half = metrics.rates_at(y, probs[:, 1], 0.5)
            rows.append({"setup": setup, "variant": variant, "seed": seed, "split": split,
                         "site": site, "n": len(part), "auc": metrics.roc_auc(y, probs),
                         "threshold": threshold, "accuracy": own["accuracy"],
                         "balanced_accuracy": own["balanced_accuracy"],
                         "accuracy_at_0.5": half["accuracy"],
                         "balanced_accuracy_at_0.5": half["balanced_accuracy"]})
    return {"setup": setup, "variant": variant, "seed": seed,
            "seconds": json.loads(timing.read_text()), "rows": rows}


def summary(rows: list[dict]) -> pd.DataFrame:
    """Mean over seeds per setup and variant: val, test, test_shifted and NIH AUC (the held-out
    site's split, or NIH's rows of test when in training) and balanced accuracy."""
    frame = pd.DataFrame(rows)
    nih = ((frame["split"] == "test_site_nih") & (frame["site"] == "all")) | (
        (frame["split"] == "test") & (frame["site"] == "nih"))
    pooled = frame["site"] == "all"
    picks = {"val": pooled & (frame["split"] == "val"),
             "test": pooled & (frame["split"] == "test"),
             "test_shifted": pooled & (frame["split"] == "test_shifted"), "NIH": nih}
    columns = {}
    for name, pick in picks.items():
        part = frame[pick].groupby(["setup", "variant"], sort=False)
        columns[f"{name} AUC"] = part["auc"].mean()
        if name in ("test_shifted", "NIH"):
            columns[f"{name} bal. acc."] = part["balanced_accuracy"].mean()
            columns[f"{name} bal. acc. @0.5"] = part["balanced_accuracy_at_0.5"].mean()
    seeds = frame.groupby(["setup", "variant"], sort=False)["seed"].nunique()
    table = pd.DataFrame({**columns, "seeds": seeds})
    order = [(setup, variant) for setup in SETUPS for variant in VARIANTS
             if (setup, variant) in table.index]
    return table.loc[order]


def ensembles(work: Path, runs: dict) -> pd.DataFrame:
    """Mean-probability ensembles of the SAME_DATA variants measured for each setup and seed:
    the top k by val AUC (k = 1, 2, 3, 5, all), as compare builds its candidates. Mean over seeds
    of val, test_shifted and NIH AUC (NIH as in :func:`summary`)."""
    rows = []
    for setup, seed in sorted({(s, seed) for s, _, seed in runs}):
        members = [v for v in SAME_DATA if (setup, v, seed) in runs]
        evals = {v: work / f"{slug(setup)}-{slug(v)}-{seed}" / "eval" for v in members}
        scored = {v: {split: pd.read_csv(evals[v] / split / "predictions.csv")
                      for split in ("val", "test", "test_shifted", "test_site_nih")
                      if (evals[v] / split).is_dir()}
                  for v in members}
        by_val = sorted(members, key=lambda v: -_auc(scored[v]["val"]))
        for k in sorted({1, 2, 3, 5, len(members)} & set(range(1, len(members) + 1))):
            top = by_val[:k]
            row = {"setup": setup, "seed": seed, "members": k, "first": top[0]}
            for name, split, site in (("val", "val", None), ("test_shifted", "test_shifted", None),
                                      ("NIH", "test_site_nih" if "test_site_nih" in scored[top[0]]
                                       else "test", "nih")):
                tables = [scored[v][split] for v in top]
                if any(not t["y_true"].equals(tables[0]["y_true"]) for t in tables):
                    raise SystemExit(f"{setup} seed {seed}: {split} rows differ between members")
                mean = tables[0].assign(prob_pneumonia=np.mean(
                    [t["prob_pneumonia"] for t in tables], axis=0))
                if site and split == "test":
                    mean = mean[mean["site"] == site]
                row[f"{name} AUC"] = _auc(mean)
            rows.append(row)
    frame = pd.DataFrame(rows)
    return frame.groupby(["setup", "members"], sort=False).agg(
        {"val AUC": "mean", "test_shifted AUC": "mean", "NIH AUC": "mean",
         "seed": "nunique"}).rename(columns={"seed": "seeds"})


def auc_of(y: np.ndarray, score: np.ndarray) -> float | None:
    """ROC AUC of P(pneumonia) scores, as evaluation reports it."""
    score = np.asarray(score, dtype=float)
    return metrics.roc_auc(np.asarray(y), np.column_stack([1 - score, score]))


def _auc(table: pd.DataFrame) -> float | None:
    return auc_of(table["y_true"], table["prob_pneumonia"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lungxray-defaults"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "defaults.json")
    args = parser.parse_args(argv)
    # Runs recorded before (other seeds or variants) are kept; a run measured again replaces its
    # old entry.
    done = json.loads(args.output.read_text()) if args.output.exists() else []
    runs = {(r["setup"], r["variant"], r["seed"]): r for r in done}
    for seed in args.seeds:
        for variant in args.variants:
            for setup in args.setups:
                runs[(setup, variant, seed)] = one_run(args.work, setup, variant, seed)
                args.output.write_text(json.dumps(list(runs.values()), indent=1,
                                                  default=_plain) + "\n")
    table = summary([row for run in runs.values() for row in run["rows"]]).round(3)
    print(table.reset_index().to_markdown(index=False))
    print(ensembles(args.work, runs).round(3).reset_index().to_markdown(index=False))
    return 0


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
