"""KFP component: compare this run's pick with the champion in use and decide promote or keep."""

from kfp.dsl import Artifact, Dataset, Input, Markdown, Metrics, Model, Output


def challenge(
    dataset: Input[Dataset],
    best_model: Input[Model],
    model_card: Input[Markdown],
    champion_uri: str,
    run_id: str,
    decision: Output[Artifact],
    card: Output[Markdown],
    summary: Output[Markdown],
    metrics: Output[Metrics],
    promotion_margin: float = 0.0,
    seed: int = 42,
) -> str:
    """Paired bootstrap of the AUC difference between the champion at ``champion_uri`` and this
    run's ``best_model`` on this run's images, decided on validation with ``promotion_margin``.
    Writes decision.json, the section as Markdown (champion.md), and the model card with that
    section (model_card.md), into ``decision`` as `lungxray challenge` does, and copies the
    last two to ``summary`` and ``card``. Logs
    champion_* and challenger_* metrics under the same names in every run. Returns the verdict:
    promote, keep, or skip (no ``champion_uri``). A plain ``str`` return (KFP's ``Output``),
    not a NamedTuple: kfp.local resolves a ``dsl.If`` condition only on ``Output`` or
    ``--``-named task outputs."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    import shutil
    from pathlib import Path

    from lungxray import artifacts, champion

    # The CLI's `challenge` writes the same files into its --output.
    record = champion.run_challenge(Path(best_model.path), Path(dataset.path), champion_uri,
                                    run_id, Path(decision.path), margin=promotion_margin,
                                    seed=seed, model_card=Path(model_card.path))
    shutil.copyfile(Path(decision.path) / artifacts.CHALLENGE_SECTION_FILE, summary.path)
    shutil.copyfile(Path(decision.path) / artifacts.MODEL_CARD_FILE, card.path)
    decision.metadata.update({"decision": record["decision"], "reason": record["reason"]})
    for name, value in champion.scalar_metrics(record).items():
        metrics.log_metric(name, value)
    return record["decision"]
