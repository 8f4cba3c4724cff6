"""compare/pair_trials on fake trial dirs that follow the train/evaluate file contract."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungxray import report, safeio
from lungxray.errors import ConfigError, ModelError
from lungxray.limits import Limits
from lungxray.metrics import compute_metrics
from lungxray.report import compare, load_trial, pair_trials

CLASSES = ["normal", "pneumonia"]
Y = np.array([0, 0, 0, 1, 1, 1])
# P(pneumonia) per sample. GOOD ranks all positives first (AUC 1); MID mis-ranks one pair
# (AUC 8/9); POOR mis-ranks three pairs (AUC 6/9).
GOOD = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
MID = [0.1, 0.2, 0.75, 0.7, 0.8, 0.9]
POOR = [0.1, 0.85, 0.75, 0.7, 0.8, 0.9]


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


PNG = _png_bytes()


_METRICS: dict[tuple, dict] = {}


def _metrics(y: np.ndarray, probs: np.ndarray, classes: list[str],
             threshold: float | None) -> dict:
    """compute_metrics, once per distinct input: it is deterministic (seeded bootstrap), and its
    1000 resamples made building the fake trials most of this module's run time."""
    key = (y.tobytes(), probs.tobytes(), probs.shape, tuple(classes), threshold)
    if key not in _METRICS:
        _METRICS[key] = compute_metrics(y, probs, classes, threshold)
    return _METRICS[key]


def make_trial(
    root: Path,
    name: str,
    scores: dict[str, list[float]],
    *,
    lr: float = 1e-3,
    classes: list[str] = CLASSES,
    labels: dict[str, np.ndarray] | None = None,
    info_extra: dict | None = None,
) -> Path:
    """Write ``root/name/{model,eval}`` exactly as train and evaluate do."""
    trial = root / name
    model = trial / "model"
    model.mkdir(parents=True)
    binary = len(classes) == 2
    info = {
        "model_name": name, "class_names": classes, "positive_class": 1 if binary else None,
        "threshold": 0.5 if binary else None, "threshold_method": "youden" if binary else None,
        "image_size": 32, "input_size": 32, "channels": 1, "weights": "none",
        "hparams": {"learning_rate": lr, "dropout": 0.3, "dense": {"units": 64}},
        "params": 1000 + len(name), "train_seconds": 12.5, "epochs": 3, **(info_extra or {}),
    }
    (model / "model_info.json").write_text(json.dumps(info))
    (model / "model.keras").write_bytes(f"fake keras model {name}".encode())
    history = {k: [0.5, 0.6, 0.7] for k in
               ("loss", "val_loss", "accuracy", "val_accuracy", "auc", "val_auc")}
    phases = [{"name": "head", "epochs": 2}, {"name": "finetune", "epochs": 1}]
    (model / "history.json").write_text(json.dumps({"history": history, "phases": phases}))
    (model / "curves.png").write_bytes(PNG)
    for split, s in scores.items():
        y = labels[split] if labels and split in labels else Y
        probs = np.asarray(s, dtype=float)
        if probs.ndim == 1:
            probs = np.column_stack([1 - probs, probs])
        d = trial / "eval" / split
        d.mkdir(parents=True)
        m = _metrics(y, probs, classes, info["threshold"])
        (d / "metrics.json").write_text(json.dumps({**m, "split": split, "model_name": name}))
        pred = pd.DataFrame({"y_true": y, **{f"prob_{c}": probs[:, i]
                                             for i, c in enumerate(classes)}})
        pred.to_csv(d / "predictions.csv", index=False)
        for plot in ("confusion_matrix", "roc", "pr", "reliability"):
            (d / f"{plot}.png").write_bytes(PNG)
    return trial


@pytest.fixture
def trials(tmp_path: Path) -> list[Path]:
    # Validation picks VGG16; test alone would pick ResNet152V2.
    root = tmp_path / "trials"
    return [
        make_trial(root, "ResNet152V2", {"val": MID, "test": GOOD}, lr=1e-4),
        make_trial(root, "VGG16", {"val": GOOD, "test": POOR}, lr=1e-3),
        make_trial(root, "InceptionV3", {"val": POOR, "test": MID}, lr=3e-4),
    ]


