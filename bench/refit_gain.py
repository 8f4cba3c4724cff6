"""What the refit gains (issue 33 item 3): the pick as measured (trained on train, the carved
``test_shifted`` held out) against the same recipe trained again on train + ``test_shifted``
(``lungxray refit``), both scored on the splits neither trained on: val, the random test and,
with NIH held out, NIH's own images (``test_site_nih``) — per site where a split has two.

The measured models are bench/thresholds.py's (SmallCNN defaults, PneumoniaMNIST + the NIH site,
NIH held out or in training), reused from its work dir:

    python -m bench.thresholds --seeds 42 7 --work /tmp/thr
    python -m bench.refit_gain --seeds 42 7 --work /tmp/thr

The random test and a held-out site cannot show what the carve takes away: the images the refit
adds are unlike both. ``--nested`` measures that on shifted images neither model saw: the run's
own ``test_shifted`` (outer) is set aside as an external set, and the rest of train is prepared
again with a second carve (inner); the measured SmallCNN leaves the inner carve out, the refit
learns from it, and both are scored on the outer one (``external``). NIH held out only, so train
holds one site:

    python -m bench.refit_gain --nested --seeds 42 7 --work /tmp/thr

Writes bench/refit_gain.json and prints a Markdown table."""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
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
        _as_compare(run / "model", compare)
        cli("refit", "--data", str(run / "data"), "--compare", str(compare), "--output",
            str(shipped))
    return _rows(shipped, setup, seed, start)


def nested_run(work: Path, seed: int) -> dict:
    """Outer test_shifted as the external set, a second carve inside train, measured vs refit
    scored on the outer one."""
    run = work / f"nih_held_out-{seed}"
    nested = run / "nested"
    nested.mkdir(exist_ok=True)
    start = time.time()
    data, outer = run / "data", nested / "outer.npz"
    if not outer.is_file():
        arrays = {f"{name}_{kind}": np.load(data / f"{split}_{kind}.npy")
                  for name, split in (("train", "train"), ("val", "val"), ("test", "test_shifted"))
                  for kind in ("images", "labels")}
        grey = {k: v[..., 0] if k.endswith("images") else v.reshape(-1, 1)
                for k, v in arrays.items()}
        np.savez(nested / "inner.npz", **{k: v for k, v in grey.items()
                                          if not k.startswith("test")})
        np.savez(outer, **{k: v for k, v in grey.items() if k.startswith("test")})
    inner, model = nested / "data", nested / "model"
    if not inner.exists():
        cli("preprocess", "--source", str(nested / "inner.npz"), "--output", str(inner),
            "--image-size", "28", "--seed", str(seed))
    if not model.exists():
        cli("train", "--data", str(inner), "--model", "SmallCNN", "--output", str(model),
            "--seed", str(seed))
    shutil.rmtree(run / "as_compare_nested", ignore_errors=True)
    compare = run / "as_compare_nested"
    _as_compare(model, compare)
    shipped = nested / "refit"
    if not (shipped / artifacts.BEST_MODEL_DIR / artifacts.INFO_FILE).is_file():
        cli("refit", "--data", str(inner), "--compare", str(compare), "--output", str(shipped),
            "--external-data", str(outer))
    return _rows(shipped, "nested (outer test_shifted as external)", seed, start)


def _as_compare(model: Path, compare: Path) -> None:
    """A `lungxray compare` output around ``model``, as `lungxray refit` reads one."""
    shutil.copytree(model, compare / artifacts.BEST_MODEL_DIR)
    for name in (artifacts.REPORT_HTML, artifacts.REPORT_MD, artifacts.MODEL_CARD_FILE):
        (compare / name).write_text("<html><body></body></html>" if name.endswith("html")
                                    else "")


def _rows(shipped: Path, setup: str, seed: int, start: float) -> dict:
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
    parser.add_argument("--nested", action="store_true",
                        help="score on the run's test_shifted, with a second carve inside train")
    parser.add_argument("--output", type=Path, default=None,
                        help="default bench/refit_gain.json (--nested: refit_gain_nested.json)")
    args = parser.parse_args(argv)
    args.output = args.output or ROOT / "bench" / (
        "refit_gain_nested.json" if args.nested else "refit_gain.json")
    runs = ([nested_run(args.work, seed) for seed in args.seeds] if args.nested else
            [one_run(args.work, setup, seed) for setup in args.setups for seed in args.seeds])
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
