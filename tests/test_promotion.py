"""Promotion (issue 34): verified before it acts, crash-safe at every instant, older champion
folders read and repaired. Promotion never loads a Keras model, so stand-in model folders
(tests/champion_helpers.py) keep these tests fast."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from lungxray import champion, champion_store, promotion
from lungxray.errors import ConfigError, LungxrayError
from tests.champion_helpers import (
    WIN,
    Killed,
    decision,
    fake_model,
    killed_at,
    tree,
    winning,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def models(tmp_path) -> dict[str, Path]:
    return {name: fake_model(tmp_path / "models" / name, seed=i)
            for i, name in enumerate(("r1", "r2", "r3"))}


@pytest.fixture()
def home(tmp_path, models) -> Path:
    """A champion folder whose champion is run r1."""
    home = tmp_path / "champion"
    promotion.promote(models["r1"], home, decision(models["r1"], home, "r1"))
    return home


def _whole(home: Path, models: dict[str, Path]) -> str:
    """The champion's run id, after checking that what the pointer names is complete and is
    that run's model, byte for byte."""
    run_id = champion.current(home)["run_id"]
    model = champion.read_champion(home)
    assert model == home / "history" / run_id / "model"
    assert champion_store.model_sha256(model) == champion_store.model_sha256(models[run_id])
    entry = json.loads((home / "history" / run_id / "decision.json").read_text())
    assert entry["run_id"] == run_id
    return run_id


def _no_leftovers(home: Path) -> None:
    assert sorted(p.name for p in home.iterdir()) == ["champion.json", "history"]


# --------------------------------------------------------------------------- verification


def _edited_numbers(record: dict) -> dict:
    """The verdict edited to promote while the numbers say keep (CI lower end below 0)."""
    keep = {**WIN, "challenger": 0.79, "difference": 0.79 - 0.8, "ci": [-0.06, 0.04]}
    return {**record, "comparison": keep, "decision": "promote"}


def _other_classes(tmp_path: Path, home: Path) -> tuple[Path, dict]:
    """A model of other classes with a decision written for it, numbers saying promote."""
    other = fake_model(tmp_path / "other", seed=9, classes=["cat", "dog"])
    return other, winning(decision(other, home, "r9"))


@pytest.mark.parametrize("case, message", [
    ("numbers say keep", "its own numbers say 'keep'"),
    ("margin raised", "its own numbers say 'keep'"),
    ("difference edited", "difference is not challenger - champion"),
    ("CI reversed", "CI is not an ordered pair"),
    ("other model files", "are not the model run r2 was decided on"),
    ("model changed after the decision", "are not the model run r2 was decided on"),
    ("class names edited", "class_names .* differs from the decision's"),
    ("another champion folder", "was decided for the champion at"),
    ("no hash recorded", "does not record the champion it was compared with and a hash"),
    ("no champion recorded", "does not record the champion it was compared with"),
    ("champion compared but no comparison", "holds no comparison"),
    ("other class names", "class_names .* differs"),
    ("not a JSON object", "must be a JSON object"),
])
def test_promote_verifies_the_decision_before_it_acts(home, models, tmp_path, case, message):
    model = models["r2"]
    record = winning(decision(model, home, "r2"))
    if case == "numbers say keep":
        record = _edited_numbers(record)
    elif case == "margin raised":
        record = {**record, "margin": 0.5}
    elif case == "difference edited":
        record = {**record, "comparison": {**WIN, "difference": 0.3}}
    elif case == "CI reversed":
        record = {**record, "comparison": {**WIN, "ci": [0.3, 0.1]}}
    elif case == "other model files":
        model = models["r3"]
    elif case == "model changed after the decision":
        model = tmp_path / "changed"
        shutil.copytree(models["r2"], model)
        (model / "model.keras").unlink()
        fake_model(tmp_path / "retrained", seed=99)  # a valid archive, other weights
        shutil.copy(tmp_path / "retrained" / "model.keras", model / "model.keras")
    elif case == "class names edited":
        record = {**record, "challenger": {**record["challenger"], "class_names": ["a", "b"]}}
    elif case == "another champion folder":
        record = {**record, "champion_uri": str(tmp_path / "elsewhere")}
    elif case == "no hash recorded":
        record = {**record, "challenger": {**record["challenger"], "sha256": None}}
    elif case == "no champion recorded":
        record = {k: v for k, v in record.items() if k != "champion_state"}
    elif case == "champion compared but no comparison":
        record = {**record, "comparison": None}
    elif case == "other class names":
        model, record = _other_classes(tmp_path, home)
    elif case == "not a JSON object":
        record = ["promote"]
    before = tree(home)
    with pytest.raises(LungxrayError, match=message) as err:
        promotion.promote(model, home, record)
    assert "\n" not in str(err.value)
    assert tree(home) == before  # nothing changed
    # ... and a normal/pneumonia challenger is still welcome afterwards
    promotion.promote(models["r2"], home, winning(decision(models["r2"], home, "r2")))
    assert _whole(home, models) == "r2"


