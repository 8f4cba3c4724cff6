"""The refit component's wiring: artifacts to paths and back, metadata and metrics. Its
training path runs in tests/pipelines/test_local_run.py (the whole pipeline) and
tests/test_refit.py (the library and `lungxray refit`)."""

from __future__ import annotations

from pathlib import Path

from kfp.dsl import HTML, Dataset, Markdown, Metrics, Model

from components.refit import refit
from lungxray import artifacts
from tests.component_helpers import artifact


def _run(carved: Path, pick: Path, tmp_path: Path, enabled: bool) -> dict:
    inputs = {}
    for name, cls, text in (("report_in", HTML, "<html><body>compare</body></html>"),
                            ("summary_in", Markdown, "# Report\n"),
                            ("model_card_in", Markdown, "# Model card\n")):
        inputs[name] = artifact(cls, tmp_path, name)
        Path(inputs[name].path).write_text(text)
    best = Model(name="best_model", uri=str(pick))
    best.metadata.update({"model_name": "SmallCNN", "ensemble": False})
    outputs = {"model": artifact(Model, tmp_path, "model"),
               "report": artifact(HTML, tmp_path, "report"),
               "summary": artifact(Markdown, tmp_path, "summary"),
               "model_card": artifact(Markdown, tmp_path, "model_card"),
               "metrics": artifact(Metrics, tmp_path, "metrics")}
    refit(dataset=Dataset(name="dataset", uri=str(carved)), best_model=best, **inputs,
          **outputs, refit=enabled, epochs=1)
    return outputs


def test_refit_off_ships_a_copy_of_the_pick_and_says_so(carved, pick, tmp_path):
    outputs = _run(carved, pick, tmp_path, enabled=False)
    assert outputs["model"].metadata == {"model_name": "SmallCNN", "ensemble": False,
                                         "refit": False}
    title = artifacts.REFIT_SECTION_TITLE
    assert title in Path(outputs["model_card"].path).read_text()
    assert Path(outputs["report"].path).read_text().startswith("<html><body>compare<h2>")
    assert ((Path(outputs["model"].path) / artifacts.MODEL_FILE).read_bytes()
            == (pick / artifacts.MODEL_FILE).read_bytes())
    assert outputs["metrics"].metadata == {"refit": 0.0, "refit_added_images": 0.0}
    assert "No refit (refit is off)" in Path(outputs["summary"].path).read_text()
