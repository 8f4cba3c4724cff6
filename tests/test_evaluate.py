"""Evaluation of really trained models: prepared data, raw sources, external folders with a
class map, saved ensembles, and a 3-class model."""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import recall_score, roc_auc_score

from lungxray import (
    artifacts,
    data,
    ensemble,
    evaluate,
    evaluation_report,
    gradcam,
    model_loader,
    prepare,
    report,
    selection,
    shift,
    train,
)
from lungxray.errors import ModelError
from lungxray.metrics import choose_threshold
from tests.data_helpers import load_npz

CLASSES = ["normal", "pneumonia"]


def test_val_and_test_metrics_at_the_models_own_threshold(trained_model, small_dataset, tmp_path):
    results = evaluate.evaluate(trained_model, str(small_dataset), tmp_path, ["val", "test"])
    info = model_loader.read_model_info(trained_model)
    for split in ("val", "test"):
        metrics = json.loads((tmp_path / split / evaluate.METRICS_FILE).read_text())
        assert metrics == results[split]
        for key in ("accuracy", "roc_auc", "precision", "sensitivity", "specificity", "f1",
                    "npv", "mcc", "brier", "ece", "threshold", "confusion_matrix", "n", "ci",
                    "at_0.5"):
            assert key in metrics
        assert metrics["threshold"] == info["threshold"]  # never re-fitted on this split
        assert metrics["n"] == data.read_manifest(small_dataset)["splits"][split]["n"]
        _check_threshold_rules(metrics, split, tmp_path)
        assert np.sum(metrics["confusion_matrix"]) == metrics["n"]
        predictions = pd.read_csv(tmp_path / split / evaluate.PREDICTIONS_FILE)
        # val's rows carry their worst_group groups (image-statistics clusters: one site).
        assert (artifacts.GROUP_COLUMN in predictions) == (split == "val")
        if split == "val":  # the groups train finds on the same images
            groups = shift.val_groups(data.load_split(small_dataset, "val").images)
            assert predictions[artifacts.GROUP_COLUMN].tolist() == groups.tolist()
            assert len(set(groups)) == shift.VAL_CLUSTERS
        assert metrics["roc_auc"] == pytest.approx(
            roc_auc_score(predictions["y_true"], predictions["prob_pneumonia"]))
        called = (predictions["prob_pneumonia"] >= 0.5).astype(int)
        assert metrics["at_0.5"]["sensitivity"] == pytest.approx(
            recall_score(predictions["y_true"], called))
        lo, hi = metrics["ci"]["roc_auc"]
        assert 0 <= lo <= hi <= 1
        assert metrics["latency_ms"] > 0 and metrics["latency_device"] in ("CPU", "GPU x1")
        for png in ("confusion_matrix.png", "roc.png", "pr.png", "reliability.png",
                    "gradcam.png"):
            assert (tmp_path / split / png).stat().st_size > 1000
        # The corruption suite is opt-in in the library (the CLI and pipeline turn it on).
        assert metrics["robustness"] is None and not (tmp_path / split / "robustness.png").exists()
        roc = json.loads((tmp_path / split / evaluate.ROC_FILE).read_text())
        assert roc["fpr"][0] == 0.0 and roc["tpr"][-1] == 1.0
        assert all(0.0 <= t <= 1.0 for t in roc["thresholds"])
        # The Grad-CAM grid shows what it says: true positives are positives called positive...
        cam = metrics["gradcam"]
        assert cam["path"] == "gradcam.png"
        score, truth = predictions["prob_pneumonia"].to_numpy(), predictions["y_true"].to_numpy()
        kinds = {c["label"]: c["indices"] for c in cam["cases"]}
        thr = metrics["threshold"]
        assert all(truth[i] == 1 and score[i] >= thr for i in kinds["true positive pneumonia"])
        assert all(truth[i] == 0 and score[i] >= thr for i in kinds["false positive pneumonia"])
        assert all(truth[i] == 1 and score[i] < thr for i in kinds["false negative pneumonia"])
        # ... and they are the most confident cases of each kind, recomputed from the CSV.
        probs = predictions[["prob_normal", "prob_pneumonia"]].to_numpy()
        expected = gradcam.select_cases(truth, probs, ["normal", "pneumonia"], thr,
                                        evaluate.GRADCAM_PER_CATEGORY)
        assert kinds == {c["label"].replace("\n", " "): c["indices"] for c in expected}
        assert sum(len(v) for v in kinds.values()) > 0
    scalars = evaluation_report.scalar_metrics(results)
    assert {"val_roc_auc", "test_roc_auc", "test_accuracy", "val_threshold", "test_ece",
            "test_latency_ms", "test_roc_auc_ci_lo", "test_roc_auc_ci_hi"} <= set(scalars)
    assert "| ROC AUC |" in evaluation_report.describe(results)
    page = (tmp_path / evaluate.REPORT_FILE).read_text()
    srcs = re.findall(r'src="data:image/png;base64,([^"]*)"', page)
    # two splits x (confusion, ROC, PR, reliability, Grad-CAM); no robustness chart when off
    assert len(srcs) == 2 * 5
    assert all(base64.b64decode(s).startswith(b"\x89PNG") for s in srcs)
    assert "not a medical device" in page


