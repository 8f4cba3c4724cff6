"""Champion/challenger: paired bootstrap, decision, decision.json and promotion."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from lungxray import champion, champion_store, data, model_loader, promotion
from lungxray.errors import ConfigError, DataError, ModelError
from tests.champion_helpers import decision, tree, winning
from tests.test_predict import tiny_model_dir


def synthetic(n: int = 400, seed: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, a weak model's and a strong model's probabilities on the same images."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    noise = rng.normal(size=n)
    weak = 1 / (1 + np.exp(-(0.6 * (2 * y - 1) + noise)))
    strong = 1 / (1 + np.exp(-(1.6 * (2 * y - 1) + noise)))
    return y, np.column_stack([1 - weak, weak]), np.column_stack([1 - strong, strong])


def test_paired_bootstrap_is_sklearns_auc_difference_with_a_seeded_ci():
    y, weak, strong = synthetic()
    result = champion.paired_bootstrap(y, weak, strong, n_bootstrap=100, seed=3)
    assert result["champion"] == pytest.approx(roc_auc_score(y, weak[:, 1]))
    assert result["challenger"] == pytest.approx(roc_auc_score(y, strong[:, 1]))
    assert result["difference"] == pytest.approx(result["challenger"] - result["champion"])
    lo, hi = result["ci"]
    assert 0 < lo < result["difference"] < hi and result["p_not_better"] == 0.0
    again = champion.paired_bootstrap(y, weak, strong, n_bootstrap=100, seed=3)
    assert again["ci"] == result["ci"]  # seeded
    swapped = champion.paired_bootstrap(y, strong, weak, n_bootstrap=100, seed=3)
    assert swapped["ci"][1] < 0 and swapped["p_not_better"] == 1.0
    same = champion.paired_bootstrap(y, weak, weak, n_bootstrap=50)
    assert same["difference"] == 0.0 and same["ci"] == [0.0, 0.0]


def test_pairing_narrows_the_interval():
    """Two models sharing most of their errors: the paired CI of the difference is much
    narrower than the difference of two independent CIs would be."""
    y, weak, _ = synthetic(seed=2)
    rng = np.random.default_rng(0)
    close = np.clip(weak[:, 1] + rng.normal(0, 0.02, len(y)), 0, 1)
    result = champion.paired_bootstrap(y, weak, np.column_stack([1 - close, close]),
                                       n_bootstrap=100)
    width = result["ci"][1] - result["ci"][0]
    draws = np.random.default_rng(0).integers(0, len(y), (200, len(y)))
    single = [roc_auc_score(y[i], weak[i, 1]) for i in draws]
    assert width < 0.5 * (np.percentile(single, 97.5) - np.percentile(single, 2.5))


def test_decision_honours_the_margin_and_a_missing_champion():
    y, weak, strong = synthetic()
    comparison = champion.paired_bootstrap(y, weak, strong, n_bootstrap=100)
    lo = comparison["ci"][0]
    promote = champion.decide(comparison, margin=lo / 2)
    keep = champion.decide(comparison, margin=lo + 0.01)
    assert promote["decision"] == "promote"
    assert "better by more than the margin" in promote["reason"]
    assert keep["decision"] == "keep" and "not better by more than the margin" in keep["reason"]
    worse = champion.decide(champion.paired_bootstrap(y, strong, weak, n_bootstrap=100))
    assert worse["decision"] == "keep" and "the challenger is worse" in worse["reason"]
    assert champion.decide(None) == {"decision": "promote", "reason": "no champion yet"}
    for margin in (-0.1, 1.0, float("nan")):
        with pytest.raises(ConfigError, match="margin"):
            champion.decide(comparison, margin=margin)


def test_bad_comparisons_are_refused():
    y, weak, strong = synthetic(n=40)
    with pytest.raises(DataError, match=r"challenger probabilities must be \(40, K>=2\)"):
        champion.paired_bootstrap(y, weak, strong[:30])
    with pytest.raises(DataError, match="undefined"):
        champion.paired_bootstrap(np.zeros(40), weak, strong)
    info = {"class_names": ["normal", "pneumonia"], "image_size": 32, "channels": 1}
    champion.check_compatible(info, dict(info))
    with pytest.raises(ModelError, match=r"champion: image_size 64 differs .* 32"):
        champion.check_compatible({**info, "image_size": 64}, info)
    with pytest.raises(ModelError, match="class_names"):
        champion.check_compatible({**info, "class_names": ["a", "b"]}, info)


@pytest.fixture(scope="module")
def two_models(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("models")
    return tiny_model_dir(root / "old", seed=0), tiny_model_dir(root / "new", seed=3)


def test_real_models_compare_decide_and_promote(two_models, small_dataset, tmp_path):
    old, new = two_models
    test = data.load_split(small_dataset, "test")
    probs = {name: model_loader.load(d).predict(test.images)[0]
             for name, d in (("old", old), ("new", new))}
    infos = {name: model_loader.read_model_info(d) for name, d in (("old", old), ("new", new))}
    comparison = champion.paired_bootstrap(test.labels, probs["old"], probs["new"],
                                           n_bootstrap=100, seed=0)
    assert comparison["n"] == len(test)
    home = tmp_path / "champion"
    assert champion.read_champion(home) is None
    first = decision(old, home, "run-1")
    card = tmp_path / "card.md"
    card.write_text("# old model\n")
    promotion.promote(old, home, first, model_card=card)
    assert champion.read_champion(home) == home / "history" / "run-1" / "model"
    second = champion.decision_record("run-2", infos["new"], infos["old"], comparison,
                                      margin=0.0, split="test")
    champion.write_decision(second, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / champion.DECISION_FILE).read_text())
    assert saved["decision"] in ("promote", "keep") and saved["comparison"]["n"] == len(test)
    assert saved["champion"]["model_name"] == "VGG16" and saved["split"] == "test"
    won = winning(decision(new, home, "run-2", comparison))  # promote, to test the swap
    promotion.promote(new, home, won)
    assert json.loads((home / champion.RECORD_FILE).read_text())["history"] == "history/run-2"
    entry = home / "history" / "run-2"
    assert json.loads((entry / champion.DECISION_FILE).read_text())["run_id"] == "run-2"
    assert sorted(p.name for p in (home / "history").iterdir()) == ["run-1", "run-2"]
    assert (home / "history" / "run-1" / champion.CARD_FILE).read_text() == "# old model\n"
    assert not (entry / champion.CARD_FILE).exists()  # run-2 came without a card
    assert sorted(p.name for p in home.iterdir()) == ["champion.json", "history"]  # no staging
    reloaded = model_loader.load(champion.read_champion(home)).predict(test.images)[0]
    np.testing.assert_allclose(reloaded, probs["new"], atol=1e-6)
    with pytest.raises(ConfigError, match="run run-2 was already promoted"):
        promotion.promote(new, home, won)
    with pytest.raises(ConfigError, match="not 'promote'"):
        promotion.promote(new, home, {**won, "run_id": "run-3", "decision": "keep"})


@pytest.mark.parametrize("fail_at", ["staging", "entry", "pointer"])
def test_a_failed_promotion_leaves_the_champion_as_it_was(two_models, tmp_path, monkeypatch,
                                                          fail_at):
    old, new = two_models
    home = tmp_path / "champion"
    promotion.promote(old, home, decision(old, home, "r1"), model_card=_card(tmp_path))
    before = tree(home)
    real_replace, real_write = os.replace, champion.safeio.write_text_atomic
    real_copy_model = champion.safeio.copy_model_folder

    def copy_model(src, dst, *args, **kwargs):  # a full disk at the end of staging the model
        real_copy_model(src, dst, *args, **kwargs)
        if fail_at == "staging":
            raise OSError(28, "No space left on device")

    def replace(src, dst, *args, **kwargs):  # ... or when the entry moves into history/
        if fail_at == "entry" and Path(dst).parent.name == "history":
            raise OSError(28, "No space left on device")
        real_replace(src, dst, *args, **kwargs)

    def write(path, text, **kwargs):  # ... or when the pointer is written
        if fail_at == "pointer":
            raise OSError(28, "No space left on device")
        real_write(path, text, **kwargs)

    record = winning(decision(new, home, "r2"))
    monkeypatch.setattr(champion.safeio, "copy_model_folder", copy_model)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(champion.safeio, "write_text_atomic", write)
    with pytest.raises(OSError, match="No space left"):
        promotion.promote(new, home, record)
    monkeypatch.undo()
    assert tree(home) == before
    assert champion.read_champion(home) == home / "history" / "r1" / "model"
    promotion.promote(new, home, record)  # the same run may retry
    assert champion.current(home)["run_id"] == "r2"


def _card(tmp_path: Path) -> Path:
    card = tmp_path / "model_card.md"
    card.write_text("# card\n")
    return card


def test_champion_folders_that_cannot_be_used_are_refused(two_models, tmp_path):
    old, _ = two_models
    stranger = tmp_path / "photos"
    stranger.mkdir()
    (stranger / "cat.jpg").write_bytes(b"x")
    with pytest.raises(ModelError, match="photos': not a champion folder"):
        promotion.promote(old, stranger, decision(old, tmp_path / "new", "r1"))
    assert sorted(p.name for p in stranger.iterdir()) == ["cat.jpg"]
    empty = tmp_path / "empty"
    (empty / "m").mkdir(parents=True)
    (empty / "m" / "model.keras").write_bytes(b"x")
    record = decision(old, tmp_path / "c", "r1")
    with pytest.raises(ModelError, match="not a model folder"):
        promotion.promote(empty / "m", tmp_path / "c", record)
    home = tmp_path / "home"
    promotion.promote(old, home, decision(old, home, "r1"))
    (home / "history" / "r1" / "model" / "model_info.json").unlink()  # damaged by hand
    with pytest.raises(ModelError, match="names run r1, whose history entry is not complete"):
        champion.read_champion(home)
    for bad in ("../x", "", "a/b"):
        with pytest.raises(ConfigError, match="run id"):
            champion.decision_record(bad, {}, None, None, 0.0)


def test_challenge_decides_on_validation_and_reports_every_split(two_models, small_dataset,
                                                                 tmp_path):
    old, new = two_models
    home = tmp_path / "champion"
    skipped = champion.challenge(new, small_dataset, "", "run-0")
    assert skipped["decision"] == "skip" and skipped["comparison"] is None
    # The data is checked before anything is decided, even with no champion to compare yet.
    os.mkfifo(tmp_path / "fifo")
    for where in (tmp_path / "fifo", tmp_path / "nowhere"):
        with pytest.raises(DataError, match="not a prepared dataset"):
            champion.challenge(new, where, str(home), "run-1")
    assert not home.exists()
    first = champion.challenge(old, small_dataset, str(home), "run-1")
    assert first["decision"] == "promote" and first["reason"] == "no champion yet"
    assert first["champion_state"] == {"run_id": None, "generation": 0}
    assert first["challenger"]["sha256"] == champion_store.model_sha256(old)
    assert first["champion_uri"] == str(home.resolve())
    promotion.promote(old, home, first, model_card=_card(tmp_path))

    second = champion.challenge(new, small_dataset, str(home), "run-2", n_bootstrap=200)
    val, test = data.load_split(small_dataset, "val"), data.load_split(small_dataset, "test")
    assert second["split"] == "val" and second["comparison"]["n"] == len(val)
    assert set(second["evidence"]) == {"test"} and second["evidence"]["test"]["n"] == len(test)
    assert second["champion_state"]["run_id"] == "run-1"
    probs = {name: model_loader.load(d).predict(val.images)[0]
             for name, d in (("old", old), ("new", new))}
    assert second["comparison"]["champion"] == pytest.approx(
        roc_auc_score(val.labels, probs["old"][:, 1]))
    assert second["comparison"]["challenger"] == pytest.approx(
        roc_auc_score(val.labels, probs["new"][:, 1]))
    assert second["decision"] == champion.decide(second["comparison"], 0.0)["decision"]
    section = champion.markdown(second)
    assert "## Champion vs challenger" in section
    assert f"**Decision: {second['decision']}**" in section
    assert "| val |" in section and "| test |" in section

    # A third run compared with run-1 too; run-2 is promoted first: the third must not replace
    # a champion it never saw.
    third = champion.challenge(new, small_dataset, str(home), "run-3", n_bootstrap=50)
    promotion.promote(new, home, winning(second))
    with pytest.raises(ConfigError, match="champion changed since run run-3"):
        promotion.promote(new, home, winning(third))
    assert champion.current(home)["run_id"] == "run-2"


def test_challenge_refuses_a_champion_of_another_input(two_models, small_dataset, tmp_path):
    from tests.test_predict import tiny_model_dir

    old, _ = two_models
    home = tmp_path / "champion"
    other = tiny_model_dir(tmp_path / "other", seed=1, size=48)
    promotion.promote(other, home, decision(other, home, "r1"))
    with pytest.raises(ModelError, match="image_size 48 differs"):
        champion.challenge(old, small_dataset, str(home), "r2")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("x")
    with pytest.raises(ModelError, match="not a champion folder"):
        champion.challenge(old, small_dataset, str(tmp_path / "junk"), "r2")


@pytest.fixture()
def gcs_bucket(monkeypatch) -> str:
    """A bucket on a gcp-storage-emulator that enforces generation preconditions."""
    import socket
    import uuid

    from gcp_storage_emulator.server import create_server

    from tests.gcs_preconditions import enforced

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    name = f"champ-{uuid.uuid4().hex[:8]}"
    with enforced():
        server = create_server("127.0.0.1", port, in_memory=True, default_bucket=name)
        server.start()
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", f"http://127.0.0.1:{port}")
        try:
            yield name
        finally:
            server.stop()


def test_gcs_promotion_is_a_compare_and_swap(two_models, small_dataset, gcs_bucket, tmp_path,
                                             monkeypatch):
    """Against the emulator with GCS's generation preconditions (tests/gcs_preconditions.py)."""
    from lungxray import storage

    old, new = two_models
    uri = f"gs://{gcs_bucket}/lungxray/champion"
    assert champion.read_champion(uri, tmp_path / "cache") is None
    first = champion.challenge(old, small_dataset, uri, "run-1", cache_dir=tmp_path / "cache")
    assert promotion.promote(old, uri, first, model_card=_card(tmp_path)) == (
        f"{uri}/history/run-1")
    state = champion.current(uri)
    assert state["run_id"] == "run-1" and state["generation"] > 0
    fetched = champion.read_champion(uri, tmp_path / "cache")
    val = data.load_split(small_dataset, "val")
    np.testing.assert_allclose(model_loader.load(fetched).predict(val.images)[0],
                               model_loader.load(old).predict(val.images)[0], atol=1e-6)

    # Two runs finish together, both compared with run-1.
    a = winning(champion.challenge(new, small_dataset, uri, "run-a", n_bootstrap=50,
                                   cache_dir=tmp_path / "cache"))
    b = {**a, "run_id": "run-b"}
    promotion.promote(new, uri, a)
    with pytest.raises(ConfigError, match="champion changed since run run-b"):
        promotion.promote(new, uri, b)
    # b passes that check at the same moment as a: the swap of champion.json itself refuses it,
    # and b's uploaded history entry is removed again.
    with monkeypatch.context() as patch, pytest.raises(storage.PreconditionError,
                                                       match="another writer"):
        patch.setattr(promotion, "_check_unchanged", lambda *args: None)
        patch.setattr(champion_store, "current", lambda u: state)  # what b read before a won
        promotion.promote(new, uri, b)
    assert champion.current(uri)["run_id"] == "run-a"
    assert not storage.exists(f"{uri}/history/run-b/")
    assert storage.exists(f"{uri}/history/run-1/model_card.md")
    with pytest.raises(ConfigError, match="run run-a was already promoted"):
        promotion.promote(new, uri, a)


