"""Training levers on the shift proxy: train one model per hyperparameter setting on a prepared
dataset that has a ``test_shifted`` split, and record val, test and test_shifted ROC AUC.

Defaults are chosen on val and test_shifted only; test is recorded for the report, never used to
choose. Usage::

    python -m bench.levers_bench --data DIR --model SmallCNN --epochs 8 --out levers.json \\
        'base={}' 'intensity={"intensity_augment": 1.0}' 'standardize={"standardize": true}'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from lungxray import integrity, metrics, models, train


def split_auc(model, data_dir: Path, split: str, manifest: dict) -> float:
    """ROC AUC of the positive class on one split of a prepared dataset."""
    loaded = integrity.load_checked_split(data_dir, split, manifest)
    probs = model.predict(np.asarray(loaded.images, dtype=np.float32), verbose=0,
                          batch_size=256)
    return float(metrics.roc_auc(loaded.labels, probs))


def run(data_dir: Path, model_name: str, epochs: int, hparams: dict, seed: int) -> dict:
    """Train with ``hparams`` and return AUCs per split, time and images/s."""
    manifest = integrity.read_manifest(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        info = train.train(data_dir, model_name, Path(tmp), hparams=hparams, epochs=epochs,
                           seed=seed, patience=3)
        model = models.load_model(Path(tmp) / train.MODEL_FILE)
        aucs = {split: split_auc(model, data_dir, split, manifest)
                for split in manifest["splits"] if split != "train"}
    return {"aucs": aucs, "params": info["params"], "train_seconds": info["train_seconds"],
            "images_per_s": info["train_images_per_s"], "epochs": info["epochs"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--model", default="SmallCNN")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("settings", nargs="+", help="NAME=JSON hyperparameters")
    args = parser.parse_args()
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    for setting in args.settings:
        name, _, text = setting.partition("=")
        for seed in args.seeds:
            key = f"{name}/seed{seed}"
            if key in results:
                continue
            started = time.time()
            results[key] = {"hparams": json.loads(text),
                            **run(args.data, args.model, args.epochs, json.loads(text), seed),
                            "wall_seconds": round(time.time() - started, 1)}
            args.out.write_text(json.dumps(results, indent=2))
            print(key, results[key]["aucs"], flush=True)


if __name__ == "__main__":
    main()
