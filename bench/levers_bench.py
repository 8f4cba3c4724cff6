"""Training levers on the shift proxies: train one model per hyperparameter setting on a prepared
dataset that has a ``test_shifted`` split, and record val, test and test_shifted ROC AUC, and the
corruption suite's mean and worst AUC on val (``lungxray.robustness``).

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

from lungxray import artifacts, integrity, metrics, models, robustness, train

ROBUSTNESS_SAMPLES = 200


def predictor(model):
    """Probabilities of a batch of raw images."""
    return lambda images: model.predict(np.asarray(images, dtype=np.float32), verbose=0,
                                        batch_size=256)


def split_scores(model, data_dir: Path, split: str, manifest: dict,
                 threshold: float) -> dict:
    """ROC AUC of the positive class on one split of a prepared dataset, and the accuracy at
    the model's validation threshold."""
    loaded = integrity.load_checked_split(data_dir, split, manifest)
    probs = predictor(model)(loaded.images)
    accuracy = float(np.mean((probs[:, 1] >= threshold) == (loaded.labels == 1)))
    return {"auc": float(metrics.roc_auc(loaded.labels, probs)), "acc": accuracy}


def corrupted_auc(model, data_dir: Path, split: str, manifest: dict) -> dict:
    """Mean and worst AUC of the corruption suite on one split."""
    loaded = integrity.load_checked_split(data_dir, split, manifest)
    summary, _ = robustness.evaluate_robustness(
        predictor(model), loaded.images, loaded.labels, manifest["class_names"],
        samples=ROBUSTNESS_SAMPLES)
    return {"mean": summary["mean_corrupted_auc"], "worst": summary["worst_corrupted_auc"],
            "worst_corruption": summary["worst_corruption"]}


def run(data_dir: Path, model_name: str, epochs: int, hparams: dict, seed: int) -> dict:
    """Train with ``hparams`` and return AUCs per split, time and images/s."""
    manifest = integrity.read_manifest(data_dir)
    with tempfile.TemporaryDirectory() as tmp:
        info = train.train(data_dir, model_name, Path(tmp), hparams=hparams, epochs=epochs,
                           seed=seed, patience=3)
        model = models.load_model(Path(tmp) / artifacts.MODEL_FILE)
        scores = {split: split_scores(model, data_dir, split, manifest, info["threshold"])
                  for split in manifest["splits"] if split != "train"}
        aucs = {split: value["auc"] for split, value in scores.items()}
        accuracy = {split: value["acc"] for split, value in scores.items()}
        corrupted = {"val": corrupted_auc(model, data_dir, "val", manifest)}
    return {"aucs": aucs, "acc_at_threshold": accuracy, "threshold": info["threshold"],
            "corrupted": corrupted, "params": info["params"],
            "train_seconds": info["train_seconds"], "images_per_s": info["train_images_per_s"],
            "epochs": info["epochs"]}


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
            print(key, results[key]["aucs"], results[key]["corrupted"], flush=True)


if __name__ == "__main__":
    main()
