"""What the refit gains (issue 33 item 3): the pick as measured (trained on train, the carved
``test_shifted`` held out) against the same recipe trained again on train + ``test_shifted``
(``lungxray refit``), both scored on the splits neither trained on: val, the random test and,
with NIH held out, NIH's own images (``test_site_nih``) — per site where a split has two.

The measured models are bench/thresholds.py's (SmallCNN defaults, PneumoniaMNIST + the NIH site,
NIH held out or in training), reused from its work dir:

    python -m bench.thresholds --seeds 42 7 --work /tmp/thr
    python -m bench.refit_gain --seeds 42 7 --work /tmp/thr

Writes bench/refit_gain.json and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from bench.thresholds import ROOT, SETUPS, cli
from lungxray import artifacts


def one_run(work: Path, setup: str, seed: int) -> dict:
    """``lungxray refit`` of one measured run; the record's scores as rows."""
    run = work / f"{setup.replace(' ', '_')}-{seed}"
    compare, shipped = run / "as_compare", run / "refit"
    if not (run / "model" / artifacts.INFO_FILE).is_file():
        raise SystemExit(f"{run}: no measured model; run bench.thresholds first")
    start = time.time()
    if not (shipped / artifacts.BEST_MODEL_DIR / artifacts.INFO_FILE).is_file():
        shutil.rmtree(compare, ignore_errors=True)
        shutil.copytree(run / "model", compare / artifacts.BEST_MODEL_DIR)
        for name in (artifacts.REPORT_HTML, artifacts.REPORT_MD, artifacts.MODEL_CARD_FILE):
            (compare / name).write_text("<html><body></body></html>" if name.endswith("html")
                                        else "")
        cli("refit", "--data", str(run / "data"), "--compare", str(compare), "--output",
            str(shipped))
    info = json.loads((shipped / artifacts.BEST_MODEL_DIR / artifacts.INFO_FILE).read_text())
    record = info["refit"]
    rows = [{"setup": setup, "seed": seed, "split": split, "model": who, **values}
            for who, scores in record["scores"].items() for split, values in scores.items()]
    return {"rows": rows, "seconds": time.time() - start, "added": record["added_splits"],
            "train_images": record["train_images"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--work", type=Path, default=Path("/tmp/lungxray-thresholds"))
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "refit_gain.json")
    args = parser.parse_args(argv)
    runs = [one_run(args.work, setup, seed) for setup in args.setups for seed in args.seeds]
    rows = [row for run in runs for row in run["rows"]]
    args.output.write_text(json.dumps({"runs": [{k: v for k, v in r.items() if k != "rows"}
                                                for r in runs], "rows": rows}, indent=1) + "\n")
    frame = pd.DataFrame(rows)
    table = frame.pivot_table(index=["setup", "split"], columns="model",
                              values=["roc_auc", "balanced_accuracy"], aggfunc="mean",
                              sort=False)
    print(table.round(3).to_markdown())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