def test_gcs_promotion_killed_before_or_after_its_swap_is_finished_by_the_next(
        gcs_bucket, tmp_path, monkeypatch):
    """A promotion to gs:// killed halfway through its upload leaves the old champion and an
    entry no pointer names, which the next promotion of that run replaces; killed just after
    the swap, the new champion is whole and the retry says it is done."""
    from lungxray import storage
    from tests.champion_helpers import Killed, fake_model

    cache = tmp_path / "cache"
    models = {run: fake_model(tmp_path / run, seed=i) for i, run in enumerate(("r1", "r2", "r3"))}
    uri = f"gs://{gcs_bucket}/champ"

    def whole() -> str | None:
        run_id = champion.current(uri)["run_id"]
        model = champion.read_champion(uri, cache)
        if run_id is None:
            assert model is None
        else:
            assert champion_store.model_sha256(model) == champion_store.model_sha256(
                models[run_id])
        return run_id

    def dead(*args, **kwargs):
        raise Killed("after the kill")

    real_upload, real_swap = storage.upload, storage.write_if_generation

    def half_upload(local, entry, **kwargs):  # the model's info arrives, then the pod dies
        part = tmp_path / "part"
        shutil.rmtree(part, ignore_errors=True)
        (part / "model").mkdir(parents=True)
        shutil.copy(Path(local) / "model" / "model_info.json", part / "model")
        real_upload(part, entry, **kwargs)
        raise Killed("upload")

    storage.upload(tmp_path / "r1", f"gs://{gcs_bucket}/photos")
    with pytest.raises(ModelError, match="photos: not a champion folder"):
        champion.read_champion(f"gs://{gcs_bucket}/photos", cache)
    for old, new in ((None, "r1"), ("r1", "r2")):  # the first promotion, then a replacement
        record = decision(models[new], uri, new, cache_dir=cache)
        record = record if old is None else winning(record)
        with monkeypatch.context() as patch:
            for name, replacement in (("upload", half_upload), ("delete_prefix", dead),
                                      ("read_generation", dead)):
                patch.setattr(storage, name, replacement)
            patch.setattr(champion_store, "current",  # what it read before it died
                          lambda u, state=record["champion_state"]: dict(state))
            with pytest.raises(Killed):
                promotion.promote(models[new], uri, record)
        assert storage.exists(f"{uri}/history/{new}/model/model_info.json")  # the orphan
        assert whole() == old  # challenge reads the old champion (or none yet)
        promotion.promote(models[new], uri, record)  # finishes: the orphan is replaced
        assert whole() == new

    record = winning(decision(models["r3"], uri, "r3", cache_dir=cache))

    def swap_then_die(*args, **kwargs):
        real_swap(*args, **kwargs)
        raise Killed("swap")

    with monkeypatch.context() as patch:
        patch.setattr(storage, "write_if_generation", swap_then_die)
        patch.setattr(storage, "delete_prefix", dead)
        with pytest.raises(Killed):
            promotion.promote(models["r3"], uri, record)
    assert whole() == "r3"
    with pytest.raises(ConfigError, match="run r3 was already promoted"):
        promotion.promote(models["r3"], uri, record)


