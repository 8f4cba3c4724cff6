"""KFP component: compare every trial and pick the best model on a validation metric."""

from typing import List

from kfp.dsl import HTML, Artifact, Input, Markdown, Metrics, Model, Output


def compare(
    models: Input[List[Model]],
    evaluations: Input[List[Artifact]],
    tunings: Input[List[Artifact]],
    select_metric: str,
    report: Output[HTML],
    summary: Output[Markdown],
    model_card: Output[Markdown],
    best_model: Output[Model],
    metrics: Output[Metrics],
    ensemble_k: int = 2,
    target_sensitivity: float = 0.0,
    threshold_rule: str = "youden",
):
    """Writes the self-contained report.html, report.md, the model card and a copy of the best
    model (an ensemble of the top ``ensemble_k`` competes too; 0 or 1 = none).
    ``target_sensitivity`` (0 = as the members did, else ``threshold_rule``) sets how the
    ensemble's threshold is chosen on validation."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    import shutil
    import tempfile
    from pathlib import Path

    from lungxray import artifacts, safeio, selection
    from lungxray import report as reporting

    with tempfile.TemporaryDirectory() as workdir:
        trials = selection.pair_trials([Path(m.path) for m in models],
                                       [Path(e.path) for e in evaluations],
                                       [Path(t.path) for t in tunings],
                                       Path(workdir) / "trials")
        output = Path(workdir) / "compare"
        result = reporting.compare(trials, output, select_metric=select_metric,
                                   ensemble_k=ensemble_k,
                                   target_sensitivity=target_sensitivity or None,
                                   threshold_rule=threshold_rule)
        shutil.copyfile(output / artifacts.REPORT_HTML, report.path)
        shutil.copyfile(output / artifacts.REPORT_MD, summary.path)
        shutil.copyfile(output / artifacts.MODEL_CARD_FILE, model_card.path)
        safeio.copy_model_folder(output / artifacts.BEST_MODEL_DIR, Path(best_model.path))
    best_model.metadata.update({"model_name": result["best_model"],
                                select_metric: result["select_value"],
                                "ensemble": result["best_is_ensemble"]})
    if result["best_is_ensemble"]:
        best_model.metadata["members"] = result["ensemble"]["members"]
    metrics.log_metric(f"best_{select_metric}", result["select_value"])
    metrics.log_metric("n_models", result["n_models"])
