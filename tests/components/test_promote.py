"""The promote component after the challenge step, two runs in a row: the first promotes (no
champion yet), the second keeps or replaces and says why."""

from __future__ import annotations

import json
from pathlib import Path

from kfp.dsl import Model

from components.promote import promote
from lungxray import champion
from tests.component_helpers import run_challenge
from tests.test_predict import tiny_model_dir


def _run(model_dir: Path, dataset: Path, home: Path, run_id: str, out: Path) -> tuple[str, dict]:
    """One run's challenge step, then its promote step if the verdict says so."""
    verdict, arts = run_challenge(model_dir, dataset, home, run_id, out)
    if verdict == "promote":
        promote(best_model=Model(name="best_model", uri=str(model_dir)), card=arts["card"],
                decision=arts["decision"], champion_uri=str(home))
    return verdict, {"metrics": arts["metrics"].metadata, "card": Path(arts["card"].path)
                     .read_text(), "decision": arts["decision"].metadata}


def test_two_runs_promote_then_decide_with_evidence(small_dataset, tmp_path):
    old = tiny_model_dir(tmp_path / "old", seed=0)
    new = tiny_model_dir(tmp_path / "new", seed=3)
    home = tmp_path / "champion"
    verdict, first = _run(old, small_dataset, home, "run-1", tmp_path / "one")
    assert verdict == "promote" and first["decision"]["reason"] == "no champion yet"
    assert first["metrics"] == {"promoted": 1.0}
    assert champion.current(home)["run_id"] == "run-1"
    kept_card = (home / "history" / "run-1" / champion.CARD_FILE).read_text()
    assert kept_card.startswith("# Model card") and "## Champion vs challenger" in kept_card

    verdict, second = _run(new, small_dataset, home, "run-2", tmp_path / "two")
    metrics = second["metrics"]
    assert {"champion_val_roc_auc", "challenger_val_roc_auc", "val_roc_auc_difference",
            "champion_test_roc_auc", "challenger_test_roc_auc", "promoted"} <= set(metrics)
    decision = json.loads((tmp_path / "two" / "decision" / champion.DECISION_FILE).read_text())
    assert decision["decision"] == verdict and decision["champion_state"]["run_id"] == "run-1"
    assert metrics["val_roc_auc_difference"] == decision["comparison"]["difference"]
    assert second["decision"]["reason"] == decision["reason"]
    assert f"**Decision: {verdict}**" in second["card"]
    assert champion.current(home)["run_id"] == ("run-2" if verdict == "promote" else "run-1")
    assert metrics["promoted"] == float(verdict == "promote")
