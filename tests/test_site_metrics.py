"""Issue 33: per-site numbers beside the pooled ones in evaluate and the report, and selection on
the worst site's validation AUC. (The model card's per-site section: test_site_report.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from lungxray import (
    data,
    evaluate,
    evaluation_report,
    prepare,
    report,
    selection,
    site_metrics,
)
from lungxray.errors import ConfigError, DataError
from tests.trial_helpers import SITE_X, SITE_Y, site_trial

SIZE = 32


@pytest.fixture(scope="module")
def two_site_data(tmp_path_factory, shared_npz, shared_nih) -> Path:
    output = tmp_path_factory.mktemp("sites") / "data"
    prepare.preprocess(str(shared_npz), output, image_size=SIZE, seed=0, max_per_split=240,
                       sites=[("nih", str(shared_nih))])
    return output


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, two_site_data) -> Path:
    from lungxray import train

    output = tmp_path_factory.mktemp("model") / "SmallCNN"
    train.train(two_site_data, "SmallCNN", output, epochs=1, weights="none", seed=0)
    return output


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, tiny_model, two_site_data) -> tuple[Path, dict]:
    output = tmp_path_factory.mktemp("eval")
    results = evaluate.evaluate(tiny_model, str(two_site_data), output,
                                splits=["val", "test"], explain=False)
    return output, results


def test_each_split_has_per_site_numbers_beside_the_pooled_ones(evaluated, two_site_data):
    output, results = evaluated
    manifest = json.loads((two_site_data / "manifest.json").read_text())
    for split in ("val", "test"):
        metrics = json.loads((output / split / "metrics.json").read_text())
        assert metrics == json.loads(json.dumps(results[split]))
        per_site = metrics["per_site"]
        assert list(per_site) == ["pneumoniamnist", "nih"]
        assert sum(v["n"] for v in per_site.values()) == metrics["n"]
        # Each site's numbers are the pooled recipe on that site's rows alone, recomputed here
        # from predictions.csv, whose site column follows the manifest's row order.
        preds = pd.read_csv(output / split / "predictions.csv")
        assert list(preds["site"]) == list(site_metrics.site_rows(manifest, split, "x"))
        threshold = metrics["threshold"]
        for site, values in per_site.items():
            rows = preds[preds["site"] == site]
            y, score = rows["y_true"].to_numpy(), rows["prob_pneumonia"].to_numpy()
            assert values["n"] == len(rows) == manifest["splits"][split]["sites"][site]["n"]
            assert values["prevalence"] == pytest.approx(np.mean(y == 1))
            assert values["roc_auc"] == pytest.approx(roc_auc_score(y, score))
            predicted = score >= threshold
            assert values["sensitivity"] == pytest.approx(np.mean(predicted[y == 1]))
            assert values["specificity"] == pytest.approx(np.mean(~predicted[y == 0]))
            assert values["accuracy"] == pytest.approx(np.mean(predicted == (y == 1)))
            lo, hi = values["ci"]["roc_auc"]
            assert lo <= values["roc_auc"] <= hi
        assert metrics["worst_site_auc"] == min(v["roc_auc"] for v in per_site.values())
        print(split, {s: round(v["roc_auc"], 3) for s, v in per_site.items()})


def test_kubeflow_metrics_and_pages_show_the_sites(evaluated):
    output, results = evaluated
    scalars = evaluation_report.scalar_metrics(results)
    for split in ("val", "test"):
        for site in ("pneumoniamnist", "nih"):
            block = results[split]["per_site"][site]
            assert scalars[f"{split}_{site}_roc_auc"] == block["roc_auc"]
            assert scalars[f"{split}_{site}_own_balanced_accuracy"] == block[
                "at_site_threshold"]["balanced_accuracy"]
        assert scalars[f"{split}_worst_site_auc"] == results[split]["worst_site_auc"]
    summary = evaluation_report.describe(results)
    assert "Per site on **val**" in summary and "| nih |" in summary
    assert "ROC AUC, worst site" in summary
    page = (output / "report.html").read_text()
    assert "Per site on val" in page and "Per site on test" in page


def test_a_held_out_site_is_evaluated_as_its_own_split(tiny_model, shared_npz, shared_nih,
                                                       tmp_path):
    data_dir = tmp_path / "held"
    prepare.preprocess(str(shared_npz), data_dir, image_size=SIZE, seed=0, max_per_split=100,
                       sites=[("nih", str(shared_nih))], holdout_site="nih")
    splits = evaluate.dataset_splits(data_dir)
    assert splits == ["val", "test", "test_site_nih"]
    results = evaluate.evaluate(tiny_model, str(data_dir), tmp_path / "eval", splits=splits,
                                explain=False)
    held = results["test_site_nih"]
    assert held["n"] == 100 and "per_site" not in held  # one site: the pooled numbers are its
    assert "per_site" not in results["val"]  # one site left to train and choose on
    preds = pd.read_csv(tmp_path / "eval" / "test_site_nih" / "predictions.csv")
    assert set(preds["site"]) == {"nih"}


def test_tampered_site_counts_are_refused(tiny_model, two_site_data, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(two_site_data, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["splits"]["val"]["sites"]["nih"]["n"] += 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="site counts of split 'val' add up to"):
        evaluate.evaluate(tiny_model, str(copy), tmp_path / "eval", splits=["val"],
                          explain=False)
    assert not (tmp_path / "eval" / "val").exists()


# --------------------------------------------------------------------------- selection


def test_worst_site_auc_selects_the_model_that_holds_up_at_every_site(tmp_path):
    trials = [site_trial(tmp_path / "t", "X", SITE_X), site_trial(tmp_path / "t", "Y", SITE_Y)]
    x_val = json.loads((trials[0] / "eval" / "val" / "metrics.json").read_text())
    assert x_val["roc_auc"] == pytest.approx(0.84) and x_val["worst_site_auc"] == 0.0
    loaded = [selection.load_trial(t) for t in trials]
    assert selection.select(loaded, "val_roc_auc", ensemble_k=0).summary["best_model"] == "X"
    summary = report.compare(trials, tmp_path / "worst", select_metric="val_worst_site_auc")
    assert summary["best_model"] == "Y" and summary["select_value"] == 1.0
    # The ensemble candidate is scored per site from its members' site column.
    ensemble = json.loads((tmp_path / "worst" / "ensemble" / "val" / "metrics.json").read_text())
    assert list(ensemble["per_site"]) == ["a", "b"]
    assert summary["ranking"][0]["model_name"] == "Y"
    assert [r["model_name"] for r in summary["ranking"]][-1] == "X"
    text = (tmp_path / "worst" / "report.md").read_text()
    assert "## Per site" in text and "### Per site on val" in text and "| Y | a |" in text
    assert "Per site on val" in (tmp_path / "worst" / "report.html").read_text()
    card = (tmp_path / "worst" / "model_card.md").read_text()
    assert "## Performance per site" in card and "| b | 5 |" in card
    assert "Held-out site **c** (`test_site_c`, 10 images" in card
    assert "Not externally validated" not in card
    assert "### test_site_c (n=10; held-out site c: never trained" in text
    # The summary names the pick's AUC per site and at the held-out site (make local prints it).
    assert "Per site, the pick: ROC AUC on val a 1.0000, b 1.0000; test a 1.0000" in text
    assert "Held-out site c (test_site_c, 10 images, never trained, tuned or selected on): " \
           "ROC AUC 0.3600" in text
    results = pd.read_csv(tmp_path / "worst" / "results.csv")
    assert "val_worst_site_auc" in results.columns


def test_worst_site_auc_needs_a_split_of_several_sites(tmp_path):
    from tests.trial_helpers import three_trials

    with pytest.raises(ConfigError, match="no trial reports 'val_worst_site_auc'"):
        report.compare(three_trials(tmp_path), tmp_path / "out",
                       select_metric="val_worst_site_auc")


def test_per_site_cis_are_the_pooled_recipes_on_each_sites_rows():
    # The fast per-site bootstrap draws the resamples compute_metrics draws and gives its CIs.
    from lungxray import metrics

    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 160)
    score = np.clip(rng.normal(0.3 + 0.3 * y, 0.25), 0, 1)
    probs = np.column_stack([1 - score, score])
    sites = np.array(["a"] * 70 + ["b"] * 90, dtype=object)
    found = site_metrics.per_site(y, probs, sites, ["n", "p"], 0.45, n_bootstrap=50, seed=3)
    for name in ("a", "b"):
        mask = sites == name
        pooled = metrics.compute_metrics(y[mask], probs[mask], ["n", "p"], 0.45, n_bootstrap=50,
                                         seed=3)
        for key in site_metrics.SITE_METRICS:
            assert found[name][key] == pytest.approx(pooled[key])
            assert found[name]["ci"][key] == pytest.approx(pooled["ci"][key])


# --------------------------------------------------------------------------- site thresholds


def test_each_site_gets_the_rules_threshold_on_its_own_rows():
    from lungxray import metrics

    rng = np.random.default_rng(1)
    y = np.r_[rng.integers(0, 2, 300), rng.integers(0, 2, 100), np.zeros(30, int), [1] * 5]
    # Site b's scores sit higher than a's: the pooled cut is a's, b needs its own.
    sites = np.array(["a"] * 300 + ["b"] * 100 + ["c"] * 35, dtype=object)
    score = np.clip(rng.normal(0.2 + 0.3 * y + 0.3 * (sites == "b"), 0.1), 0, 1)
    for rule in ("youden", "balanced", "platt"):
        found = site_metrics.site_thresholds(y, score, sites, rule)
        assert list(found) == ["a", "b"]  # c: 5 positives, under MIN_SITE_CLASS
        for name in found:
            rows = sites == name
            assert found[name] == pytest.approx(
                metrics.operating_threshold(y[rows], score[rows], rule)[0])
    found = site_metrics.site_thresholds(y, score, sites, "youden")
    assert found["b"] > found["a"] + 0.15
    assert site_metrics.site_thresholds(y, score, None, "youden") is None
    assert site_metrics.site_thresholds(y[:300], score[:300], sites[:300], "youden") is None
    # Each site's rates at its own threshold beside those at the pooled one.
    pooled = metrics.choose_threshold(y, score)
    result = {}
    site_metrics.add_per_site(result, y, np.column_stack([1 - score, score]), sites, ["n", "p"],
                              pooled, found, n_bootstrap=0)
    b = result["per_site"]["b"]
    own = b[site_metrics.AT_SITE_THRESHOLD]
    assert own == {"threshold": found["b"], **metrics.rates_at(y[sites == "b"],
                                                                score[sites == "b"], found["b"])}
    assert own["balanced_accuracy"] > (b["sensitivity"] + b["specificity"]) / 2
    assert site_metrics.AT_SITE_THRESHOLD not in result["per_site"]["c"]


def test_a_model_of_several_sites_carries_their_thresholds_to_evaluate_and_predict(
        tiny_model, evaluated, two_site_data, tmp_path):
    from lungxray import metrics, predict

    info = json.loads((tiny_model / "model_info.json").read_text())
    val = pd.read_csv(evaluated[0] / "val" / "predictions.csv")
    # Chosen on each site's own val rows by the model's rule (val here has both sites with
    # enough images of each class).
    assert list(info["site_thresholds"]) == ["pneumoniamnist", "nih"]
    for site, threshold in info["site_thresholds"].items():
        rows = val[val["site"] == site]
        assert threshold == pytest.approx(metrics.choose_threshold(
            rows["y_true"].to_numpy(), rows["prob_pneumonia"].to_numpy()), abs=1e-6)
    test = json.loads((evaluated[0] / "test" / "metrics.json").read_text())
    for site, block in test["per_site"].items():
        assert block["at_site_threshold"]["threshold"] == info["site_thresholds"][site]
    # predict --site decides at that site's threshold; a site without one is refused before
    # anything is written.
    images = tmp_path / "images"
    images.mkdir()
    for i, pixels in enumerate(data.load_split(two_site_data, "test").images[:6]):
        Image.fromarray(pixels[..., 0]).save(images / f"{i}.png")
    site = "nih"
    summary = predict.predict(tiny_model, str(images), tmp_path / "out", site=site)
    assert summary["site"] == site and summary["threshold"] == info["site_thresholds"][site]
    preds = pd.read_csv(tmp_path / "out" / "predictions.csv")
    positive = preds["prob_pneumonia"] >= info["site_thresholds"][site]
    assert (preds["predicted_class"] == np.where(positive, "pneumonia", "normal")).all()
    with pytest.raises(ConfigError, match=r"^--site 'elsewhere': the model has no threshold of "
                                          r"its own for that site; sites with one: nih, "
                                          r"pneumoniamnist$"):
        predict.predict(tiny_model, str(images), tmp_path / "refused", site="elsewhere")
    assert not (tmp_path / "refused").exists()
