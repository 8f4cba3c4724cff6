"""The champion folder's store: which names it may hold, the model folder's hash, run ids and
the one spelling of a location (issue 34). Stand-in model folders (tests/champion_helpers.py)
keep these tests free of Keras."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lungxray import champion_store
from lungxray.errors import ConfigError, LungxrayError, ModelError
from tests.champion_helpers import fake_model


@pytest.fixture()
def models(tmp_path) -> dict[str, Path]:
    return {"r1": fake_model(tmp_path / "models" / "r1")}


def test_model_hash_covers_names_sizes_and_bytes(tmp_path, models):
    digest = champion_store.model_sha256(models["r1"])
    copy = tmp_path / "copy"
    shutil.copytree(models["r1"], copy)
    assert champion_store.model_sha256(copy) == digest
    (copy / "model.keras").rename(copy / "weights.keras")
    assert champion_store.model_sha256(copy) != digest
    (copy / "weights.keras").unlink()
    (copy / "weights.keras").symlink_to("/dev/zero")
    with pytest.raises(ModelError, match="links outside the folder"):
        champion_store.model_sha256(copy)



def test_champion_folder_must_hold_a_champion_or_nothing(tmp_path):
    assert champion_store.check_uri(str(tmp_path / "new")) == str(tmp_path / "new")
    (tmp_path / "empty").mkdir()
    champion_store.check_uri(str(tmp_path / "empty"))
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"x")
    with pytest.raises(LungxrayError, match="not a champion folder .* holds 'cat.jpg'"):
        champion_store.check_uri(str(tmp_path / "photos"))
    with pytest.raises(LungxrayError, match="not a champion folder"):
        champion_store.check_uri("/etc")



@pytest.mark.parametrize("run_id", ["", "a/b", "..", "a..b", ".hidden", "x" * 129, 7, None])
def test_a_run_id_that_cannot_be_a_history_folder_is_refused(run_id):
    with pytest.raises(ConfigError, match="must be 1-128 letters, digits"):
        champion_store.check_run_id(run_id)


def test_a_good_run_id_and_a_locations_one_spelling(tmp_path, monkeypatch):
    assert champion_store.check_run_id("run-2024.01_a") == "run-2024.01_a"
    monkeypatch.chdir(tmp_path)
    assert champion_store.identity("champ/") == str(tmp_path / "champ")
    assert champion_store.identity("gs://bucket/champ/") == "gs://bucket/champ"
    assert champion_store.gcs_name("gs://bucket/champ/", "history", "r1") == (
        "gs://bucket/champ/history/r1")
