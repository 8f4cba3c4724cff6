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
    folds: Input[Artifact],
    evaluation: Output[Artifact],
    metrics: Output[Metrics],
    test_classification: Output[ClassificationMetrics],
    summary: Output[Markdown],
    report: Output[HTML],
    external_data: str = "",
    class_map: str = "",
    robustness: bool = True,
    robustness_samples: int = 500,
    tta: bool = False,
    deployment_prevalence: float = 0.0,
):
    """Every trial logs the same scalar names (``val_*``, ``test_*``, ``external_*``) so runs
    compare side by side in the Kubeflow UI; a split of several sites (``sites``) adds
    ``<split>_<site>_roc_auc``/``_sensitivity``/``_specificity`` and
    ``<split>_worst_site_auc``, and a held-out site is its own split ``test_site_<name>``. The
    confusion matrix and ROC are those of the test split. ``external_data`` (folder, npz,
    gs://; empty = none) is evaluated as one more split, ``external``, with ``class_map``
    ("SRC=model_class,...") relabelling its classes.
    ``robustness``/``robustness_samples``: AUC under simulated acquisition shifts on that many
    images per split (0 = all); ``tta``: also the AUC of test-time augmentation;
    ``deployment_prevalence`` (0 = none): the Bayes operating point and PPV/NPV there. The
    external set's prevalence is also estimated without its labels (EM on scores calibrated on
    val). ``folds`` (crossfold's output) adds its ``shift_folds`` split, when it has one."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    import json
    import shutil
    from pathlib import Path

    from lungxray import crossfold, evaluation_report
    from lungxray import evaluate as evaluation_lib

    output = Path(evaluation.path)
    options = evaluation_lib.EvalOptions(robustness=robustness,
                                         robustness_samples=robustness_samples, tta=tta,
                                         deployment_prevalence=deployment_prevalence)
    # Every split the prepared dataset holds (val, test and any other, e.g. a shifted proxy).
    results = evaluation_lib.evaluate(Path(model.path), dataset.path, output,
                                      splits=evaluation_lib.dataset_splits(dataset.path),
                                      options=options, external=external_data or None,
                                      external_class_map=class_map or None)
    if crossfold.copy_split(Path(folds.path), output):
        results[crossfold.SPLIT] = json.loads(
            (output / crossfold.SPLIT / evaluation_lib.METRICS_FILE).read_text())
    for name, value in evaluation_report.scalar_metrics(results).items():
        metrics.log_metric(name, value)
    test = results["test"]
    test_classification.log_confusion_matrix(test["class_names"], test["confusion_matrix"])
    roc_file = output / "test" / evaluation_lib.ROC_FILE
    roc = json.loads(roc_file.read_text()) if roc_file.exists() else None
    if roc:
        test_classification.log_roc_curve(roc["fpr"], roc["tpr"], roc["thresholds"])
    evaluation.metadata["model_name"] = test["model_name"]
    evaluation.metadata["splits"] = list(results)
    Path(summary.path).write_text(evaluation_report.describe(results))
    shutil.copyfile(output / evaluation_lib.REPORT_FILE, report.path)  # every split, one page
