"""KFP component: evaluate one trained model on the validation and test splits (and, optionally,
on an external dataset)."""

from kfp.dsl import (
    HTML,
    Artifact,
    ClassificationMetrics,
    Dataset,
    Input,
    Markdown,
    Metrics,
    Model,
    Output,
)


def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    test_classification: Output[ClassificationMetrics],
    summary: Output[Markdown],
    report: Output[HTML],
    external_data: str = "",
    class_map: str = "",
):
    """Every trial logs the same scalar names (``val_*``, ``test_*``, ``external_*``) so runs
    compare side by side in the Kubeflow UI; the confusion matrix and ROC are those of the test
    split. ``external_data`` (folder, npz, gs://; empty = none) is evaluated as one more split,
    ``external``, with ``class_map`` ("SRC=model_class,...") relabelling its classes."""
    import json
    import shutil
    from pathlib import Path

    from lungxray import evaluate as evaluation_lib

    output = Path(evaluation.path)
    results = evaluation_lib.evaluate(Path(model.path), dataset.path, output,
                                      splits=["val", "test"])
    if external_data:
        results.update(evaluation_lib.evaluate_external(Path(model.path), external_data, output,
                                                        class_map=class_map or None))
    for name, value in evaluation_lib.scalar_metrics(results).items():
        metrics.log_metric(name, value)
    test = results["test"]
    test_classification.log_confusion_matrix(test["class_names"], test["confusion_matrix"])
    roc_file = output / "test" / evaluation_lib.ROC_FILE
    roc = json.loads(roc_file.read_text()) if roc_file.exists() else None
    if roc:
        test_classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    evaluation.metadata["model_name"] = test["model_name"]
    evaluation.metadata["splits"] = list(results)
    Path(summary.path).write_text(evaluation_lib.describe(results))
    # One page for every split evaluated, external included.
    shutil.copyfile(evaluation_lib.write_report(results, output), report.path)
