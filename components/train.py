"""KFP component: train one base model with the tuned hyperparameters."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def train(
    dataset: Input[Dataset],
    tuning: Input[Artifact],
    model_name: str,
    epochs: int,
    weights: str,
    batch_size: int,
    seed: int,
    model: Output[Model],
    metrics: Output[Metrics],
):
    """Writes model.keras, model_info.json, history.json and curves.png into ``model``."""
    from pathlib import Path

    from lungxray import train as training
    from lungxray import tune

    hparams = tune.read_best_hparams(Path(tuning.path) / tune.BEST_FILE)
    info = training.train(Path(dataset.path), model_name, Path(model.path), hparams,
                          epochs=epochs, weights=weights, batch_size=batch_size, seed=seed)
    model.metadata.update({k: info[k] for k in ("model_name", "threshold", "params", "weights")})
    model.metadata["framework"] = "keras"
    for key in ("train_seconds", "params", "epochs"):
        metrics.log_metric(key, info[key])
