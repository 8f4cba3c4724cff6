"""Training defaults measured (issue 33 item 5): SmallCNN, the from-scratch baseline every
profile runs, trained with `lungxray train` defaults at the profiles' prepared size (32 px)
against one changed default at a time, with the NIH site either held out whole
(``--holdout-site nih``) or in training, as in bench/thresholds.py. Per split and site: ROC AUC,
accuracy and balanced accuracy at the model's own threshold (model_info.json) and at 0.5.

    python -m bench.defaults --seeds 42 --work /tmp/defaults

Runs already in ``--work`` are reused; variants that change training only share one prepared
dataset per setup, size and seed. Writes bench/defaults.json after every run (runs recorded
there before are kept) and prints a Markdown table (mean over seeds)."""

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
# name: (prepared size, extra train options, hyperparameters over the defaults)
VARIANTS: dict[str, tuple[int, list[str], dict]] = {
    "baseline": (SIZE, [], {}),
    "class_weighting=false": (SIZE, [], {"class_weighting": False}),
    "label_smoothing=0.1": (SIZE, [], {"label_smoothing": 0.1}),
    "epochs=9": (SIZE, ["--epochs", "9"], {}),
    "size=28": (28, [], {}),
    "size=48": (48, [], {}),
}


def slug(text: str) -> str:
    return text.replace(" ", "_").replace("=", "-")


def one_run(work: Path, setup: str, variant: str, seed: int) -> dict:
    """Preprocess (once per setup, size and seed), train and evaluate one variant; its rows per
    split and site."""
    size, options, hparams = VARIANTS[variant]
    run = work / f"{slug(setup)}-{slug(variant)}-{seed}"
    data = work / f"data-{slug(setup)}-{size}-{seed}"
    model, evaluation, timing = run / "model", run / "eval", run / "seconds.json"
    start = time.time()
    splits = prepared(data, setup, seed, "--image-size", str(size))
    if not model.exists():
        if hparams:
            options = [*options, "--hparams", str(run / "hparams.json")]
            run.mkdir(parents=True, exist_ok=True)
            (run / "hparams.json").write_text(json.dumps(hparams) + "\n")
        cli("train", "--data", str(data), "--model", "SmallCNN", "--output", str(model),
            "--seed", str(seed), *options)
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
    return pd.DataFrame({**columns, "seeds": seeds})


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
    return 0


def _plain(value: object) -> object:
    return value.item() if isinstance(value, np.generic) else str(value)


if __name__ == "__main__":
    raise SystemExit(main())
