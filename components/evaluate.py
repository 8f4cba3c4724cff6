"""KFP component: evaluate one trained model on the validation and test splits."""

from kfp.dsl import Artifact, ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output


def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    test_classification: Output[ClassificationMetrics],
    summary: Output[Markdown],
):
    """Every trial logs the same scalar names (``val_*``, ``test_*``) so runs compare side by
    side in the Kubeflow UI; the confusion matrix and ROC are those of the test split."""
    import json
    from pathlib import Path

    from lungxray import evaluate as evaluation_lib

    results = evaluation_lib.evaluate(Path(model.path), dataset.path, Path(evaluation.path),
                                      splits=["val", "test"])
    for name, value in evaluation_lib.scalar_metrics(results).items():
        metrics.log_metric(name, value)
    test = results["test"]
    test_classification.log_confusion_matrix(test["class_names"], test["confusion_matrix"])
    roc_file = Path(evaluation.path) / "test" / evaluation_lib.ROC_FILE
    roc = json.loads(roc_file.read_text()) if roc_file.exists() else None
    if roc:
        test_classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    evaluation.metadata["model_name"] = test["model_name"]
    Path(summary.path).write_text(evaluation_lib.describe(results))
