"""Frozen-phase search: cached backbone features vs a naive keras-tuner loop over the full model.

Both sides run keras-tuner's RandomSearch with the same seed over the same head space (so they
try the same hyperparameter values in the same order), the same number of trials and epochs,
the same batches and the same initial head weights. They differ only in where the pooled
features come from: computed once and cached (``lungxray.tune.HeadHyperModel``), or recomputed
by the frozen backbone in every epoch of every trial (``lungxray.tune.FullHyperModel``).

``python -m bench.tuning_bench --source <npz> --model VGG16 --image-size 64 ...`` prepares the
data, saves a weights file from a ``weights=None`` backbone (a stand-in for ImageNet weights:
no download needed, same cost) and prints the result as JSON and Markdown.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

from lungxray import data, features, models, prepare, tune
from lungxray.batches import class_weights, make_dataset


def _side(tuner) -> dict:
    times = tune.trial_times(tuner)
    trials = sorted(tuner.oracle.trials.values(), key=lambda t: t.trial_id)
    seconds = [times[t.trial_id]["seconds"] for t in trials if "seconds" in times[t.trial_id]]
    best = tune.best_trial(tuner)
    return {
        "trial_seconds": seconds,
        "mean_trial_seconds": round(statistics.mean(seconds), 3),
        "total_seconds": round(sum(seconds), 2),
        "best_val_auc": round(float(best.score), 4),
        "best_trial": best.trial_id,
        "scores": [round(float(t.score), 4) if t.score is not None else None for t in trials],
        "hparams": [tune.hparam_values(t) for t in trials],
    }


def bench_tuning(data_dir: Path, model_name: str, weights_file: Path, trials: int, epochs: int,
                 workdir: Path, algorithm: str = "random", batch_size: int = 32,
                 seed: int = 42) -> dict:
    """Run both searches from scratch in ``workdir`` (emptied first) and return per-trial
    costs, the speed-up and both best validation AUCs."""
    workdir = Path(workdir)
    if workdir.exists():
        shutil.rmtree(workdir)
    workdir.mkdir(parents=True)
    manifest = data.read_manifest(data_dir)
    num_classes = len(manifest["class_names"])
    size, channels = manifest["image_size"], manifest["channels"]
    train_split, val_split = data.load_split(data_dir, "train"), data.load_split(data_dir, "val")
    digests = {name: manifest["splits"][name]["sha256"] for name in ("train", "val")}
    weights = str(weights_file)
    by_class = class_weights(train_split.labels, num_classes)
    budget = tune.Budget(algorithm, trials, epochs, 3, seed)
    splits = {"train": (train_split, digests["train"]), "val": (val_split, digests["val"])}

    started = time.perf_counter()
    cached = features.cached_features(model_name, size, channels, weights, splits,
                                      workdir / "features")
    extraction = time.perf_counter() - started
    started = time.perf_counter()
    again = features.cached_features(model_name, size, channels, weights, splits,
                                     workdir / "features")
    reuse = time.perf_counter() - started

    head = tune.run_phase(
        tune.HeadHyperModel(cached["train"].features.shape[1], num_classes, by_class, seed),
        features.feature_dataset(cached["train"].features, train_split.labels, num_classes,
                                 batch_size, shuffle=True, seed=seed),
        features.feature_dataset(cached["val"].features, val_split.labels, num_classes,
                                 batch_size),
        val_split.labels, budget, workdir / "tuner", "cached", verbose=0)
    naive = tune.run_phase(
        tune.FullHyperModel(model_name, size, channels, num_classes, weights, by_class, seed),
        make_dataset(train_split, num_classes, batch_size, shuffle=True, seed=seed),
        make_dataset(val_split, num_classes, batch_size),
        val_split.labels, budget, workdir / "tuner", "naive", verbose=0)
    cached_side, naive_side = _side(head), _side(naive)
    diff = abs(cached_side["best_val_auc"] - naive_side["best_val_auc"])
    return {
        "model_name": model_name, "image_size": size, "channels": channels,
        "n_train": len(train_split), "n_val": len(val_split), "feature_dim":
        int(cached["train"].features.shape[1]), "algorithm": algorithm, "trials": trials,
        "epochs": epochs, "batch_size": batch_size,
        "extraction_seconds": round(extraction, 2),
        "cache_reuse_seconds": round(reuse, 3),
        "cache_reused": not any(f.computed for f in again.values()),
        "cached": cached_side, "naive": naive_side,
        "speedup_per_trial": round(naive_side["mean_trial_seconds"]
                                   / cached_side["mean_trial_seconds"], 1),
        # The honest whole-search figure: the one-off extraction counts against the cache.
        "speedup_including_extraction": round(
            naive_side["total_seconds"] / (cached_side["total_seconds"] + extraction), 1),
        "same_trials": cached_side["hparams"] == naive_side["hparams"],
        "best_val_auc_diff": round(diff, 4),
        "best_val_auc_within_0_01": diff <= 0.01,
    }


def markdown(result: dict) -> str:
    """A short table of a :func:`bench_tuning` result."""
    c, n = result["cached"], result["naive"]
    return "\n".join([
        f"{result['model_name']} at {result['image_size']} px, {result['n_train']} train / "
        f"{result['n_val']} val images, {result['algorithm']} search, {result['trials']} trials "
        f"x {result['epochs']} epochs, batch {result['batch_size']}.",
        "",
        "| frozen-phase search | mean s / trial | total s (trials) | best val_auc |",
        "|---|---:|---:|---:|",
        f"| naive (full model, frozen backbone) | {n['mean_trial_seconds']:.2f} | "
        f"{n['total_seconds']:.1f} | {n['best_val_auc']:.4f} |",
        f"| cached features | {c['mean_trial_seconds']:.3f} | {c['total_seconds']:.1f} | "
        f"{c['best_val_auc']:.4f} |",
        "",
        f"- per-trial speed-up: **{result['speedup_per_trial']}x**",
        f"- one-off feature extraction: {result['extraction_seconds']} s; whole search including "
        f"it: {result['speedup_including_extraction']}x faster",
        f"- second use of the cache: {result['cache_reuse_seconds']} s, nothing recomputed: "
        f"{result['cache_reused']}",
        f"- same trials on both sides: {result['same_trials']}; best val_auc differs by "
        f"{result['best_val_auc_diff']} (within 0.01: {result['best_val_auc_within_0_01']})",
    ])


def save_random_weights(model_name: str, image_size: int, path: Path) -> Path:
    """A weights file from a ``weights=None`` backbone at the classifier's input size: loads
    like an ImageNet file, costs the same, needs no download."""
    spec = models.get_spec(model_name)
    backbone = models.build_backbone(spec, spec.input_size(image_size), None)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backbone.save_weights(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="npz / folder for lungxray preprocess")
    parser.add_argument("--model", default="VGG16")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--max-per-split", type=int, default=2000)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("build/tuning_bench"))
    args = parser.parse_args(argv)
    data_dir = args.workdir / "data"
    if not data.is_prepared(data_dir):
        prepare.preprocess(args.source, data_dir, image_size=args.image_size,
                           max_per_split=args.max_per_split)
    weights = save_random_weights(args.model, args.image_size,
                                  args.workdir / f"{args.model}.weights.h5")
    result = bench_tuning(data_dir, args.model, weights, args.trials, args.epochs,
                          args.workdir / "run")
    print(json.dumps(result, indent=2))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