def _check_threshold_rules(metrics: dict, split: str, out: Path) -> None:
    """Every rule's threshold chosen on val's predictions (worst_group on its group column,
    one group without it), its rates counted on ``split``."""
    val = pd.read_csv(out / "val" / evaluate.PREDICTIONS_FILE)
    rules = metrics["threshold_rules"]
    assert set(rules) == set(artifacts.THRESHOLD_RULES)
    assert rules["balanced"]["threshold"] == 0.5
    assert rules["youden"]["threshold"] == choose_threshold(val["y_true"], val["prob_pneumonia"])
    groups = val.get(artifacts.GROUP_COLUMN)
    assert rules["worst_group"]["threshold"] == choose_threshold(
        val["y_true"], val["prob_pneumonia"], rule="worst_group", groups=groups)
    here = pd.read_csv(out / split / evaluate.PREDICTIONS_FILE)
    y, score = here["y_true"].to_numpy(), here["prob_pneumonia"].to_numpy()
    for rule in artifacts.THRESHOLD_RULES:
        assert set(rules[rule]) == {"threshold", split}
        called = score >= rules[rule]["threshold"]
        assert rules[rule][split]["accuracy"] == pytest.approx(np.mean(called == (y == 1)))
        assert rules[rule][split]["sensitivity"] == pytest.approx(np.mean(called[y == 1]))
        assert rules[rule][split]["specificity"] == pytest.approx(np.mean(~called[y == 0]))


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory, shared_npz) -> Path:
    """A MedMNIST-style file (28 px, train and val keys, no test) of 40 + 30 real images; its
    name keeps PneumoniaMNIST's class names."""
    splits = load_npz(shared_npz)
    path = tmp_path_factory.mktemp("npz") / "pneumoniamnist_small.npz"
    arrays = {}
    for split, n in (("train", 40), ("val", 30)):
        arrays[f"{split}_images"] = splits[split].images[:n, ..., 0]
        arrays[f"{split}_labels"] = splits[split].labels[:n, None]
    np.savez(path, **arrays)
    return path


def test_raw_npz_is_prepared_with_the_models_settings(trained_model, small_npz, tmp_path):
    results = evaluate.evaluate(trained_model, str(small_npz), tmp_path, ["val"],
                                explain=False)
    assert results["val"]["n"] == 30  # the file's own val split, resized to the model's 32 px
    assert results["val"]["gradcam"] is None and not (tmp_path / "val" / "gradcam.png").exists()
    with pytest.raises(data.DataError, match=r"no split\(s\) \['test'\]"):
        evaluate.evaluate(trained_model, str(small_npz), tmp_path / "t", ["test"])


