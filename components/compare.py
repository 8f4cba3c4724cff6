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
    best_model: Output[Model],
    metrics: Output[Metrics],
):
    """Writes the self-contained report.html, the Markdown table and a copy of the best model."""
    import shutil
    import tempfile
    from pathlib import Path

    from lungxray import report as reporting

    with tempfile.TemporaryDirectory() as workdir:
        trials = reporting.pair_trials([Path(m.path) for m in models],
                                       [Path(e.path) for e in evaluations],
                                       [Path(t.path) for t in tunings], Path(workdir) / "trials")
        output = Path(workdir) / "compare"
        result = reporting.compare(trials, output, select_metric=select_metric)
        shutil.copyfile(output / "report.html", report.path)
        shutil.copyfile(output / "results.md", summary.path)
        shutil.copytree(output / "best_model", best_model.path)
    best_model.metadata.update({"model_name": result["best_model"],
                                select_metric: result["select_value"]})
    metrics.log_metric(f"best_{select_metric}", result["select_value"])
