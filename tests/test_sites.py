"""Issue 33: every bad request for several sites (names, held-out site, patients, classes,
sizes, limits) refused in one line before anything is written, by preprocess, the CLI and the
pipeline's parameters. (Preparing good sites: test_site_prepare.py.)"""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from lungxray import cli, limits, prepare
from lungxray.errors import ConfigError, DataError
from tests.data_helpers import nih_rows

SIZE = 32


def _small_site(root: Path, shared_nih: Path, n: int = 20, patients: list[str] | None = None,
                labels: list[str] | None = None) -> Path:
    """A CSV site of ``n`` real NIH images copied into ``root`` (paths stay inside it)."""
    rows = nih_rows(shared_nih)
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
