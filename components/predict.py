"""KFP component: apply a trained model or best_model/ to a source of unlabeled images.

The training pipeline runs it on the pick with ``target_data`` (the target site's images, for
their prevalence); a batch-scoring run calls it on its own."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output


def predict(
    model: Input[Model],
    source: str,
    predictions: Output[Artifact],
    metrics: Output[Metrics],
    batch_size: int = 64,
    skip_bad: bool = False,
    gradcam: bool = False,
    site: str = "",
):
    """Writes predictions.csv (path, prob_<class>..., predicted_index, predicted_class at the
    model's saved threshold) into ``predictions``; with ``skip_bad`` unreadable files go to
    bad_files.csv instead of failing the step, with ``gradcam`` overlays go to gradcam/. A
    two-class model with its validation calibration also writes prevalence.json (EM estimate of
    these images' prevalence, logged as ``prevalence_em`` with its 95% interval).
    ``source``: an image folder, a CSV with a 'path' column, an .npz, or a gs:// URI of any;
    empty: nothing to predict (the pipeline's default ``target_data``), the step only says so.
    ``site``: decide at that training site's own validation threshold (the model's
    ``site_thresholds``) instead of the pooled one; empty: the pooled one."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import predict as prediction

    if not source:
        predictions.metadata["skipped"] = "no source given"
        metrics.log_metric("n_predicted", 0)
        return

    result = prediction.predict(Path(model.path), source, Path(predictions.path),
                                batch_size=batch_size, skip_bad=skip_bad, explain=gradcam,
                                site=site or None)
    predictions.metadata.update({"model_name": result["model_name"], "source": source,
                                 "n": result["n"], "n_bad": result["n_bad"],
                                 "threshold": result["threshold"], "site": result["site"]})
    metrics.log_metric("n_predicted", result["n"])
    metrics.log_metric("n_unreadable", result["n_bad"])
    for name, count in result["counts"].items():
        metrics.log_metric(f"n_{name}", count)
    estimate = result["prevalence"]
    if estimate is None:
        predictions.metadata["prevalence"] = ("not estimated: needs a two-class model saved "
                                              "with a validation calibration")
    else:  # EM on these images
        metrics.log_metric("prevalence_em", estimate["estimate"])
        if estimate["ci"]:
            metrics.log_metric("prevalence_em_ci_low", estimate["ci"][0])
            metrics.log_metric("prevalence_em_ci_high", estimate["ci"][1])
        metrics.log_metric("bayes_threshold_at_estimate",
                           estimate["bayes_threshold_at_estimate"])
