"""KFP component: make this run's pick the champion (run only when the decision is promote)."""

from kfp.dsl import Artifact, Input, Markdown, Model


def promote(
    best_model: Input[Model],
    card: Input[Markdown],
    decision: Input[Artifact],
    champion_uri: str,
) -> str:
    """Copies the model, its model card and decision.json to ``champion_uri/history/<run id>/``
    and makes it the champion by one swap of champion.json (on gs:// conditioned on its
    generation). Verifies first that the decision's own numbers say promote and that it was
    made for this model, this champion and its classes; refuses if the champion changed since.
    A promotion that was stopped or killed is finished or undone by the next one. Returns the
    history entry."""
    from lungxray.quiet import quiet_native_logs

    quiet_native_logs()  # TensorFlow's native start-up lines are not this step's log
    from pathlib import Path

    from lungxray import champion, promotion, safeio
    from lungxray.errors import ConfigError

    record = safeio.load_json_object(Path(decision.path) / champion.DECISION_FILE, "decision",
                                     error=ConfigError)
    return promotion.promote(Path(best_model.path), champion_uri, record,
                             model_card=Path(card.path))