def _external_folder(root: Path, shared_npz: Path, names: dict[int, str], per_class: int,
                     extra: str | None = None) -> dict[str, int]:
    """Real PneumoniaMNIST val images, upscaled to 100 px, in class folders named ``names``
    (label -> folder), optionally plus a folder ``extra`` of further normal images."""
    val = load_npz(shared_npz)["val"]
    counts = {}
    for label, folder in names.items():
        picked = np.flatnonzero(val.labels == label)[:per_class]
        (root / folder).mkdir(parents=True)
        for i in picked:
            Image.fromarray(val.images[i, ..., 0]).resize((100, 100)).save(
                root / folder / f"{i}.png")
        counts[folder] = len(picked)
    if extra:
        (root / extra).mkdir()
        for i in np.flatnonzero(val.labels == 0)[per_class:per_class + 5]:
            Image.fromarray(val.images[i, ..., 0]).save(root / extra / f"{i}.png")
        counts[extra] = 5
    return counts


def test_external_flat_folder_is_one_test_set(trained_model, shared_npz, tmp_path):
    _external_folder(tmp_path / "external", shared_npz, {0: "normal", 1: "pneumonia"}, 15)
    results = evaluate.evaluate(trained_model, str(tmp_path / "external"), tmp_path / "out")
    assert results["test"]["n"] == 30
    assert sum(results["test"]["confusion_matrix"][0]) == 15


def test_class_map_relabels_and_drops(trained_model, shared_npz, tmp_path):
    same = tmp_path / "same"
    _external_folder(same, shared_npz, {0: "normal", 1: "pneumonia"}, 12)
    other = tmp_path / "other_hospital"
    counts = _external_folder(other, shared_npz, {0: "NORMAL", 1: "COVID-19"}, 12,
                              extra="Lung_Opacity")
    assert counts == {"NORMAL": 12, "COVID-19": 12, "Lung_Opacity": 5}
    mapped = evaluate.evaluate(trained_model, str(other), tmp_path / "mapped",
                               class_map="COVID-19=pneumonia, NORMAL=normal,Lung_Opacity=-",
                               explain=False)["test"]
    reference = evaluate.evaluate(trained_model, str(same), tmp_path / "ref",
                                  explain=False)["test"]
    # The same images under other folder names, the extra class left out: identical results.
    assert mapped["n"] == 24 and mapped["dropped"] == 5
    assert mapped["confusion_matrix"] == reference["confusion_matrix"]
    assert mapped["roc_auc"] == pytest.approx(reference["roc_auc"])
    assert mapped["class_map"] == {"COVID-19": "pneumonia", "NORMAL": "normal",
                                   "Lung_Opacity": "-"}
    assert mapped["source_class_names"] == ["COVID-19", "Lung_Opacity", "NORMAL"]
    pred = pd.read_csv(tmp_path / "mapped" / "test" / evaluate.PREDICTIONS_FILE)
    assert pred["y_true"].value_counts().to_dict() == {0: 12, 1: 12}


@pytest.mark.parametrize("class_map, message", [
    ("COVID-19=pneumonia,NORMAL=normal", r"source classes \['Lung_Opacity'\] have no counterpart"),
    ("COVID-19=pneumonia,NORMAL=healthy,Lung_Opacity=-", r"targets \['healthy'\]"),
    ("COVID-19=pneumonia,NORMAL=normal,Lung_Opacity=-,Viral=pneumonia",
     r"names \['Viral'\], which are not classes of the source"),
    ("COVID-19", "is not SOURCE=TARGET"),
])
def test_bad_class_maps_are_refused(trained_model, shared_npz, tmp_path, class_map, message):
    other = tmp_path / "other_hospital"
    _external_folder(other, shared_npz, {0: "NORMAL", 1: "COVID-19"}, 3, extra="Lung_Opacity")
    with pytest.raises(ValueError, match=message):
        evaluate.evaluate(trained_model, str(other), tmp_path / "out", class_map=class_map)
    assert not (tmp_path / "out").exists()