def test_compare_selects_on_validation_not_test(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    summary = compare(trials, out)
    assert summary["best_model"] == "VGG16"
    assert summary["select_metric"] == "val_roc_auc"
    assert summary["select_value"] == pytest.approx(1.0)
    # The top-2 ensemble (VGG16 + ResNet152V2) ties VGG16 at 1.0; the single model wins the tie.
    assert [r["model_name"] for r in summary["ranking"]] == [
        "VGG16", "Ensemble-top2", "ResNet152V2", "InceptionV3"]
    assert [r["value"] for r in summary["ranking"]] == pytest.approx([1.0, 1.0, 8 / 9, 6 / 9])
    assert summary["best_is_ensemble"] is False
    # The test split would have chosen another model.
    assert summary["best_model_scores"]["test_roc_auc"] == pytest.approx(6 / 9)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_compare_writes_table(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    df = pd.read_csv(out / "results.csv")
    assert df["model_name"].tolist() == ["VGG16", "Ensemble-top2", "ResNet152V2", "InceptionV3"]
    assert df["rank"].tolist() == [1, 2, 3, 4]
    assert df["members"].fillna("").tolist() == ["", "VGG16+ResNet152V2", "", ""]
    for col in ("weights", "params", "train_seconds", "hp_learning_rate", "hp_dropout",
                "hp_dense_units", "val_accuracy", "val_roc_auc", "val_sensitivity",
                "val_specificity", "val_threshold", "test_roc_auc", "test_f1", "test_precision"):
        assert col in df.columns, col
    vgg = df.set_index("model_name").loc["VGG16"]
    assert vgg["hp_learning_rate"] == pytest.approx(1e-3)
    assert vgg["test_roc_auc"] == pytest.approx(6 / 9)
    # POOR at threshold 0.5: two false positives (negatives at 0.85 and 0.75) -> 4/6 correct.
    assert vgg["test_accuracy"] == pytest.approx(4 / 6)
    md = (out / "results.md").read_text()
    assert md.startswith("|")
    assert "VGG16" in md and "val_roc_auc" in md
    assert md.index("VGG16") < md.index("ResNet152V2") < md.index("InceptionV3")


def test_report_html_is_self_contained(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    page = (out / "report.html").read_text()
    assert "Best model: VGG16" in page
    assert "chosen on validation, never on test" in page
    srcs = re.findall(r'src\s*=\s*["\']([^"\']*)', page)
    # 3 models x (curves + 2 splits x (confusion, roc, pr, reliability)), the ensemble's 2 x 4
    # (no curves, no Grad-CAM), bar chart, 2 ROC overlays, training curves side by side.
    assert len(srcs) == 3 * 9 + 8 + 4
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "href=" not in page and "<script" not in page.lower()
    for name in ("VGG16", "ResNet152V2", "InceptionV3"):
        assert f"<h3 id=\"model-{name}\">{name}</h3>" in page
    assert (out / "metrics_bars.png").read_bytes().startswith(b"\x89PNG")


def test_best_model_is_a_real_copy(trials: list[Path], tmp_path: Path) -> None:
    # Links at both levels (pair_trials' dir link, a link to a file inside model/) are
    # dereferenced: best_model/ holds regular files only.
    model = trials[1] / "model"
    (model / "inner.bin").write_bytes(b"inner")
    (model / "alias.bin").symlink_to(model / "inner.bin")
    paired = pair_trials([t / "model" for t in trials], [t / "eval" for t in trials], None,
                         tmp_path / "work")
    out = tmp_path / "report"
    compare(paired, out)
    best = out / "best_model"
    assert not best.is_symlink()
    assert (best / "model.keras").read_bytes() == b"fake keras model VGG16"
    assert (best / "alias.bin").read_bytes() == b"inner"
    assert not any(p.is_symlink() for p in best.rglob("*"))
    assert json.loads((best / "model_info.json").read_text())["model_name"] == "VGG16"
    assert sorted(p.name for p in best.iterdir()) == sorted(
        p.name for p in (tmp_path / "trials" / "VGG16" / "model").iterdir())


@pytest.mark.parametrize("target", ["outside", "/dev/zero"])
def test_best_model_never_follows_a_link_out(trials: list[Path], tmp_path: Path,
                                             target: str) -> None:
    # Issue 26: a link in model/ to a file outside was copied into best_model/; /dev/zero
    # filled the disk. Refused in one line, nothing written, the fixed trial then compares.
    keras = trials[1] / "model" / "model.keras"
    original = keras.read_bytes()
    outside = tmp_path / "secret.txt"
    outside.write_text("not part of the model")
    keras.unlink()
    keras.symlink_to(outside if target == "outside" else Path(target))
    out = tmp_path / "report"
    with pytest.raises(ModelError, match="model.keras' links outside the folder"):
        compare(trials, out)
    assert not out.exists()
    assert not list(tmp_path.glob(".report.build-*"))
    if target == "outside":  # the corrected trial compares (once: a compare takes ~10 s)
        keras.unlink()
        keras.write_bytes(original)
        assert compare(trials, out)["best_model"] == "VGG16"


def test_copy_model_folder_bounds(tmp_path: Path) -> None:
    source = tmp_path / "model"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "w.bin").write_bytes(b"x" * 1000)
    os.mkfifo(source / "pipe")
    with pytest.raises(ModelError, match="'pipe' is not a regular file"):
        safeio.copy_model_folder(source, tmp_path / "a")
    (source / "pipe").unlink()
    (source / "loop").symlink_to(source / "sub", target_is_directory=True)
    with pytest.raises(ModelError, match="is a link to a folder"):
        safeio.copy_model_folder(source, tmp_path / "a")
    (source / "loop").unlink()
    with pytest.raises(ModelError, match="holds more than 999 bytes"):
        safeio.copy_model_folder(source, tmp_path / "a", Limits(max_model_folder_bytes=999))
    assert not (tmp_path / "a").exists()
    safeio.copy_model_folder(source, tmp_path / "a")
    assert (tmp_path / "a" / "sub" / "w.bin").read_bytes() == b"x" * 1000


def test_select_on_test_is_refused(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="never select on the test split"):
        compare(trials, out, select_metric="test_roc_auc")
    with pytest.raises(ValueError, match="val_"):
        compare(trials, out, select_metric="roc_auc")
    with pytest.raises(ValueError, match="not one of"):
        compare(trials, out, select_metric="val_threshold")
    assert not out.exists()


def test_lower_is_better_metric(trials: list[Path], tmp_path: Path) -> None:
    briers = {t.name: np.mean((np.array(s) - Y) ** 2)
              for t, s in zip(trials, (MID, GOOD, POOR), strict=True)}
    summary = compare(trials, tmp_path / "report", select_metric="val_brier")
    assert summary["best_model"] == min(briers, key=briers.get)
    assert summary["select_value"] == pytest.approx(min(briers.values()))


def test_ties_are_broken_by_name(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, n, {"val": GOOD, "test": GOOD}) for n in ("Zeta", "Alpha", "Mid")]
    summary = compare(dirs, tmp_path / "report")
    # Single models before the (equally good) ensemble, then by name.
    assert [r["model_name"] for r in summary["ranking"]] == ["Alpha", "Mid", "Zeta",
                                                             "Ensemble-top2"]
    assert [r["rank"] for r in summary["ranking"]] == [1, 2, 3, 4]


@pytest.mark.parametrize(("metric", "values", "expected"), [
    ("val_roc_auc", [0.9, None, 0.95], ["C", "A", "B"]),  # higher is better
    ("val_brier", [0.2, None, 0.1], ["C", "A", "B"]),  # lower is better
])
def test_undefined_select_metric_ranks_last(metric, values, expected) -> None:
    table = pd.DataFrame({"model_name": ["A", "B", "C"], metric: values})
    assert report.rank_models(table, metric)["model_name"].tolist() == expected


def test_a_metric_undefined_for_every_trial_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    labels = {"val": np.zeros(6, dtype=int)}
    a = make_trial(root, "A", {"val": GOOD, "test": GOOD}, labels=labels)
    with pytest.raises(ValueError, match="undefined for every trial"):
        compare([a], tmp_path / "report")


def test_model_names_are_escaped(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    evil = "Net<b>&'x"
    dirs = [make_trial(root, evil, {"val": GOOD}), make_trial(root, "Plain", {"val": MID})]
    compare(dirs, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Net&lt;b&gt;&amp;" in page
    assert "Net<b>" not in page


def _section_images(page: str, name: str) -> list[bytes]:
    section = page.split(f'<h3 id="model-{name}">')[1].split("</section>")[0]
    return [base64.b64decode(b) for b in re.findall(r'src="data:image/png;base64,([^"]*)"',
                                                     section)]


def test_missing_pngs_are_redrawn(trials: list[Path], tmp_path: Path) -> None:
    (trials[0] / "model" / "curves.png").unlink()
    (trials[0] / "eval" / "val" / "roc.png").write_text("not a png")
    (trials[1] / "eval" / "test" / "reliability.png").unlink()  # an older evaluate's output
    compare(trials, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    # Per model: curves, then per split confusion matrix, ROC, PR, reliability.
    vgg, resnet = _section_images(page, "VGG16"), _section_images(page, "ResNet152V2")
    assert len(vgg) == len(resnet) == 9
    assert vgg[0] == PNG and vgg[1] == PNG and vgg[2] == PNG  # the trial's own files, as is
    assert resnet[1] == PNG  # its confusion matrix was fine
    for redrawn in (resnet[0], resnet[2]):  # curves deleted, val ROC corrupt: drawn from data
        assert redrawn.startswith(b"\x89PNG") and len(redrawn) > 5000
    assert len(vgg[8]) > 5000 and vgg[7] == PNG  # test reliability drawn, test PR as is


def test_multiclass_trials(tmp_path: Path) -> None:
    classes = ["normal", "bacterial", "viral"]
    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3) * 0.7 + 0.1
    good = eye[y]
    bad = eye[(y + 1) % 3]
    labels = {"val": y, "test": y}
    root = tmp_path / "trials"
    dirs = [make_trial(root, "Good", {"val": good, "test": bad}, classes=classes, labels=labels),
            make_trial(root, "Bad", {"val": bad, "test": good}, classes=classes, labels=labels)]
    summary = compare(dirs, tmp_path / "report", select_metric="val_accuracy")
    assert summary["best_model"] == "Good"
    df = pd.read_csv(tmp_path / "report" / "results.csv")
    assert df["val_threshold"].isna().all()


def test_load_trial_names_missing_file(trials: list[Path]) -> None:
    (trials[1] / "eval" / "test" / "predictions.csv").unlink()
    with pytest.raises(FileNotFoundError, match=r"predictions\.csv.*VGG16"):
        load_trial(trials[1])
    (trials[2] / "model" / "history.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"history\.json.*InceptionV3"):
        load_trial(trials[2])


def test_load_trial_reads_contract(trials: list[Path]) -> None:
    t = load_trial(trials[1])
    assert t["model_info"]["model_name"] == "VGG16"
    assert list(t["splits"]) == ["val", "test"]
    assert t["phases"][1]["name"] == "finetune"
    assert t["tune_dir"] is None
    assert t["splits"]["val"]["metrics"]["roc_auc"] == pytest.approx(1.0)


def test_failure_leaves_no_half_report(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    (trials[2] / "eval" / "val" / "metrics.json").unlink()
    with pytest.raises(FileNotFoundError):
        compare(trials, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["trials"]


def test_failure_while_writing_keeps_previous_report(
    trials: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    before = (out / "report.html").read_text()

    def boom(*args: object, **kwargs: object) -> str:
        raise RuntimeError("render failed")

    monkeypatch.setattr(report, "_report_html", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        compare(trials, out, select_metric="val_accuracy")
    assert (out / "report.html").read_text() == before
    assert json.loads((out / "summary.json").read_text())["select_metric"] == "val_roc_auc"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "trials"]


def test_rerun_replaces_report_but_not_foreign_dirs(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    compare(trials, out, select_metric="val_accuracy")
    assert json.loads((out / "summary.json").read_text())["select_metric"] == "val_accuracy"
    foreign = tmp_path / "precious"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        compare(trials, foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_different_validation_data_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": GOOD})
    b = make_trial(root, "B", {"val": GOOD}, labels={"val": np.array([0, 0, 1, 1, 1, 1])})
    with pytest.raises(ValueError, match="same data"):
        compare([a, b], tmp_path / "report")


def test_duplicate_trial_names_are_refused(tmp_path: Path) -> None:
    a = make_trial(tmp_path / "one", "VGG16", {"val": GOOD})
    b = make_trial(tmp_path / "two", "VGG16", {"val": MID})
    with pytest.raises(ValueError,
                       match=r"duplicate model names across trial dirs: \['VGG16'\]"):
        compare([a, b], tmp_path / "report")


# --------------------------------------------------------------------------- pair_trials


def test_pair_trials_shuffled(trials: list[Path], tmp_path: Path) -> None:
    models = [t / "model" for t in trials]
    evals = [t / "eval" for t in trials]
    random.Random(1).shuffle(models)
    evals.reverse()
    paired = pair_trials(models, evals, None, tmp_path / "work")
    assert [p.name for p in paired] == ["InceptionV3", "ResNet152V2", "VGG16"]
    for p in paired:
        assert (p / "model").resolve() == (tmp_path / "trials" / p.name / "model").resolve()
        assert (p / "eval").resolve() == (tmp_path / "trials" / p.name / "eval").resolve()
        assert not (p / "tune").exists()
        assert load_trial(p)["model_info"]["model_name"] == p.name
    assert compare(paired, tmp_path / "report")["best_model"] == "VGG16"


def test_pair_trials_with_tune_dirs(trials: list[Path], tmp_path: Path) -> None:
    tunes = []
    for t in trials[:2]:
        d = tmp_path / "tune" / f"out-{len(tunes)}"
        d.mkdir(parents=True)
        (d / "best_hparams.json").write_text(json.dumps({"model_name": t.name, "hparams": {}}))
        tunes.append(d)
    paired = pair_trials([t / "model" for t in trials], [t / "eval" for t in trials],
                         list(reversed(tunes)), tmp_path / "work")
    by_name = {p.name: p for p in paired}
    assert (by_name["ResNet152V2"] / "tune").resolve() == tunes[0].resolve()
    assert (by_name["VGG16"] / "tune").resolve() == tunes[1].resolve()
    assert not (by_name["InceptionV3"] / "tune").exists()


def test_pair_trials_duplicates(trials: list[Path], tmp_path: Path) -> None:
    models = [t / "model" for t in trials] + [trials[1] / "model"]
    with pytest.raises(ValueError, match="duplicate.*VGG16"):
        pair_trials(models, [t / "eval" for t in trials], None, tmp_path / "work")
    evals = [t / "eval" for t in trials] + [trials[0] / "eval"]
    with pytest.raises(ValueError, match="duplicate.*ResNet152V2"):
        pair_trials([t / "model" for t in trials], evals, None, tmp_path / "work")


def test_pair_trials_unmatched(trials: list[Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="models without evaluation.*InceptionV3"):
        pair_trials([t / "model" for t in trials], [t / "eval" for t in trials[:2]], None,
                    tmp_path / "work")
    with pytest.raises(ValueError, match="evaluations without model.*VGG16"):
        pair_trials([trials[0] / "model"], [t / "eval" for t in trials[:2]], None,
                    tmp_path / "work")
    assert not (tmp_path / "work").exists()


def test_markdown_without_tabulate(monkeypatch: pytest.MonkeyPatch) -> None:
    df = pd.DataFrame({"model_name": ["a|b", "c"], "hp_learning_rate": [1e-5, 3e-4],
                       "val_roc_auc": [0.91234, np.nan]})
    with_tabulate = report.to_markdown(df)
    monkeypatch.setitem(sys.modules, "tabulate", None)  # makes `import tabulate` fail
    plain = report.to_markdown(df)

    def cells(md: str) -> list[list[str]]:
        rows = [r for r in md.strip().splitlines() if not set(r) <= set("|-: ")]
        return [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]

    assert cells(plain) == cells(with_tabulate)
    assert cells(plain) == [["model_name", "hp_learning_rate", "val_roc_auc"],
                            ["a\\|b", "1e-05", "0.9123"], ["c", "0.0003", "—"]]


def test_precreated_empty_output_dir_is_used(trials: list[Path], tmp_path: Path) -> None:
    # KFP may create the output artifact's directory before the component runs.
    out = tmp_path / "artifacts" / "report"
    out.mkdir(parents=True)
    compare(trials, out)
    assert (out / "report.html").is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == ["report"]


# --------------------------------------------------------------------------- CIs and outputs


def test_table_has_cis_latency_and_size(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out, ensemble_k=0)
    df = pd.read_csv(out / "results.csv").set_index("model_name")
    for name in ("VGG16", "ResNet152V2", "InceptionV3"):
        for split in ("val", "test"):
            saved = json.loads((tmp_path / "trials" / name / "eval" / split / "metrics.json")
                               .read_text())
            for metric in ("roc_auc", "sensitivity", "specificity", "brier"):
                lo, hi = saved["ci"][metric]
                assert df.loc[name, f"{split}_{metric}_ci_lo"] == pytest.approx(lo)
                assert df.loc[name, f"{split}_{metric}_ci_hi"] == pytest.approx(hi)
        size = (tmp_path / "trials" / name / "model" / "model.keras").stat().st_size
        assert df.loc[name, "size_mb"] == pytest.approx(size / 1e6, abs=1e-3)
    # The fake trials carry no latency (older evaluate output): missing, not zero.
    assert df["latency_ms"].isna().all()
    page = (out / "report.html").read_text()
    vgg_test = json.loads((tmp_path / "trials/VGG16/eval/test/metrics.json").read_text())
    lo, hi = vgg_test["ci"]["roc_auc"]
    assert f"{vgg_test['roc_auc']:.4f} [{lo:.4f}, {hi:.4f}]" in page
    assert f"{vgg_test['roc_auc']:.4f} [{lo:.4f}, {hi:.4f}]" in (out / "report.md").read_text()


def test_report_md_and_model_card(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    md = (out / "report.md").read_text()
    assert "**Best model: VGG16**" in md and "not a medical device" in md
    assert "### val (n=6" in md and "### test (n=6" in md
    card = (out / "model_card.md").read_text()
    assert card.startswith("# Model card: VGG16")
    for heading in ("## Intended use", "## Data", "## Limitations", "## Model details"):
        assert heading in card
    assert card.lower().count("not a medical device") >= 2
    test = json.loads((tmp_path / "trials/VGG16/eval/test/metrics.json").read_text())
    lo, hi = test["ci"]["sensitivity"]
    assert f"| Sensitivity (recall) | {test['sensitivity']:.4f} | {lo:.4f} – {hi:.4f} |" in card
    assert "Not externally validated" in card
    assert "normal 3, pneumonia 3" in card  # counts from predictions.csv


# --------------------------------------------------------------------------- ensemble

# A and B each mis-rank one (negative, positive) pair on validation (AUC 8/9); their mean ranks
# every positive above every negative (AUC 1), so the ensemble wins on validation.
ENS_A = [0.1, 0.2, 0.65, 0.6, 0.8, 0.9]
ENS_B = [0.1, 0.55, 0.2, 0.5, 0.7, 0.9]


def test_ensemble_is_the_members_mean_with_its_own_val_threshold(
    trials: list[Path], tmp_path: Path
) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    ens_val = json.loads((out / "ensemble" / "val" / "metrics.json").read_text())
    ens_test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    # Top 2 on val_roc_auc: VGG16 (GOOD) and ResNet152V2 (MID). Mean on val:
    # [.1, .2, .525, .7, .8, .9] -> perfect split, most conservative threshold 0.7.
    assert ens_val["threshold"] == pytest.approx(0.7)
    assert ens_val["roc_auc"] == pytest.approx(1.0)
    # Mean on test of POOR (VGG16) and GOOD (ResNet152V2): [.1, .525, .525, .7, .8, .9];
    # at 0.7 every sample is right.
    assert ens_test["threshold"] == pytest.approx(0.7)
    assert ens_test["confusion_matrix"] == [[3, 0], [0, 3]]
    preds = pd.read_csv(out / "ensemble" / "test" / "predictions.csv")
    assert preds["prob_pneumonia"].tolist() == pytest.approx([.1, .525, .525, .7, .8, .9])
    assert ens_test["ci"]["roc_auc"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ensemble"]["members"] == ["VGG16", "ResNet152V2"]


def test_winning_ensemble_becomes_best_model(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, "A", {"val": ENS_A, "test": ENS_A}),
            make_trial(root, "B", {"val": ENS_B, "test": ENS_B}),
            make_trial(root, "C", {"val": POOR, "test": POOR})]
    out = tmp_path / "report"
    summary = compare(dirs, out)
    assert summary["best_model"] == "Ensemble-top2" and summary["best_is_ensemble"]
    assert summary["select_value"] == pytest.approx(1.0)
    best = out / "best_model"
    spec = json.loads((best / "ensemble.json").read_text())
    assert spec["members"] == ["A", "B"] and spec["kind"] == "mean_probability"
    assert spec["class_names"] == CLASSES and spec["image_size"] == 32
    # Threshold chosen on the ensemble's own val probabilities (both classes perfectly split:
    # negatives up to 0.425, positives from 0.55 -> the highest perfect threshold is 0.55).
    assert spec["threshold"] == pytest.approx(0.55)
    for name in ("A", "B"):
        member = best / "members" / name
        assert (member / "model.keras").read_bytes() == f"fake keras model {name}".encode()
        assert json.loads((member / "model_info.json").read_text())["model_name"] == name
    assert json.loads((best / "model_info.json").read_text()) == spec
    assert (out / "model_card.md").read_text().startswith("# Model card: Ensemble-top2")


def test_ensemble_threshold_can_target_a_sensitivity(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    dirs = [make_trial(root, "A", {"val": ENS_A}), make_trial(root, "B", {"val": ENS_B})]
    summary = compare(dirs, tmp_path / "report", ensemble_k=2, target_sensitivity=0.6)
    # Ensemble val positives score .55, .75, .9: sensitivity 2/3 >= 0.6 first at 0.75.
    assert summary["ensemble"]["threshold"] == pytest.approx(0.75)
    assert summary["ensemble"]["target_sensitivity"] == 0.6
    with pytest.raises(ValueError, match="target_sensitivity"):
        compare(dirs, tmp_path / "r2", target_sensitivity=1.5)
    # Members whose thresholds were chosen for a target sensitivity pass it on.
    extra = {"threshold_method": "sensitivity>=0.6"}
    dirs = [make_trial(root / "t", "A", {"val": ENS_A}, info_extra=extra),
            make_trial(root / "t", "B", {"val": ENS_B}, info_extra=extra)]
    inherited = compare(dirs, tmp_path / "r3")["ensemble"]
    assert inherited["threshold"] == pytest.approx(0.75)
    assert inherited["threshold_method"] == "sensitivity>=0.6"


def test_ensemble_skipped_with_reason(tmp_path: Path) -> None:
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": ENS_A})
    # Same labels, other order: rows of the two predictions.csv do not describe the same images.
    b = make_trial(root, "B", {"val": ENS_B}, labels={"val": np.array([1, 0, 0, 0, 1, 1])})
    summary = compare([a, b], tmp_path / "report")
    assert "same order" in summary["ensemble"]["skipped"]
    # B on its labels: positive 0.1 loses to all three negatives -> AUC 6/9, below A's 8/9.
    assert [r["model_name"] for r in summary["ranking"]] == ["A", "B"]
    assert not (tmp_path / "report" / "ensemble").exists()
    assert compare([a], tmp_path / "r1")["ensemble"] == {"skipped": "only one model"}
    off = compare([a, b], tmp_path / "r0", ensemble_k=0)["ensemble"]["skipped"]
    assert "ensemble_k=0" in off
    page = (tmp_path / "r0" / "report.html").read_text()
    assert "No ensemble candidate" in page


def test_ensemble_multiclass(tmp_path: Path) -> None:
    classes = ["normal", "bacterial", "viral"]
    y = np.array([0, 1, 2, 0, 1, 2])
    eye = np.eye(3) * 0.7 + 0.1
    labels = {"val": y, "test": y}
    root = tmp_path / "trials"
    dirs = [make_trial(root, "Good", {"val": eye[y], "test": eye[y]}, classes=classes,
                       labels=labels),
            make_trial(root, "Bad", {"val": eye[(y + 1) % 3], "test": eye[y]}, classes=classes,
                       labels=labels)]
    summary = compare(dirs, tmp_path / "report", select_metric="val_accuracy")
    assert summary["best_model"] == "Good"
    ens = json.loads((tmp_path / "report/ensemble/val/metrics.json").read_text())
    assert ens["threshold"] is None
    # Mean of the right one-hot-ish rows and the shifted ones: true class .45, next class .45,
    # the third .1 -> argmax ties go to the lower index.
    expected = (eye[y] + eye[(y + 1) % 3]) / 2
    pred = expected.argmax(axis=1)
    assert ens["accuracy"] == pytest.approx(np.mean(pred == y))
    assert set(ens["per_class"]) == set(classes)
    assert ens["per_class"]["viral"]["ci"]["recall"] is not None


def test_a_failed_copy_fallback_puts_the_previous_report_back(tmp_path, monkeypatch):
    """On a mount that cannot rename directories the report is copied; if that copy fails
    half-way, the previous report comes back whole and no partial one is left."""
    output, build = tmp_path / "report", tmp_path / ".report.build"
    output.mkdir()
    (output / "summary.json").write_text("old summary")
    build.mkdir()
    for name in ("a_chart.png", "summary.json", "report.html"):
        (build / name).write_text(f"new {name}")
    real_replace, real_copy = report.os.replace, report.shutil.copy2

    def no_dir_rename(src, dst):
        if Path(src) == build:
            raise OSError("Operation not supported")
        return real_replace(src, dst)

    def disk_full_after_first(src, dst):
        if Path(src).name != "a_chart.png":
            raise OSError("No space left on device")
        return real_copy(src, dst)

    monkeypatch.setattr(report.os, "replace", no_dir_rename)
    monkeypatch.setattr(report.shutil, "copy2", disk_full_after_first)
    with pytest.raises(OSError, match="No space left"):
        report._publish(build, output)
    assert sorted(p.name for p in output.iterdir()) == ["summary.json"]
    assert (output / "summary.json").read_text() == "old summary"
    assert [p.name for p in tmp_path.iterdir() if ".old-" in p.name] == []


def _add_robustness(trial: Path, split: str, corrupted: list[float]) -> None:
    """What evaluate writes for the corruption suite: the clean rows are the split's own
    predictions, every corruption x severity gives ``corrupted`` (and invert reverses them)."""
    from lungxray import robustness

    d = trial / "eval" / split
    preds = pd.read_csv(d / "predictions.csv")
    clean = preds["prob_pneumonia"].to_numpy()
    frames = []
    for name, severity in [("clean", 0)] + [(c, s) for c in ("blur", "invert") for s in (1, 2, 3)]:
        p = clean if name == "clean" else 1 - clean if name == "invert" else np.asarray(corrupted)
        frames.append(pd.DataFrame({"row": range(len(p)), "y_true": preds["y_true"],
                                    "corruption": name, "severity": severity,
                                    "prob_normal": 1 - p, "prob_pneumonia": p}))
    table = pd.concat(frames, ignore_index=True)
    table.to_csv(d / "robustness_predictions.csv", index=False)
    summary = robustness.summarize(table, CLASSES)
    metrics = json.loads((d / "metrics.json").read_text())
    metrics.update({"robustness": summary, "robust_auc": summary["mean_corrupted_auc"],
                    "worst_corrupted_auc": summary["worst_corrupted_auc"],
                    "robust_auc_drop": summary["drop"]})
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_selection_on_robust_auc_and_the_ensembles_robustness(tmp_path: Path) -> None:
    # A is best on clean validation but collapses under corruption; B holds up.
    root = tmp_path / "trials"
    a = make_trial(root, "A", {"val": GOOD, "test": GOOD})
    b = make_trial(root, "B", {"val": MID, "test": MID})
    for split in ("val", "test"):
        _add_robustness(a, split, POOR)
        _add_robustness(b, split, MID)
    assert compare([a, b], tmp_path / "clean")["best_model"] == "A"
    out = tmp_path / "robust"
    summary = compare([a, b], out, select_metric="val_robust_auc")
    # Ensemble: the members' corrupted scores averaged row by row -> AUC 8/9, tying B, and a
    # single model wins a tie.
    assert [r["model_name"] for r in summary["ranking"]] == ["B", "Ensemble-top2", "A"]
    assert [r["value"] for r in summary["ranking"]] == pytest.approx([8 / 9, 8 / 9, 6 / 9])
    ens = json.loads((out / "ensemble" / "val" / "metrics.json").read_text())
    assert ens["robustness"]["auc"]["blur"]["2"] == pytest.approx(8 / 9)
    assert ens["robust_auc_drop"] == pytest.approx(1 - 8 / 9)
    assert (out / "ensemble" / "val" / "robustness.png").is_file()
    # Calibrated on its own val scores: the ensemble reports a label-free test prevalence.
    ens_test = json.loads((out / "ensemble" / "test" / "metrics.json").read_text())
    assert 0 < ens_test["prevalence_em"] < 1 and ens_test["prevalence"] == 0.5
    lowest = compare([a, b], tmp_path / "drop", select_metric="val_robust_auc_drop")
    assert lowest["best_model"] == "B"  # B loses nothing; lower is better
    page = (out / "report.html").read_text()
    assert "Robustness to acquisition shift" in page and "robust AUC" in page
    assert (out / "robustness_val.png").is_file()
    card = (out / "model_card.md").read_text()
    assert "## Robustness to acquisition shift" in card
    assert "| blur | 0.8889 | 0.8889 | 0.8889 |" in card
    for metric in ("val_prevalence_em", "val_deploy_ppv", "test_robust_auc"):
        with pytest.raises(ConfigError):
            report.check_select_metric(metric)
