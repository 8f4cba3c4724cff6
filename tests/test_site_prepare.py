"""Issue 33: several sites in one prepared dataset, on the real PneumoniaMNIST file and the real
NIH site: each site carved on its own, patients kept within a split, files.csv and the data
report naming every row's site, held-out sites in both directions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest

from lungxray import data, prepare, site_metrics
from tests.data_helpers import nih_rows

SIZE = 32


@pytest.fixture(scope="module")
def two_sites(tmp_path_factory, shared_npz, shared_nih):
    output = tmp_path_factory.mktemp("sites") / "both"
    manifest = prepare.preprocess(str(shared_npz), output, image_size=SIZE, seed=3,
                                  sites=[("nih", str(shared_nih))])
    return output, manifest


def _files(output: Path) -> pd.DataFrame:
    return pd.read_csv(output / data.FILES_INDEX, dtype={"patient_id": str}, keep_default_na=False)


def test_two_sites_are_carved_each_on_its_own(two_sites):
    output, manifest = two_sites
    assert list(manifest["sites"]) == ["pneumoniamnist", "nih"]  # the npz's own name
    assert manifest["holdout_site"] is None
    splits = manifest["splits"]
    assert list(splits) == ["train", "val", "test"]
    for name, record in splits.items():
        assert list(record["sites"]) == ["pneumoniamnist", "nih"], name
        assert sum(part["n"] for part in record["sites"].values()) == record["n"]
    # PneumoniaMNIST keeps its own val (524 images) and carves only test; NIH, without splits,
    # carves both, about 10% each of its 1000 images.
    mnist = manifest["sites"]["pneumoniamnist"]
    nih = manifest["sites"]["nih"]
    assert mnist["carved"] == {"test": "train"} and mnist["splits"]["val"] == 524
    assert sum(mnist["splits"].values()) == 5232
    assert nih["carved"] == {"test": "train", "val": "train"}
    assert sum(nih["splits"].values()) == 1000
    assert 80 <= nih["splits"]["val"] <= 120 and 80 <= nih["splits"]["test"] <= 120
    assert nih["grouped_by"] == "patient_id" and mnist["grouped_by"] == "content"
    # One prepared size and channel count for 28 px npz rows and 256 px PNGs.
    assert manifest["image_size"] == SIZE and manifest["channels"] == 1
    for name in splits:
        split = data.load_split(output, name)
        assert split.images.shape[1:] == (SIZE, SIZE, 1)
    on_disk = json.loads((output / data.MANIFEST).read_text())
    assert on_disk == manifest


def test_no_nih_patient_spans_two_splits(two_sites, shared_nih):
    output, manifest = two_sites
    files = _files(output)
    nih = files[files["site"] == "nih"]
    assert len(nih) == 1000
    assert (nih.groupby("patient_id")["split"].nunique() == 1).all()
    # The 21 patients with both a normal and a pneumonia image, found here from the raw CSV.
    labels: dict[str, set[str]] = {}
    for row in nih_rows(shared_nih):
        labels.setdefault(row["patient_id"], set()).add(row["label"])
    mixed = {p for p, found in labels.items() if len(found) == 2}
    assert len(mixed) == 21
    assert set(nih["patient_id"]) >= mixed
    assert all(count["count"] == 0 for count in manifest["cross_split_patients"].values())
    assert (files.loc[files["site"] == "pneumoniamnist", "patient_id"] == "").all()


def test_files_csv_names_the_site_of_every_row(two_sites):
    output, manifest = two_sites
    files = _files(output)
    assert list(files.columns)[-2:] == ["patient_id", "site"]
    for name, record in manifest["splits"].items():
        rows = files[files["split"] == name].sort_values("index")
        assert rows["site"].value_counts().to_dict() == {
            s: part["n"] for s, part in record["sites"].items()}
        # The manifest's counts give evaluation the same site per row as files.csv.
        sites = site_metrics.site_rows(manifest, name, "test")
        assert list(sites) == list(rows["site"])
        # Each row's recorded hash is the prepared image's: the rows are in the order named.
        split = data.load_split(output, name)
        for i in (0, len(rows) - 1):
            assert hashlib.sha1(split.images[i].tobytes()).hexdigest() == rows["sha1"].iloc[i]
        nih = rows[rows["site"] == "nih"]
        assert nih["file"].str.startswith("images/").all()
        assert record["sites"]["nih"]["counts"] == {
            c: int((nih["class"] == c).sum()) for c in manifest["class_names"]}


def test_data_report_and_a_rerun_on_the_same_output(two_sites, shared_npz, shared_nih,
                                                    tmp_path):
    output, manifest = two_sites
    text = (output / "data_report.md").read_text()
    assert "2 sites" in text and "| nih | val |" in text
    assert "Counts per site" in (output / "data_report.html").read_text()
    # A held-out site's files are the dataset's own: a re-run may replace them.
    again = tmp_path / "again"
    prepare.preprocess(str(shared_npz), again, image_size=SIZE, sites=[("nih", str(shared_nih))],
                       holdout_site="nih", max_per_split=50)
    prepare.preprocess(str(shared_npz), again, image_size=SIZE, sites=[("nih", str(shared_nih))],
                       holdout_site="nih", max_per_split=60)
    assert data.read_manifest(again)["splits"]["test_site_nih"]["n"] == 60


def test_the_shift_proxy_is_carved_per_site(shared_npz, shared_nih, tmp_path):
    # The pipeline's default shifted_test_fraction (0.1) with two sites: each site's train
    # loses whole clusters of its own images, NIH's still grouped by patient.
    manifest = prepare.preprocess(str(shared_npz), tmp_path / "out", image_size=SIZE, seed=2,
                                  sites=[("nih", str(shared_nih))], shifted_test_fraction=0.1)
    shifted = manifest["splits"]["test_shifted"]["sites"]
    assert list(shifted) == ["pneumoniamnist", "nih"]
    for name, part in shifted.items():
        assert part["n"] == manifest["sites"][name]["shift"]["n"] > 0
    assert all(pair["count"] == 0 for pair in manifest["cross_split_patients"].values())
    assert "test_shifted holds whole image-statistics clusters of each site's train" in (
        tmp_path / "out" / "data_report.md").read_text()


@pytest.mark.parametrize("held, other, n_held", [("nih", "pneumoniamnist", 1000),
                                                 ("pneumoniamnist", "nih", 5232)])
def test_a_held_out_site_never_reaches_train_or_val(shared_npz, shared_nih, tmp_path, held,
                                                    other, n_held):
    output = tmp_path / "out"
    manifest = prepare.preprocess(str(shared_npz), output, image_size=SIZE, seed=1,
                                  sites=[("nih", str(shared_nih))], holdout_site=held)
    split = f"test_site_{held}"
    assert list(manifest["splits"]) == ["train", "val", "test", split]
    assert manifest["holdout_site"] == held and manifest["sites"][held]["held_out"]
    for name in ("train", "val", "test"):
        assert list(manifest["splits"][name]["sites"]) == [other]
    assert manifest["splits"][split]["n"] == n_held
    assert list(manifest["splits"][split]["sites"]) == [held]
    files = _files(output)
    assert set(files.loc[files["site"] == held, "split"]) == {split}
    assert (files["split"] == split).sum() == n_held
    assert data.load_split(output, split).images.shape == (n_held, SIZE, SIZE, 1)
    assert f"Site {held} is held out" in (output / "data_report.md").read_text()
