"""lungxray.report: compare's folder (tables, report.html/.md, model card) on fake trial dirs that
follow the train/evaluate file contract, built aside and published whole."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lungxray import report
from lungxray.report import compare
from tests.trial_helpers import GOOD, MID, PNG, make_trial, three_trials


@pytest.fixture
def trials(tmp_path: Path) -> list[Path]:
    return three_trials(tmp_path)


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


def test_markdown_table_keeps_our_number_formats_and_escapes_pipes() -> None:
    df = pd.DataFrame({"model_name": ["a|b", "c"], "hp_learning_rate": [1e-5, 3e-4],
                       "val_roc_auc": [0.91234, np.nan]})
    markdown = report.to_markdown(df)
    rows = [r for r in markdown.strip().splitlines() if not set(r) <= set("|-: ")]
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", r)[1:-1]] for r in rows]
    assert cells == [["model_name", "hp_learning_rate", "val_roc_auc"],
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