def test_a_model_card_that_is_not_a_bounded_file_fails_before_the_challenge(
        small_dataset, tmp_path, capsys):
    from lungxray import cli
    from tests.champion_helpers import fake_model

    out = tmp_path / "out"
    code = cli.main(["challenge", "--model", str(fake_model(tmp_path / "m")), "--data",
                     str(small_dataset), "--champion", "", "--run-id", "r1", "--output",
                     str(out), "--model-card", "/dev/zero"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "model card" in err, err
    assert not out.exists()


@pytest.mark.parametrize("n, decimals", [(40, None), (300, 1)])
def test_resampled_auc_differences_are_sklearns(n, decimals):
    """The batched Mann-Whitney AUCs are roc_auc_score's on every resample, ties included."""
    from sklearn.metrics import roc_auc_score

    from lungxray import metrics

    rng = np.random.default_rng(n)
    y = (rng.random(n) < 0.7).astype(int)
    a = rng.random(n)
    b = np.clip(a + rng.normal(0, 0.2, n), 0, 1)
    if decimals is not None:
        a, b = np.round(a, decimals), np.round(b, decimals)
    two = [np.column_stack([1 - p, p]) for p in (a, b)]
    got = champion._resampled_differences(y, *two, n_bootstrap=300, seed=5)
    want = [roc_auc_score(y[i], b[i]) - roc_auc_score(y[i], a[i])
            for i in metrics.bootstrap_indices(y, 300, 5)]
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
