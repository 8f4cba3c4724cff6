"""The challenge component: the same files as `lungxray challenge`, plus compare's card with
the section; without a champion location nothing is compared."""

from __future__ import annotations

import json
from pathlib import Path

from lungxray import artifacts, champion, cli
from tests.champion_helpers import fake_model
from tests.component_helpers import run_challenge


def test_the_component_writes_what_the_cli_writes(small_dataset, tmp_path, capsys):
    model = fake_model(tmp_path / "model")
    verdict, arts = run_challenge(model, small_dataset, tmp_path / "home", "r1", tmp_path / "kfp")
    assert cli.main(["challenge", "--model", str(model), "--data", str(small_dataset),
                     "--champion", str(tmp_path / "home2"), "--run-id", "r1", "--output",
                     str(tmp_path / "cli"), "--seed", "0",
                     "--model-card", str(tmp_path / "kfp" / "compare_card.md")]) == 0
    assert json.loads(capsys.readouterr().out)["decision"] == verdict == "promote"
    decision = Path(arts["decision"].path)
    assert sorted(p.name for p in decision.iterdir()) == sorted(
        [champion.DECISION_FILE, artifacts.CHALLENGE_SECTION_FILE, artifacts.MODEL_CARD_FILE])
    for name in (champion.DECISION_FILE, artifacts.CHALLENGE_SECTION_FILE):
        assert (tmp_path / "cli" / name).is_file()
    section = (decision / artifacts.CHALLENGE_SECTION_FILE).read_text()
    assert section == (tmp_path / "cli" / artifacts.CHALLENGE_SECTION_FILE).read_text()
    assert "**Decision: promote** — no champion yet." in section
    ours, theirs = (json.loads((d / champion.DECISION_FILE).read_text())
                    for d in (decision, tmp_path / "cli"))
    same = {"decision", "reason", "run_id", "margin", "challenger", "comparison", "evidence"}
    assert {k: ours[k] for k in same} == {k: theirs[k] for k in same}
    # The summary is the section; the card is compare's card with the section appended.
    assert Path(arts["summary"].path).read_text() == section
    card = Path(arts["card"].path).read_text()
    assert card == (decision / artifacts.MODEL_CARD_FILE).read_text()
    assert card == (tmp_path / "cli" / artifacts.MODEL_CARD_FILE).read_text()
    assert card == "# Model card\n\nfrom compare\n\n" + section
    assert arts["decision"].metadata == {"decision": "promote", "reason": "no champion yet"}
    assert arts["metrics"].metadata == {"promoted": 1.0}


def test_without_a_champion_uri_nothing_is_compared(small_dataset, tmp_path):
    model = fake_model(tmp_path / "m")
    verdict, arts = run_challenge(model, small_dataset, "", "run-1", tmp_path / "one")
    assert verdict == "skip" and arts["metrics"].metadata == {"promoted": 0.0}
    assert "no champion_uri given" in Path(arts["card"].path).read_text()
