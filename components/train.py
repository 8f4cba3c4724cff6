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
    target_sensitivity: float = 0.0,
    threshold_rule: str = "youden",
    state_root: str = "",
):
    """Writes model.keras, model_info.json, history.json and curves.png into ``model``.
    ``target_sensitivity`` 0 picks the threshold by ``threshold_rule``; ``state_root`` (a
    mounted PVC) keeps checkpoints across retries, so a preempted run resumes."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import resume, tune
    from lungxray import train as training
    from lungxray.hparams import read_best_hparams

    hparams = read_best_hparams(Path(tuning.path) / tune.BEST_FILE, model_name)
    state_dir = (Path(state_root) / "train" / resume.state_key(dataset.uri, model_name, hparams,
                                                               epochs, weights, batch_size, seed)
                 if state_root else None)
    info = training.train(Path(dataset.path), model_name, Path(model.path), hparams,
                          epochs=epochs, weights=weights, batch_size=batch_size, seed=seed,
                          target_sensitivity=target_sensitivity or None,
                          threshold_rule=threshold_rule, state_dir=state_dir)
    model.metadata.update({k: info[k] for k in ("model_name", "threshold", "params", "weights")})
    model.metadata["framework"] = "keras"
    for key in ("train_seconds", "params", "epochs"):
        metrics.log_metric(key, info[key])