def test_the_cli_refuses_an_edited_decision_in_one_line(home, models, tmp_path):
    path = tmp_path / "decision.json"
    path.write_text(json.dumps(_edited_numbers(winning(decision(models["r2"], home, "r2")))))
    before = tree(home)
    result = subprocess.run(
        [sys.executable, "-m", "lungxray.cli", "promote", "--model", str(models["r2"]),
         "--decision", str(path), "--champion", str(home)],
        capture_output=True, text=True, timeout=120, env={**os.environ, **_env()})
    assert result.returncode == 2
    assert result.stderr.startswith("lungxray promote: error: decision of run r2 says "
                                    "'promote', but its own numbers say 'keep'")
    assert result.stderr.count("\n") == 1
    assert tree(home) == before


def _env() -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)]),
            "TF_CPP_MIN_LOG_LEVEL": "2"}


# --------------------------------------------------------------------------- kills


def _legacy(home: Path, models: dict[str, Path], orphan: str = "r3") -> None:
    """The layout promote wrote before #34: copies of the current champion beside the pointer,
    and what a promotion killed mid-swap left: an entry the pointer never named, the retired
    files in an unlocked staging folder, a current model/ already moved out."""
    shutil.copytree(home / "history" / "r1" / "model", home / "model")
    shutil.copy(home / "history" / "r1" / "decision.json", home / "decision.json")
    (home / "model_card.md").write_text("# r1\n")
    stale = home / ".promote-r3-abc123" / "retired"
    shutil.copytree(home / "model", stale / "model")
    entry = home / "history" / orphan  # complete, but the old code died before champion.json
    entry.mkdir()
    shutil.copytree(models["r3"], entry / "model")
    (entry / "decision.json").write_text(json.dumps(decision(models["r3"], home, orphan)))


@pytest.mark.parametrize("layout", ["empty", "current", "legacy"])
def test_a_kill_at_any_change_leaves_a_whole_champion_and_the_next_run_finishes(
        tmp_path, models, monkeypatch, layout):
    """Killed at the k-th file-system change of a promotion, for every k: the champion is the
    old one or the new one, challenge reads it, and the next promotion finishes the job."""
    template = tmp_path / "template"
    old, new, later = ("", "r1", "r2") if layout == "empty" else ("r1", "r2", "r3")
    if old:
        promotion.promote(models[old], template, decision(models[old], template, old))
    if layout == "legacy":
        _legacy(template, models, orphan="r9")
    changes, k = None, 0
    while changes is None or k < changes:
        k += 1
        home = tmp_path / f"home-{k}"
        if template.exists():
            shutil.copytree(template, home, symlinks=True)
        record = winning(decision(models[new], home, new)) if old else decision(
            models[new], home, new)
        with killed_at(k, monkeypatch) as calls:
            try:
                promotion.promote(models[new], home, record)
            except Killed:
                pass
            else:
                changes = len(calls)  # k passed the last change: every instant was tried
        # The champion is whole, and challenge would read it (old or new, never a mix).
        if champion.current(home)["run_id"] is None:
            assert champion.read_champion(home) is None and not old
        else:
            assert _whole(home, models) in (old, new)
        assert champion_store.check_uri(str(home)) == str(home)
        # The next promotion finishes the job, or says it is done; nothing is left over.
        if champion.current(home)["run_id"] != new:
            promotion.promote(models[new], home, record)
        else:
            with pytest.raises(ConfigError, match=f"run {new} was already promoted"):
                promotion.promote(models[new], home, record)
            promotion.promote(models[later], home,
                             winning(decision(models[later], home, later)))
        assert _whole(home, models) in (new, later)
        _no_leftovers(home)
        shutil.rmtree(home)
    assert changes > 8  # staging, entry, pointer and their fsyncs were all cut somewhere


