"""KFP component: apply a trained model or best_model/ to a source of unlabeled images.

Not part of the training pipeline; a batch-scoring pipeline (or a run of its own) calls it."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output


def predict(
    model: Input[Model],
    source: str,
    predictions: Output[Artifact],
    metrics: Output[Metrics],
    batch_size: int = 64,
    skip_bad: bool = False,
    gradcam: bool = False,
):
    """Writes predictions.csv (path, prob_<class>..., predicted_index, predicted_class at the
    model's saved threshold) into ``predictions``; with ``skip_bad`` unreadable files go to
    bad_files.csv instead of failing the step, with ``gradcam`` overlays go to gradcam/.
    ``source``: an image folder, a CSV with a 'path' column, an .npz, or a gs:// URI of any."""
    from pathlib import Path

    from lungxray import predict as prediction

    result = prediction.predict(Path(model.path), source, Path(predictions.path),
                                batch_size=batch_size, skip_bad=skip_bad, explain=gradcam)
    predictions.metadata.update({"model_name": result["model_name"], "source": source,
                                 "n": result["n"], "n_bad": result["n_bad"],
                                 "threshold": result["threshold"]})
    metrics.log_metric("n_predicted", result["n"])
    metrics.log_metric("n_unreadable", result["n_bad"])
    for name, count in result["counts"].items():
        metrics.log_metric(f"n_{name}", count)
