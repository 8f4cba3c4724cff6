"""The data report (HTML + Markdown), the preprocess component and the preprocess command."""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
from kfp.dsl import HTML, Dataset, Markdown
from PIL import Image

from components.preprocess import preprocess as preprocess_component
from lungxray import cli, datareport, prepare
from tests.data_helpers import real_images, write_folder


@pytest.fixture(scope="module")
def skipped_dataset(tmp_path_factory, shared_npz):
    """A folder with two bad files, prepared with skip_bad."""
    root = tmp_path_factory.mktemp("src") / "xray"
    write_folder(root, *real_images(shared_npz, 20), size=40)
    (root / "NORMAL" / "empty.png").write_bytes(b"")
    (root / "PNEUMONIA" / "notes.txt").write_text("x")
    output = tmp_path_factory.mktemp("out") / "data"
    manifest = prepare.preprocess(str(root), output, image_size=32, skip_bad=True, seed=1,
                                  val_fraction=0.2, test_fraction=0.2)
    return output, manifest


def inline_pngs(page: str) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(b)))
            for b in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_report_is_self_contained_with_every_section(skipped_dataset):
    output, manifest = skipped_dataset
    page = (output / datareport.HTML_FILE).read_text()
    assert not re.search(r'(src|href)="(?!data:)', page)  # nothing fetched from anywhere
    pictures = inline_pngs(page)
    assert len(pictures) == 3  # counts chart, sample grid, histograms (no cross duplicates)
    assert all(p.format == "PNG" and p.size[0] > 100 for p in pictures)
    for heading in ("Counts per split and class", "Sample images per class",
                    "Intensity histogram per class", "Duplicates", "Skipped files (2)"):
        assert heading in page
    test = manifest["splits"]["test"]
    assert (f"<td>test (carved from train)</td><td class=\"n\">{test['n']}</td>"
            f"<td class=\"n\">{test['counts']['NORMAL']}</td>") in page
    assert "NORMAL/empty.png" in page and "empty file (0 bytes)" in page


def test_markdown_report_has_the_tables(skipped_dataset):
    output, manifest = skipped_dataset
    text = (output / datareport.MARKDOWN_FILE).read_text()
    assert text == datareport.markdown(manifest)
    assert "| split | n | NORMAL | PNEUMONIA |" in text
    val = manifest["splits"]["val"]
    assert (f"| val (carved from train) | {val['n']} | {val['counts']['NORMAL']} | "
            f"{val['counts']['PNEUMONIA']} |") in text
    assert "| train | `NORMAL/empty.png` | empty file (0 bytes) |" in text
    assert "- train/val: 0" in text


def test_cross_split_duplicates_are_pictured(shared_npz, tmp_path):
    prepare.preprocess(str(shared_npz), tmp_path / "out", max_per_split=0, seed=0)
    page = (tmp_path / "out" / datareport.HTML_FILE).read_text()
    assert len(inline_pngs(page)) == 4  # + the pairs of identical train/val images
    assert "train_images[" in page and "val_images[" in page


def test_samples_grid_shows_only_images_of_each_class():
    images = np.zeros((6, 8, 8, 1), np.uint8)
    images[3:] = 255  # class 1 is white, class 0 black
    labels = np.array([0, 0, 0, 1, 1, 1])
    picture = Image.open(io.BytesIO(base64.b64decode(
        datareport.samples_grid(images, labels, ["dark", "bright"], seed=0)))).convert("L")
    pixels = np.asarray(picture)
    top, bottom = pixels[: len(pixels) // 2], pixels[len(pixels) // 2:]
    assert (top == 0).sum() > (bottom == 0).sum()  # black tiles sit in the first row


def test_preprocess_component_emits_dataset_summary_and_report(shared_npz, tmp_path):
    dataset = Dataset(name="dataset", uri=str(tmp_path / "dataset"))
    summary = Markdown(name="summary", uri=str(tmp_path / "summary"))
    report = HTML(name="report", uri=str(tmp_path / "report"))
    preprocess_component(source=str(shared_npz), image_size=0, seed=1, max_per_split=60,
                         data_version="v1", dataset=dataset, summary=summary, report=report)
    assert dataset.metadata["n_test"] == 60 and dataset.metadata["n_skipped"] == 0
    assert "| test (carved from train) | 60 |" in Path(summary.path).read_text()
    page = Path(report.path).read_text()
    assert page.startswith("<!DOCTYPE html>") and len(inline_pngs(page)) >= 3


def test_cli_preprocess_csv_with_skip_bad_and_keep_aspect(shared_npz, tmp_path, capsys):
    paths = write_folder(tmp_path / "src", *real_images(shared_npz, 10), size=40)
    rows = [f"{p.relative_to(tmp_path / 'src').as_posix()},{p.parent.name}" for p in paths]
    (tmp_path / "src" / "labels.csv").write_text("path,label\n" + "\n".join(rows)
                                                 + "\nNORMAL/gone.png,NORMAL\n")
    args = ["preprocess", "--source", str(tmp_path / "src" / "labels.csv"), "--output",
            str(tmp_path / "out"), "--image-size", "16", "--val-fraction", "0.2",
            "--test-fraction", "0.2", "--shifted-test-fraction", "0"]  # 20 images: too few
    assert cli.main(args) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("lungxray preprocess: error:") and "NORMAL/gone.png" in error
    assert "\n" not in error and not (tmp_path / "out").exists()
    assert cli.main([*args, "--skip-bad", "--keep-aspect"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["keep_aspect"] is True and manifest["image_size"] == 16
    assert [s["file"] for s in manifest["skipped"]] == ["NORMAL/gone.png"]
