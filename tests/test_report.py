"""compare/pair_trials on fake trial dirs that follow the train/evaluate file contract."""

from __future__ import annotations

import base64
import io
import json
import random
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungxray import report
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


def make_trial(
    root: Path,
    name: str,
    scores: dict[str, list[float]],
    *,
    lr: float = 1e-3,
    classes: list[str] = CLASSES,
    labels: dict[str, np.ndarray] | None = None,
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
        "params": 1000 + len(name), "train_seconds": 12.5, "epochs": 3,
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
        m = compute_metrics(y, probs, classes, info["threshold"])
        (d / "metrics.json").write_text(json.dumps({**m, "split": split, "model_name": name}))
        pred = pd.DataFrame({"y_true": y, **{f"prob_{c}": probs[:, i]
                                             for i, c in enumerate(classes)}})
        pred.to_csv(d / "predictions.csv", index=False)
        (d / "confusion_matrix.png").write_bytes(PNG)
        (d / "roc.png").write_bytes(PNG)
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
    assert [r["model_name"] for r in summary["ranking"]] == ["VGG16", "ResNet152V2", "InceptionV3"]
    assert [r["value"] for r in summary["ranking"]] == pytest.approx([1.0, 8 / 9, 6 / 9])
    # The test split would have chosen another model.
    assert summary["best_model_scores"]["test_roc_auc"] == pytest.approx(6 / 9)
    assert json.loads((out / "summary.json").read_text()) == summary


def test_compare_writes_table(trials: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    compare(trials, out)
    df = pd.read_csv(out / "results.csv")
    assert df["model_name"].tolist() == ["VGG16", "ResNet152V2", "InceptionV3"]
    assert df["rank"].tolist() == [1, 2, 3]
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
    # 3 models x (curves + 2 splits x (confusion + roc)) + the bar chart.
    assert len(srcs) == 3 * 5 + 1
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert "href=" not in page and "<script" not in page.lower()
    for name in ("VGG16", "ResNet152V2", "InceptionV3"):
        assert f"<h3 id=\"model-{name}\">{name}</h3>" in page
    assert (out / "metrics_bars.png").read_bytes().startswith(b"\x89PNG")


def test_best_model_is_a_real_copy(trials: list[Path], tmp_path: Path) -> None:
    # Links at both levels (pair_trials' dir link, a linked file inside) must be dereferenced.
    keras = trials[1] / "model" / "model.keras"
    real = tmp_path / "cache" / "weights.bin"
    real.parent.mkdir()
    real.write_bytes(keras.read_bytes())
    keras.unlink()
    keras.symlink_to(real)
    paired = pair_trials([t / "model" for t in trials], [t / "eval" for t in trials], None,
                         tmp_path / "work")
    out = tmp_path / "report"
    compare(paired, out)
    best = out / "best_model"
    assert not best.is_symlink()
    assert (best / "model.keras").read_bytes() == b"fake keras model VGG16"
    assert not (best / "model.keras").is_symlink()
    assert json.loads((best / "model_info.json").read_text())["model_name"] == "VGG16"
    assert sorted(p.name for p in best.iterdir()) == sorted(
        p.name for p in (tmp_path / "trials" / "VGG16" / "model").iterdir())


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
    assert [r["model_name"] for r in summary["ranking"]] == ["Alpha", "Mid", "Zeta"]
    assert [r["rank"] for r in summary["ranking"]] == [1, 2, 3]


def test_undefined_select_metric_ranks_last(tmp_path: Path) -> None:
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


def test_missing_pngs_are_redrawn(trials: list[Path], tmp_path: Path) -> None:
    (trials[0] / "model" / "curves.png").unlink()
    (trials[0] / "eval" / "val" / "roc.png").write_text("not a png")
    compare(trials, tmp_path / "report")
    page = (tmp_path / "report" / "report.html").read_text()
    srcs = re.findall(r'src="data:image/png;base64,([^"]*)"', page)
    assert len(srcs) == 16
    sizes = {len(base64.b64decode(s)) for s in srcs}
    assert max(sizes) > len(PNG)  # real plots were drawn for the two bad images


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
    with pytest.raises(ValueError, match="VGG16"):
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
