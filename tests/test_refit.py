"""The refit: the pick trained again with the carved test_shifted back in, scored beside the pick
on the splits neither trained on; off, or with nothing carved, the pick shipped as it is."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungxray import artifacts, cli, evaluate, model_loader, refit, shift, train
from lungxray.errors import ConfigError, ModelError


def _manifest(data: Path) -> dict:
    return json.loads((data / "manifest.json").read_text())


def _compare_output(pick: Path, where: Path) -> Path:
    """A `lungxray compare` output around ``pick``."""
    shutil.copytree(pick, where / artifacts.BEST_MODEL_DIR)
    (where / artifacts.REPORT_HTML).write_text("<html><body><h1>r</h1></body></html>")
    (where / artifacts.REPORT_MD).write_text("# Report\n")
    (where / artifacts.MODEL_CARD_FILE).write_text("# Model card\n")
    return where


def test_refit_trains_on_train_and_test_shifted_and_scores_both(carved, pick, tmp_path):
    """`lungxray refit`: the compare layout out, the shipped model trained again, the section
    in the report, summary and card."""
    splits = _manifest(carved)["splits"]
    out = tmp_path / "out"
    assert cli.main(["refit", "--data", str(carved), "--compare",
                     str(_compare_output(pick, tmp_path / "compare")), "--output", str(out),
                     "--epochs", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [artifacts.BEST_MODEL_DIR, artifacts.REPORT_HTML, artifacts.REPORT_MD,
         artifacts.MODEL_CARD_FILE])
    shipped = out / artifacts.BEST_MODEL_DIR
    info = model_loader.read_model_info(shipped)
    record = info[refit.REFIT_KEY]
    assert info["train_splits"] == ["train", shift.SPLIT]
    assert info["train_images"] == splits["train"]["n"] + splits[shift.SPLIT]["n"]
    # The pick's own settings and rule, repeated.
    measured = model_loader.read_model_info(pick)
    assert (info["seed"], info["hparams"], info["threshold_method"]) == (
        measured["seed"], measured["hparams"], "platt")
    assert record["added_splits"] == {shift.SPLIT: splits[shift.SPLIT]["n"]}
    assert record["refit"] and record["threshold"] == info["threshold"]
    # The pick is scored on the carved split too (the proxy estimate); the refit is not.
    assert set(record["scores"]["measured"]) == {"val", "test", shift.SPLIT}
    assert set(record["scores"]["refit"]) == {"val", "test"}
    for scores in record["scores"].values():
        assert all(0.0 <= s["roc_auc"] <= 1.0 for s in scores.values())
    # A new network, not the pick's weights copied.
    images = np.load(carved / "val_images.npy")[:16]
    before = model_loader.load(pick).predict(images)[0]
    after = model_loader.load(shipped).predict(images)[0]
    assert not np.allclose(before, after)
    section = refit.section_markdown(record)
    assert f"train + `{shift.SPLIT}` ({splits[shift.SPLIT]['n']} images)" in section
    assert "| test_shifted |" in section and "—" in section  # the refit has no score there
    assert (out / artifacts.REPORT_MD).read_text() == "# Report\n" + section
    assert (out / artifacts.MODEL_CARD_FILE).read_text() == "# Model card\n" + section
    page = (out / artifacts.REPORT_HTML).read_text()
    assert page.index(artifacts.REFIT_SECTION_TITLE) < page.index("</body>")
    assert "<table" in page
    # Its score on what it learnt from would read as an estimate: refused, nothing written.
    with pytest.raises(ConfigError, match=r"was trained on split 'test_shifted' \(a refit\)"):
        evaluate.evaluate(shipped, str(carved), tmp_path / "eval", splits=["test", shift.SPLIT])
    assert not (tmp_path / "eval").exists()


@pytest.mark.parametrize("enabled", [False, True])
def test_off_or_nothing_carved_ships_the_pick_unchanged(enabled, carved, pick, small_dataset,
                                                       trained_model, tmp_path):
    model, data = (pick, carved) if not enabled else (trained_model, small_dataset)
    record = refit.refit(data, model, tmp_path / "shipped", enabled=enabled)
    assert record == {"refit": False, "reason": "refit is off" if not enabled else
                      f"the dataset has no {shift.SPLIT} split to add"}
    assert ((tmp_path / "shipped" / artifacts.MODEL_FILE).read_bytes()
            == (model / artifacts.MODEL_FILE).read_bytes())
    assert "No refit (" in refit.section_markdown(record)


def _ensemble_of_two(pick: Path, ensemble: Path) -> Path:
    """An Ensemble-top2 folder of two copies of ``pick``, at threshold 0.5."""
    for name in ("a", "b"):
        shutil.copytree(pick, ensemble / artifacts.MEMBERS_DIR / name)
    info = model_loader.read_model_info(pick)
    spec = {"model_name": "Ensemble-top2", "ensemble": True, "kind": "ensemble",
            "members": ["a", "b"], "threshold": 0.5, "threshold_method": "youden",
            **{k: info[k] for k in ("class_names", "positive_class", "image_size", "channels")}}
    for name in (artifacts.ENSEMBLE_FILE, artifacts.INFO_FILE):
        (ensemble / name).write_text(json.dumps(spec))
    return ensemble


def test_an_ensemble_pick_refits_each_member_and_chooses_its_thresholds_again(two_sites,
                                                                             tmp_path):
    from lungxray import data, site_metrics

    train.train(two_sites, "SmallCNN", tmp_path / "pick", epochs=1, seed=0)
    ensemble = _ensemble_of_two(tmp_path / "pick", tmp_path / "ensemble")
    record = refit.refit(two_sites, ensemble, tmp_path / "shipped", epochs=1)
    shipped = tmp_path / "shipped"
    for name in ("a", "b"):
        member = model_loader.read_model_info(shipped / artifacts.MEMBERS_DIR / name)
        assert member["train_splits"] == ["train", shift.SPLIT]
    saved = json.loads((shipped / artifacts.ENSEMBLE_FILE).read_text())
    assert saved == json.loads((shipped / artifacts.INFO_FILE).read_text())
    assert saved["threshold_method"] == "youden" and saved["threshold"] != 0.5
    assert saved[refit.REFIT_KEY]["threshold"] == saved["threshold"]
    assert model_loader.load(shipped).is_ensemble
    assert {s for s in record["scores"]["refit"] if " " not in s} == {"val", "test"}
    # Each site's threshold chosen again, on the refit members' mean val probabilities.
    val = data.load_split(two_sites, "val")
    mean = np.mean([model_loader.load(shipped / artifacts.MEMBERS_DIR / name)
                    .predict(val.images)[0][:, 1] for name in ("a", "b")], axis=0)
    sites = site_metrics.site_rows(_manifest(two_sites), "val", "data")
    assert set(saved["site_thresholds"]) == {"pneumoniamnist", "nih"}
    assert saved["site_thresholds"] == pytest.approx(
        site_metrics.site_thresholds(val.labels, mean, sites, "youden"))


def test_a_pick_of_another_dataset_is_refused_before_anything_is_written(carved, trained_model,
                                                                       tmp_path):
    with pytest.raises(ConfigError, match="was trained on another dataset"):
        refit.refit(carved, trained_model, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


def test_a_pick_without_its_settings_is_refused(carved, pick, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(pick, broken)
    info = json.loads((broken / artifacts.INFO_FILE).read_text())
    del info["seed"]
    (broken / artifacts.INFO_FILE).write_text(json.dumps(info))
    with pytest.raises(ModelError, match="lacks seed; it cannot be trained again"):
        refit.refit(carved, broken, tmp_path / "shipped")
    assert not (tmp_path / "shipped").exists()


@pytest.mark.parametrize("splits, bad", [(("train", "val"), "val"),
                                         (("train", "nope"), "nope"), ((), "")])
def test_train_refuses_val_unknown_or_no_training_splits(carved, tmp_path, splits, bad):
    with pytest.raises(ConfigError, match=r"train_splits .* must name distinct splits"):
        train.train(carved, "SmallCNN", tmp_path / "m", epochs=1, train_splits=splits)
    assert not (tmp_path / "m").exists()


def test_cli_refit_refuses_a_report_it_cannot_read_bounded(carved, pick, tmp_path, capsys):
    compare = _compare_output(pick, tmp_path / "compare")
    (compare / artifacts.REPORT_HTML).unlink()
    (compare / artifacts.REPORT_HTML).symlink_to("/dev/zero")
    assert cli.main(["refit", "--data", str(carved), "--compare", str(compare), "--output",
                     str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a regular file" in err[0]
    assert not (tmp_path / "out").exists()
