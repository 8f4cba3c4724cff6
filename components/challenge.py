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
    Writes decision.json, the section as Markdown, and the model card with that section. Logs
    champion_* and challenger_* metrics under the same names in every run. Returns the verdict:
    promote, keep, or skip (no ``champion_uri``). A plain ``str`` return (KFP's ``Output``),
    not a NamedTuple: kfp.local resolves a ``dsl.If`` condition only on ``Output`` or
    ``--``-named task outputs."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import champion, staging

    with staging.stop_on_signals():  # SIGTERM: a fetch's temporary files are removed
        record = champion.challenge(Path(best_model.path), Path(dataset.path), champion_uri,
                                    run_id, margin=promotion_margin, seed=seed)
    Path(decision.path).mkdir(parents=True, exist_ok=True)
    champion.write_decision(record, Path(decision.path))
    section = champion.markdown(record)
    Path(summary.path).write_text(section)
    Path(card.path).write_text(Path(model_card.path).read_text().rstrip() + "\n\n" + section)
    decision.metadata.update({"decision": record["decision"], "reason": record["reason"]})
    rows = {champion.DECISION_SPLIT: record["comparison"], **record["evidence"]}
    for split, compared in rows.items():
        if compared:
            metrics.log_metric(f"champion_{split}_roc_auc", compared["champion"])
            metrics.log_metric(f"challenger_{split}_roc_auc", compared["challenger"])
            metrics.log_metric(f"{split}_roc_auc_difference", compared["difference"])
    metrics.log_metric("promoted", float(record["decision"] == "promote"))
    return record["decision"]