def test_unmapped_folder_names_are_refused(trained_model, tmp_path):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        Image.new("L", (32, 32)).save(tmp_path / "pets" / cls / "a.png")
    with pytest.raises(data.DataError, match="differ from the expected"):
        evaluate.evaluate(trained_model, str(tmp_path / "pets"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_external_data_is_refused_without_leaving_a_stale_report(trained_model, small_dataset,
                                                                 tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="is not SOURCE=TARGET"):  # before any work
        evaluate.evaluate(trained_model, str(small_dataset), out, ["test"],
                          external=str(small_dataset), external_class_map="COVID-19")
    assert not out.exists()
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / cls).mkdir(parents=True)
        Image.new("L", (32, 32)).save(tmp_path / "pets" / cls / "a.png")
    out.mkdir()
    (out / evaluate.REPORT_FILE).write_text("an earlier report of other splits")
    with pytest.raises(data.DataError, match="differ from the expected"):
        evaluate.evaluate(trained_model, str(small_dataset), out, ["test"], explain=False,
                          options=evaluate.EvalOptions(robustness=False),
                          external=str(tmp_path / "pets"))
    # The splits were evaluated; no report shows what they replaced or lacks the external set.
    assert (out / "test" / "metrics.json").is_file()
    assert not (out / evaluate.REPORT_FILE).exists() and not (out / "external").exists()


def test_external_set_merges_splits_and_is_named(trained_model, small_npz, tmp_path):
    results = evaluate.evaluate_external(trained_model, str(small_npz), tmp_path / "eval",
                                         explain=False)
    # The file has train and val but no test split: all 70 images are external data.
    assert list(results) == ["external"] and results["external"]["n"] == 70
    assert results["external"]["source_splits"] == ["train", "val"]
    saved = json.loads((tmp_path / "eval" / "external" / "metrics.json").read_text())
    assert saved["split"] == "external" and saved["data_source"] == str(small_npz)


def test_saved_ensemble_is_evaluated_as_the_mean_of_its_members(
    trained_model, small_dataset, tmp_path
):
    # Two trials of the same trained network under two names: compare's own ensemble writer
    # builds best_model/, and evaluate must read it back.
    trials = []
    for name in ("NetA", "NetB"):
        trial = tmp_path / "trials" / name
        shutil.copytree(trained_model, trial / "model")
        info = json.loads((trial / "model" / "model_info.json").read_text())
        (trial / "model" / "model_info.json").write_text(json.dumps({**info, "model_name": name}))
        evaluate.evaluate(trial / "model", str(small_dataset), trial / "eval", ["val", "test"],
                          explain=False)
        trials.append(selection.load_trial(trial))
    ranked = selection.rank_models(selection.build_table(trials), "val_roc_auc")
    candidate = ensemble.build_ensemble(trials, ranked, "val_roc_auc", k=2)
    best = tmp_path / "best_model"
    ensemble.write_ensemble_model(candidate, trials, best)
    results = evaluate.evaluate(best, str(small_dataset), tmp_path / "out", ["test"])
    single = json.loads((tmp_path / "trials/NetA/eval/test/metrics.json").read_text())
    spec = json.loads((best / artifacts.ENSEMBLE_FILE).read_text())
    assert results["test"]["model_name"] == "Ensemble-top2"
    assert results["test"]["threshold"] == pytest.approx(spec["threshold"])
    mine = pd.read_csv(tmp_path / "out" / "test" / evaluate.PREDICTIONS_FILE)
    theirs = pd.read_csv(tmp_path / "trials/NetA/eval/test" / evaluate.PREDICTIONS_FILE)
    np.testing.assert_allclose(mine["prob_pneumonia"], theirs["prob_pneumonia"], atol=1e-6)
    assert results["test"]["roc_auc"] == pytest.approx(single["roc_auc"])
    assert results["test"]["gradcam"] is None  # no single feature map to explain
    broken = tmp_path / "broken"
    shutil.copytree(best, broken)
    shutil.rmtree(broken / "members" / "NetB")
    with pytest.raises(ModelError, match="member 'NetB' is not a directory in"):
        evaluate.evaluate(broken, str(small_dataset), tmp_path / "b")
    # A member named in ensemble.json cannot be a model elsewhere on disk.
    escaping = tmp_path / "escaping"
    shutil.copytree(best, escaping)
    (escaping / artifacts.ENSEMBLE_FILE).write_text(json.dumps(
        {**spec, "members": ["NetA", "../../trials/NetB/model"]}))
    with pytest.raises(ValueError, match="member '../../trials/NetB/model' is not a directory in"):
        evaluate.evaluate(escaping, str(small_dataset), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_re_evaluation_replaces_splits_whole_and_a_failure_changes_nothing(
    trained_model, small_dataset, tmp_path, monkeypatch
):
    out = tmp_path / "eval"
    evaluate.evaluate(trained_model, str(small_dataset), out, ["val", "test"])
    assert (out / "test" / "gradcam.png").is_file()
    # A val predictions.csv written before the worst_group rule has no group column.
    val_csv = out / "val" / evaluate.PREDICTIONS_FILE
    pd.read_csv(val_csv).drop(columns=artifacts.GROUP_COLUMN).to_csv(val_csv, index=False)
    evaluate.evaluate(trained_model, str(small_dataset), out, ["test"], explain=False)
    assert not (out / "test" / "gradcam.png").exists()  # no stale grid beside "no grid"
    # The rules' thresholds come from the val predictions already in the output.
    _check_threshold_rules(json.loads((out / "test" / "metrics.json").read_text()), "test", out)
    assert (out / "val" / "gradcam.png").is_file()  # a split not re-evaluated is kept
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = evaluate.evaluate_split

    def fails_on_test(predictor, split, name, *args, **kwargs):  # e.g. a full disk
        if name == "test":
            raise OSError("No space left on device")
        return real(predictor, split, name, *args, **kwargs)

    monkeypatch.setattr(evaluate, "evaluate_split", fails_on_test)
    with pytest.raises(OSError, match="No space left"):
        evaluate.evaluate(trained_model, str(small_dataset), out, ["val", "test"])
    # val was evaluated again before the failure, but nothing of it reached the output.
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# --------------------------------------------------------------------------- three classes


@pytest.fixture(scope="module")
def three_class_data(tmp_path_factory, shared_npz) -> Path:
    """Three classes of real chest X-rays from PneumoniaMNIST: ``normal``, and the pneumonia
    images split at their median mean brightness into ``pneumonia_bright`` and
    ``pneumonia_dark``. The brightness split is not a clinical category (the real one would be
    bacterial/viral, which PneumoniaMNIST does not label); it gives real images a third class
    with a learnable difference, to test the 3-class path end to end. 40 train images per class
    from the file's train split; 10 val and 10 other test images per class from its val split;
    as PNG folders."""
    source = load_npz(shared_npz)
    rng = np.random.default_rng(0)

    def brightness(split: data.Split, index: np.ndarray) -> np.ndarray:
        return split.images[index].mean(axis=(1, 2, 3))

    train_sick = np.flatnonzero(source["train"].labels == 1)
    median = np.median(brightness(source["train"], train_sick))  # one cut for every split

    def groups(split: data.Split) -> dict[str, np.ndarray]:
        sick = np.flatnonzero(split.labels == 1)
        bright = brightness(split, sick) >= median
        return {name: rng.permutation(members) for name, members in (
            ("normal", np.flatnonzero(split.labels == 0)),
            ("pneumonia_bright", sick[bright]), ("pneumonia_dark", sick[~bright]))}

    picks = {"train": {k: (source["train"], v[:40]) for k, v in groups(source["train"]).items()}}
    held = groups(source["val"])
    picks["val"] = {k: (source["val"], v[:10]) for k, v in held.items()}
    picks["test"] = {k: (source["val"], v[10:20]) for k, v in held.items()}
    root = tmp_path_factory.mktemp("three") / "folder"
    for split, classes in picks.items():
        for name, (origin, chosen) in classes.items():
            (root / split / name).mkdir(parents=True)
            for i in chosen:
                Image.fromarray(origin.images[i, ..., 0]).save(root / split / name / f"{i}.png")
    prepared = root.parent / "prepared"
    prepare.preprocess(str(root), prepared, image_size=32, seed=0)
    return prepared


@pytest.fixture(scope="module")
def three_class_model(tmp_path_factory, three_class_data) -> Path:
    """VGG16 from scratch, 1 epoch, on the 120 training images above."""
    output = tmp_path_factory.mktemp("model3") / "VGG16"
    train.train(three_class_data, "VGG16", output, epochs=1, weights="none", seed=0)
    return output


def test_three_classes_end_to_end(three_class_model, three_class_data, tmp_path):
    classes = ["normal", "pneumonia_bright", "pneumonia_dark"]
    assert data.read_manifest(three_class_data)["class_names"] == classes
    results = evaluate.evaluate(three_class_model, str(three_class_data), tmp_path / "eval",
                                ["val", "test"])
    test = results["test"]
    assert test["threshold"] is None and "at_0.5" not in test
    assert test["n"] == 30 and np.array(test["confusion_matrix"]).shape == (3, 3)
    assert [test["per_class"][c]["support"] for c in classes] == [10, 10, 10]
    pred = pd.read_csv(tmp_path / "eval" / "test" / evaluate.PREDICTIONS_FILE)
    probs = pred[[f"prob_{c}" for c in classes]].to_numpy()
    assert test["roc_auc"] == pytest.approx(roc_auc_score(pred["y_true"], probs,
                                                          multi_class="ovr"))
    for name in classes:
        assert test["per_class"][name]["ci"]["recall"] is not None
    assert set(test["ci"]) >= {"roc_auc", "balanced_accuracy", "specificity", "ece"}
    assert test["ci"]["ece"] is None  # biased: no percentile interval
    assert not (tmp_path / "eval" / "test" / evaluate.ROC_FILE).exists()  # binary only
    assert len(test["gradcam"]["cases"]) == 9  # TP/FP/FN for each class
    assert (tmp_path / "eval" / "test" / "gradcam.png").stat().st_size > 1000

    # The report on a 3-class trial (plus its ensemble-less comparison).
    trial = tmp_path / "trials" / "VGG16"
    trial.mkdir(parents=True)
    (trial / "model").symlink_to(three_class_model, target_is_directory=True)
    (trial / "eval").symlink_to(tmp_path / "eval", target_is_directory=True)
    summary = report.compare([trial], tmp_path / "report", select_metric="val_balanced_accuracy")
    assert summary["best_model"] == "VGG16" and summary["ensemble"]["skipped"]
    card = (tmp_path / "report" / "model_card.md").read_text()
    assert "| pneumonia_dark | 10 |" in card


def test_three_classes_external_with_class_map(three_class_model, three_class_data, tmp_path):
    test = data.load_split(three_class_data, "test")
    names = {0: "Normal", 1: "Bright", 2: "Dark"}
    for i, (image, label) in enumerate(zip(test.images, test.labels, strict=True)):
        folder = tmp_path / "site2" / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0]).save(folder / f"{i}.png")
    results = evaluate.evaluate_external(
        three_class_model, str(tmp_path / "site2"), tmp_path / "out",
        class_map="Normal=normal,Bright=pneumonia_bright,Dark=pneumonia_dark", explain=False)
    direct = evaluate.evaluate(three_class_model, str(three_class_data), tmp_path / "direct",
                               ["test"], explain=False)
    assert results["external"]["confusion_matrix"] == direct["test"]["confusion_matrix"]
    assert results["external"]["n"] == 30


def test_csv_manifest_with_class_map(trained_model, shared_npz, tmp_path):
    """A CSV manifest (path,label) from another site, its labels mapped onto the model's."""
    counts = _external_folder(tmp_path / "site", shared_npz, {0: "NORMAL", 1: "COVID-19"}, 8)
    rows = ["path,label"] + [f"{p.relative_to(tmp_path / 'site').as_posix()},{p.parent.name}"
                             for p in sorted((tmp_path / "site").rglob("*.png"))]
    (tmp_path / "site" / "labels.csv").write_text("\n".join(rows) + "\n")
    results = evaluate.evaluate(trained_model, str(tmp_path / "site" / "labels.csv"),
                                tmp_path / "out", class_map="NORMAL=normal,COVID-19=pneumonia",
                                explain=False)
    assert results["test"]["n"] == sum(counts.values()) == 16
    assert [sum(row) for row in results["test"]["confusion_matrix"]] == [8, 8]
