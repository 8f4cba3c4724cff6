"""Helpers for the component tests: artifact stand-ins, one evaluate step, one challenge step."""

from __future__ import annotations

from pathlib import Path

from kfp.dsl import HTML, Artifact, ClassificationMetrics, Dataset, Markdown, Metrics, Model


def artifact(cls, tmp_path: Path, name: str):
    """An output artifact of class ``cls`` at ``tmp_path/name``, as KFP hands one to a step."""
    return cls(name=name, uri=str(tmp_path / name))


def no_folds(tmp_path: Path, tag: str) -> Artifact:
    """crossfold's output when shift_folds is 0: only folds.json saying so."""
    from lungxray import crossfold

    folds = artifact(Artifact, tmp_path, f"{tag}_folds")
    crossfold.write_record(Path(folds.path), None)
    return folds


def run_evaluate(model: Model, dataset: Dataset, tmp_path: Path, tag: str,
                 folds: Artifact | None = None, **params) -> dict:
    """The evaluate component on ``model`` (with crossfold's ``folds``, none by default);
    returns its output artifacts by parameter name."""
    from components.evaluate import evaluate

    outputs = {
        "evaluation": artifact(Artifact, tmp_path, f"{tag}_evaluation"),
        "metrics": artifact(Metrics, tmp_path, f"{tag}_metrics"),
        "test_classification": artifact(ClassificationMetrics, tmp_path, f"{tag}_cls"),
        "summary": artifact(Markdown, tmp_path, f"{tag}_md"),
        "report": artifact(HTML, tmp_path, f"{tag}_html"),
    }
    evaluate(dataset=dataset, model=model, folds=folds or no_folds(tmp_path, tag), **outputs,
             **params)
    return outputs


def run_challenge(model_dir: Path, dataset: Path, home: Path | str, run_id: str,
                  out: Path) -> tuple[str, dict]:
    """One run's challenge step with compare's card; returns the verdict and the outputs."""
    from components.challenge import challenge

    out.mkdir(parents=True)
    card_in = out / "compare_card.md"
    card_in.write_text("# Model card\n\nfrom compare\n")
    arts = {name: cls(name=name, uri=str(out / name)) for name, cls in (
        ("decision", Artifact), ("card", Markdown), ("summary", Markdown),
        ("metrics", Metrics))}
    verdict = challenge(dataset=Dataset(name="dataset", uri=str(dataset)),
                        best_model=Model(name="best_model", uri=str(model_dir)),
                        model_card=Markdown(name="model_card", uri=str(card_in)),
                        champion_uri=str(home), run_id=run_id, promotion_margin=0.0, seed=0,
                        **arts)
    return verdict, arts
