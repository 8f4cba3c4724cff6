"""KFP component: the model's recipe trained on K image-statistics folds, each predicting the
fold it left out (``shift_folds``)."""

from kfp.dsl import Artifact, Dataset, Input, Metrics, Model, Output


def crossfold(
    dataset: Input[Dataset],
    model: Input[Model],
    folds: Output[Artifact],
    metrics: Output[Metrics],
    shift_folds: int = 0,
    epochs: int = 6,
):
    """Writes ``folds/shift_folds/`` (the out-of-fold predictions as an evaluated split, which
    evaluate adds to the model's evaluation) or, with ``shift_folds`` 0, only ``folds.json``
    saying none were run. Logs ``shift_folds_roc_auc`` and ``shift_folds_worst_fold_roc_auc``."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import crossfold as crossfolding
    from lungxray import fold_report

    output = Path(folds.path)
    result = crossfolding.crossfold(Path(dataset.path), Path(model.path), shift_folds, output,
                                    epochs=epochs)
    crossfolding.write_record(output, result)
    folds.metadata["shift_folds"] = shift_folds
    for name, value in fold_report.scalar_metrics(result).items():
        metrics.log_metric(name, value)
