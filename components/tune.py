"""KFP component: keras-tuner search for one base model."""

from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Output


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
    summary: Output[HTML],
    algorithm: str = "hyperband",
    hyperband_factor: int = 3,
    fine_tune_trials: int = 2,
    state_root: str = "",
):
    """Writes best_hparams.json, trials.csv, tuning.png and summary.html into ``tuning``.

    ``state_root`` (a mounted PVC) keeps the tuner state outside the artifact, in a directory
    keyed by the search's inputs, so a retried pod resumes its search; and the feature cache,
    keyed by content, so every run reuses it. Empty: the state stays in ``tuning`` and the
    features in a temporary directory (a pod's disk does not outlive it; no point uploading).
    """
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    import shutil
    import tempfile
    from pathlib import Path

    from lungxray import tune as tuning_lib
    from lungxray.resume import state_key

    if state_root:
        state_dir = Path(state_root) / "tune" / state_key(
            dataset.uri, model_name, max_trials, epochs, weights, batch_size, seed,
            train_samples, algorithm, hyperband_factor, fine_tune_trials)
        feature_cache = Path(state_root) / "features"
    else:
        state_dir, feature_cache = None, Path(tempfile.mkdtemp(prefix="lungxray-features-"))

    try:
        best = tuning_lib.tune(Path(dataset.path), model_name, Path(tuning.path),
                               max_trials=max_trials, epochs=epochs, weights=weights,
                               batch_size=batch_size, seed=seed, train_samples=train_samples,
                               algorithm=algorithm, hyperband_factor=hyperband_factor,
                               fine_tune_trials=fine_tune_trials,
                               state_dir=state_dir, feature_cache=feature_cache)
    finally:
        if not state_root:
            shutil.rmtree(feature_cache, ignore_errors=True)
    tuning.metadata.update({"model_name": model_name, "algorithm": algorithm,
                            **best["hparams"]})
    metrics.log_metric("tune_best_val_auc", best["best_score"])
    metrics.log_metric("tune_trials", best["trials"])
    metrics.log_metric("tune_seconds", best["search_seconds"])
    Path(summary.path).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(Path(tuning.path) / tuning_lib.SUMMARY_FILE, summary.path)
