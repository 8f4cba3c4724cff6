"""Issue 33: several sites in one prepared dataset, on the real PneumoniaMNIST file and the real
NIH site; held-out sites in both directions; every bad request refused in one line before
anything is written."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lungxray import cli, data, limits, prepare, site_metrics
from lungxray.errors import ConfigError, DataError

SIZE = 32


def _nih_rows(nih: Path) -> list[dict]:
    with open(nih, newline="") as fh:
        return list(csv.DictReader(fh))


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
    for row in _nih_rows(shared_nih):
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


# --------------------------------------------------------------------------- bad input


def _small_site(root: Path, shared_nih: Path, n: int = 20, patients: list[str] | None = None,
                labels: list[str] | None = None) -> Path:
    """A CSV site of ``n`` real NIH images copied into ``root`` (paths stay inside it)."""
    rows = _nih_rows(shared_nih)
    chosen = [r for r in rows if r["label"] == "normal"][:n // 2] + \
        [r for r in rows if r["label"] == "pneumonia"][:n - n // 2]
    (root / "images").mkdir(parents=True)
    with open(root / "manifest.csv", "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "patient_id"])
        for i, row in enumerate(chosen):
            name = f"images/{i}.png"
            shutil.copyfile(shared_nih.parent / row["path"], root / name)
            writer.writerow([name, labels[i % len(labels)] if labels else row["label"],
                             patients[i] if patients else f"{root.name}-{i}"])
    return root / "manifest.csv"


def _refused(tmp_path: Path, error: type, match: str, source: str, **kwargs) -> None:
    output = tmp_path / "out"
    with pytest.raises(error, match=match) as err:
        prepare.preprocess(source, output, image_size=SIZE, **kwargs)
    assert "\n" not in str(err.value) and len(str(err.value)) < 4000  # 20 problems at most
    assert not output.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".prepare-")]


@pytest.mark.parametrize("sites, site_name, match", [
    ([("nih", "x"), ("NIH", "y")], None, "'NIH' repeats 'nih'"),
    ([("pneumoniamnist", "x")], None, "'pneumoniamnist' repeats"),
    ([("nih", "x")], "nih", "'nih' repeats"),
    ([("", "x")], None, "may not be empty"),
    ([("../up", "x")], None, "must be 1 to 40 letters"),
    ([("a/b", "x")], None, "must be 1 to 40 letters"),
    ([(".hidden", "x")], None, "must be 1 to 40 letters"),
    ([("nih", "x")], "bad name", "must be 1 to 40 letters"),
    ([(f"s{i}", "x") for i in range(20)], None, "at most 16"),
])
def test_bad_site_names_are_refused(shared_npz, tmp_path, sites, site_name, match):
    _refused(tmp_path, ConfigError, match, str(shared_npz), sites=sites, site_name=site_name)


@pytest.mark.parametrize("holdout, sites, match", [
    ("other", [("nih", "NIH")], "holdout_site 'other' names no site"),
    ("pneumoniamnist", None, "is the only site"),
    ("main", None, "is the only site|names no site"),
])
def test_bad_holdout_sites_are_refused(shared_npz, shared_nih, tmp_path, holdout, sites, match):
    sites = [(n, str(shared_nih)) for n, _ in sites] if sites else None
    _refused(tmp_path, ConfigError, match, str(shared_npz), sites=sites, holdout_site=holdout)


def test_a_patient_in_two_sites_is_refused(shared_npz, shared_nih, tmp_path):
    a = _small_site(tmp_path / "a", shared_nih, patients=[f"p{i}" for i in range(20)])
    b = _small_site(tmp_path / "b", shared_nih, patients=[f"p{i}" for i in range(19, 39)])
    _refused(tmp_path, DataError, "patient id 'p19' appears in sites 'a' and 'b'",
             str(shared_npz), sites=[("a", str(a)), ("b", str(b))])


def test_classes_that_cannot_be_mapped_are_refused(shared_npz, shared_nih, tmp_path):
    pets = _small_site(tmp_path / "pets", shared_nih, labels=["cat", "dog"])
    _refused(tmp_path, DataError, r"site 'pets': classes \['cat', 'dog'\] cannot be mapped to "
             r"the classes \['normal', 'pneumonia'\] of site 'pneumoniamnist'",
             str(shared_npz), sites=[("pets", str(pets))])


def test_class_names_map_ignoring_case(shared_npz, shared_nih, tmp_path):
    upper = _small_site(tmp_path / "upper", shared_nih, n=40,
                        labels=["NORMAL"] * 20 + ["PNEUMONIA"] * 20)
    manifest = prepare.preprocess(str(shared_npz), tmp_path / "out", image_size=SIZE,
                                  sites=[("upper", str(upper))])
    assert manifest["class_names"] == ["normal", "pneumonia"]
    assert manifest["sites"]["upper"]["class_names"] == ["NORMAL", "PNEUMONIA"]
    total = {c: sum(manifest["splits"][s]["sites"]["upper"]["counts"][c]
                    for s in manifest["splits"] if "upper" in manifest["splits"][s]["sites"])
             for c in manifest["class_names"]}
    assert total == {"normal": 20, "pneumonia": 20}


def test_a_site_left_empty_by_max_per_split_is_refused(shared_npz, shared_nih, tmp_path):
    small = _small_site(tmp_path / "small", shared_nih, n=40)
    _refused(tmp_path, DataError, r"max_per_split=5 leaves site\(s\) \['small'\] without images",
             str(shared_npz), sites=[("small", str(small))], max_per_split=5)


def test_a_site_too_small_to_carve_is_named(shared_npz, shared_nih, tmp_path):
    tiny = _small_site(tmp_path / "tiny", shared_nih, n=6)
    _refused(tmp_path, DataError, r"site 'tiny' \(.*\): cannot carve a 10% test split by "
             r"patient", str(shared_npz), sites=[("tiny", str(tiny))])


def test_the_same_source_twice_is_refused(shared_npz, shared_nih, tmp_path):
    _refused(tmp_path, DataError, "sites 'a' and 'b' read the same source", str(shared_npz),
             sites=[("a", str(shared_nih)), ("b", str(shared_nih))])


def test_readers_limits_apply_to_every_site(shared_npz, shared_nih, tmp_path):
    bounded = limits.with_overrides(limits.DEFAULT, ["max_csv_rows=100"])
    _refused(tmp_path, DataError, r"more than 100 rows \(max_csv_rows\)", str(shared_npz),
             sites=[("nih", str(shared_nih))], limits=bounded)
    bounded = limits.with_overrides(limits.DEFAULT, ["max_image_pixels=1000"])
    _refused(tmp_path, DataError, "unusable file", str(shared_npz),
             sites=[("nih", str(shared_nih))], limits=bounded)


def test_site_name_alone_is_refused(shared_npz, tmp_path):
    _refused(tmp_path, ConfigError, "--site-name names the main source", str(shared_npz),
             site_name="mnist")


@pytest.mark.parametrize("args, message", [
    (["--site", "nih"], "is not NAME=SOURCE"),
    (["--site", "=x"], "may not be empty"),
    (["--site", "nih="], "has no source"),
    (["--site", "a b=x"], "must be 1 to 40 letters"),
    (["--site", "nih=/no/such.csv"], "no such file or directory"),
    (["--holdout-site", "nih"], "names no site"),
])
def test_cli_errors_are_one_line(shared_npz, tmp_path, capsys, args, message):
    output = tmp_path / "out"
    rc = cli.main(["preprocess", "--source", str(shared_npz), "--output", str(output),
                   "--image-size", str(SIZE), *args])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("lungxray preprocess: error:") and message in err
    assert err.count("\n") == 1
    assert not output.exists()


# --------------------------------------------------------------------------- pipeline parameters


@pytest.mark.parametrize("params, match", [
    ({"sites": "nih=a.csv,nih=b.csv"}, "'nih' repeats 'nih'"),
    ({"sites": "pneumoniamnist=a.csv"}, "'pneumoniamnist' repeats"),
    ({"data_source": "x/folder", "sites": "main=a.csv"}, "'main' repeats"),
    ({"sites": "nih"}, "is not NAME=SOURCE"),
    ({"sites": "=a.csv"}, "may not be empty"),
    ({"sites": "n i h=a.csv"}, "must be 1 to 40 letters"),
    ({"sites": "nih="}, "has no source"),
    ({"sites": ",".join(f"s{i}=x" for i in range(17))}, "at most 16"),
    ({"holdout_site": "nih"}, "names no site"),
    ({"holdout_site": "pneumoniamnist"}, "is the only site"),
    ({"sites": "nih=a.csv", "holdout_site": "other"}, "holdout_site 'other' names no site"),
    ({"sites": 5}, "parameter sites must be a string"),
    ({"holdout_site": "x" * 41}, "holdout_site must be between 0 and 40"),
])
def test_the_pipeline_refuses_bad_sites_before_any_step(params, match):
    from pipelines.params import ParamsError, check_values

    with pytest.raises(ParamsError, match=match) as err:
        check_values(params)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("params", [
    {"sites": ""},
    {"sites": "nih=../shared/data/nih_cxr_1000/manifest.csv"},
    {"sites": "nih=a.csv,other=b/", "holdout_site": "pneumoniamnist"},
    {"data_source": "gs://b/x.npz", "sites": "nih=gs://b/nih/manifest.csv", "holdout_site": "nih"},
])
def test_the_pipeline_takes_good_sites(params):
    from pipelines.params import check_values

    check_values(params)


def test_the_schema_knows_the_pipelines_data_source_default():
    from lungxray import schema
    from pipelines.profiles import pipeline_defaults

    defaults = pipeline_defaults()
    assert defaults["data_source"] == schema.DEFAULT_DATA_SOURCE
    assert defaults["sites"] == "" and defaults["holdout_site"] == ""