def test_older_champion_folders_are_read_and_migrated(tmp_path, models):
    """Before #34 a kill mid-swap left the folder "incomplete" or "half-promoted" and every
    later challenge and promotion was refused; now the pointer decides and the next promotion
    tidies up."""
    home = tmp_path / "champion"
    promotion.promote(models["r1"], home, decision(models["r1"], home, "r1"))
    _legacy(home, models)
    shutil.rmtree(home / "model")  # "incomplete": the current model/ moved out
    (home / "decision.json").write_text(json.dumps({"run_id": "r3"}))  # "half-promoted"
    assert _whole(home, models) == "r1"
    promotion.promote(models["r3"], home, winning(decision(models["r3"], home, "r3")))
    assert _whole(home, models) == "r3"
    _no_leftovers(home)
    assert sorted(p.name for p in (home / "history").iterdir()) == ["r1", "r3"]


_CHILD = """
import json, os, signal, sys
from pathlib import Path
from lungxray import promotion
args = json.loads(sys.argv[1])
calls = [0]
real = os.replace
def replace(src, dst, *a, **k):
    calls[0] += 1
    if calls[0] == args["at"]:
        os.kill(os.getpid(), getattr(signal, args["signal"]))
    return real(src, dst, *a, **k)
os.replace = replace
promotion.promote(args["model"], args["home"], json.loads(Path(args["record"]).read_text()))
"""


@pytest.mark.parametrize("sig, at", [("SIGKILL", 1), ("SIGKILL", 2), ("SIGTERM", 2)])
def test_a_real_signal_during_promotion(tmp_path, models, home, sig, at):
    """A real SIGKILL or SIGTERM in a child process at its first or second rename (the entry
    into history/, the pointer): the champion is whole, a SIGTERM leaves no staging, and the
    next promotion finishes."""
    record = tmp_path / "decision.json"
    record.write_text(json.dumps(winning(decision(models["r2"], home, "r2"))))
    arg = json.dumps({"at": at, "signal": sig, "model": str(models["r2"]), "home": str(home),
                      "record": str(record)})
    result = subprocess.run([sys.executable, "-c", _CHILD, arg], capture_output=True, text=True,
                            timeout=120, env={**os.environ, **_env()})
    assert result.returncode in (-signal.SIGKILL, 128 + signal.SIGTERM), result.stderr[-1000:]
    now = _whole(home, models)
    if sig == "SIGTERM":
        assert "stopped by SIGTERM; removed the staging folder" in result.stderr
        assert not list(home.glob(".promote-*"))
    if now == "r1":
        promotion.promote(models["r2"], home, json.loads(record.read_text()))
    assert _whole(home, models) == "r2"
    _no_leftovers(home)


def test_two_promotions_at_once_exactly_one_wins(home, models):
    records = {run: winning(decision(models[run], home, run)) for run in ("r2", "r3")}
    outcomes: dict[str, str] = {}
    start = threading.Barrier(2)

    def run(run_id: str) -> None:
        start.wait()
        try:
            promotion.promote(models[run_id], home, records[run_id])
            outcomes[run_id] = "won"
        except ConfigError as err:
            outcomes[run_id] = str(err)

    threads = [threading.Thread(target=run, args=(r,)) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [r for r, outcome in outcomes.items() if outcome == "won"]
    assert len(winners) == 1, outcomes
    loser = next(r for r in outcomes if r not in winners)
    assert "champion changed since run" in outcomes[loser]
    assert _whole(home, models) == winners[0]
    assert not (home / "history" / loser).exists()
    _no_leftovers(home)


