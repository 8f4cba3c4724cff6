"""KFP component: keras-tuner search for one base model."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Output


def tune(
    dataset: Input[Dataset],
    model_name: str,
    max_trials: int,
    epochs: int,
    weights: str,
    batch_size: int,
    seed: int,
    train_samples: int,
    tuning: Output[Artifact],
    metrics: Output[Metrics],
):
    """Writes best_hparams.json and trials.csv into the ``tuning`` artifact."""
    from pathlib import Path

    from lungxray import tune as tuning_lib

    best = tuning_lib.tune(Path(dataset.path), model_name, Path(tuning.path),
                           max_trials=max_trials, epochs=epochs, weights=weights,
                           batch_size=batch_size, seed=seed, train_samples=train_samples)
    tuning.metadata.update({"model_name": model_name, **best["hparams"]})
    metrics.log_metric("tune_best_val_auc", best["best_score"])
    metrics.log_metric("tune_trials", best["trials"])
    metrics.log_metric("tune_seconds", best["search_seconds"])
