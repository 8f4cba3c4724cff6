"""KFP component: make this run's pick the champion (run only when the decision is promote)."""

from kfp.dsl import Artifact, Input, Markdown, Model


def promote(
    best_model: Input[Model],
    card: Input[Markdown],
    decision: Input[Artifact],
    champion_uri: str,
) -> str:
    """Copies the model, its model card and decision.json to ``champion_uri/history/<run id>/``
    and makes it the champion: locally by renames, on gs:// by a generation-conditioned swap
    of champion.json. Refuses if the champion changed since the decision. Returns the entry."""
    from pathlib import Path

    from lungxray import champion, safeio

    record = safeio.load_json_object(Path(decision.path) / champion.DECISION_FILE, "decision")
    return champion.promote(Path(best_model.path), champion_uri, record,
                            model_card=Path(card.path))
