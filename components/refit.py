"""KFP component: train the pick again on train + test_shifted and ship that (``refit``)."""

from kfp.dsl import HTML, Dataset, Input, Markdown, Metrics, Model, Output


def refit(
    dataset: Input[Dataset],
    best_model: Input[Model],
    report_in: Input[HTML],
    summary_in: Input[Markdown],
    model_card_in: Input[Markdown],
    model: Output[Model],
    report: Output[HTML],
    summary: Output[Markdown],
    model_card: Output[Markdown],
    metrics: Output[Metrics],
    refit: bool = True,
    epochs: int = 6,
    external_data: str = "",
    class_map: str = "",
):
    """Writes into ``model`` the pick trained again (each ensemble member, its own settings and
    seed, ``epochs`` planned) on train + the carved ``test_shifted``, or a copy of the pick when
    ``refit`` is off or nothing was carved; compare's report, summary and model card with the
    refit section added (the pick and the refit scored on the splits neither trained on, and on
    ``external_data`` relabelled by ``class_map``). Logs ``refit`` (1/0), the images added and
    ``refit_<split>_roc_auc`` / ``measured_<split>_roc_auc``."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import refit as refitting

    # The CLI's `refit` writes the same files from a `lungxray compare` output.
    record = refitting.run(Path(dataset.path), Path(best_model.path),
                           (Path(report_in.path), Path(summary_in.path),
                            Path(model_card_in.path)),
                           Path(model.path),
                           (Path(report.path), Path(summary.path), Path(model_card.path)),
                           enabled=refit, epochs=epochs, external=external_data or None,
                           external_class_map=class_map or None)
    model.metadata.update({k: best_model.metadata[k] for k in ("model_name", "ensemble", "members")
                           if k in best_model.metadata})
    model.metadata["refit"] = bool(record["refit"])
    for name, value in refitting.scalar_metrics(record).items():
        metrics.log_metric(name, value)
