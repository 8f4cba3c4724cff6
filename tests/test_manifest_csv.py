"""The CSV manifest reader: every size bounded (line, field, path, classes), paths kept inside
the CSV's folder, special files and undecodable text named in one line (issue 26)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lungxray import limits as limiting
from lungxray import manifest_csv
from lungxray.errors import DataError
from tests.data_helpers import assert_clean, csv_source, one_line, prepare_16px


@pytest.mark.timeout(30)
def test_csv_line_of_ten_million_commas_stops_at_its_length(tmp_path):
    csv = csv_source(tmp_path, "," * 10_000_000 + "\n")
    with pytest.raises(DataError, match=r"line 10 is longer than 16,384 characters") as err:
        prepare_16px(csv, tmp_path / "out")
    assert "(10000000 characters)" not in one_line(err)  # only its start is shown
    assert_clean(tmp_path / "out")


def test_csv_row_with_more_fields_than_the_header_stops_there(tmp_path):
    csv = csv_source(tmp_path, "img/0.png,a,extra\n" + "x\n" * 1000)
    with pytest.raises(DataError, match=r"line 10 has 3 fields but the header has 2"):
        prepare_16px(csv, tmp_path / "out")


@pytest.mark.timeout(30)
def test_csv_long_field_and_header_are_cut_in_the_message(tmp_path):
    wide = limiting.with_overrides(limiting.DEFAULT, ["max_csv_line=20000000"])
    csv = csv_source(tmp_path, "p" * 10_000_000 + ",a\n")
    # the csv module's bound is process-wide: 131,072 unless a reader with a raised limit ran
    with pytest.raises(DataError, match=r"line 10 has a field longer than [\d,]+ characters, "
                                        r"above the limit of 4096 \(max_csv_field\)") as err:
        prepare_16px(csv, tmp_path / "out", limits=wide)
    one_line(err)
    csv = csv_source(tmp_path, "p" * 100_000 + ",a\n")
    with pytest.raises(DataError, match=r"line 10 has a field of 100,000 characters, above "
                                        r"the limit of 4096 \(max_csv_field\)") as err:
        prepare_16px(csv, tmp_path / "out", limits=wide)
    assert "... (100000 characters)" in one_line(err)
    header = csv_source(tmp_path / "h", header="path,label," + "h" * 10_000_000)
    with pytest.raises(DataError, match=r"line 1 has a field longer than [\d,]+ char") as err:
        prepare_16px(header, tmp_path / "out", limits=wide)
    one_line(err)


@pytest.mark.timeout(30)
def test_csv_deep_path_is_refused_before_resolve(tmp_path, monkeypatch):
    """5 million `a/` segments made Path.resolve() quadratic: the length is checked first."""
    wide = limiting.with_overrides(limiting.DEFAULT, {"max_csv_line": 20_000_000,
                                                      "max_csv_field": 20_000_000})
    csv = csv_source(tmp_path, "a/" * 5_000_000 + "x.png,a\n")
    resolve = Path.resolve

    def guarded(self, *args, **kwargs):
        assert len(str(self)) < 10_000, "resolve() called on a huge path"
        return resolve(self, *args, **kwargs)

    monkeypatch.setattr(Path, "resolve", guarded)
    with pytest.raises(DataError, match=r"line 10: path 'a/a/a.*\(10000005 characters\) is "
                                        r"longer than 4096 characters \(max_path_chars\)") as err:
        prepare_16px(csv, tmp_path / "out", limits=wide)
    one_line(err)
    csv = csv_source(tmp_path / "c", "img/" + "n" * 300 + ".png,a\n")
    with pytest.raises(DataError, match=r"has a component longer than 255 characters"):
        prepare_16px(csv, tmp_path / "out")


@pytest.mark.timeout(30)
def test_csv_fifo_is_refused_without_hanging_and_skippable(tmp_path):
    csv = csv_source(tmp_path, "fifo.png,a\n")
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DataError, match=r"fifo.png: not a regular file \(FIFO\)"):
        prepare_16px(csv, tmp_path / "out")
    assert_clean(tmp_path / "out")
    manifest = prepare_16px(csv, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"] == [{"split": "train", "file": "fifo.png",
                                    "reason": "not a regular file (FIFO)"}]
    assert not list(tmp_path.glob(".prepare-*"))


@pytest.mark.timeout(30)
def test_csv_with_150k_labels_hits_the_class_limit_and_lookup_is_linear(tmp_path):
    rows = "".join(f"img/{i}.png,label{i}\n" for i in range(150_000))
    (tmp_path / "labels.csv").write_text("path,label\n" + rows)
    with pytest.raises(DataError, match=r"more than 1000 distinct labels \(max_classes\)"):
        prepare_16px(tmp_path / "labels.csv", tmp_path / "out")
    # With the limit raised, 30k labels scan in seconds (names.index per row was quadratic).
    (tmp_path / "labels.csv").write_text("path,label\n" + rows[:rows.index("img/30000.png")])
    many = limiting.with_overrides(limiting.DEFAULT, ["max_classes=100000"])
    source = manifest_csv.scan_csv(tmp_path / "labels.csv", limits=many)
    assert len(source.class_names) == 30_000
    assert source.splits["train"].items[-1].label == source.class_names.index("label29999")


def test_csv_that_is_not_utf8_or_has_a_nul_is_one_line(tmp_path):
    csv = csv_source(tmp_path)
    csv.write_bytes(csv.read_bytes() + b"img/\xff.png,a\n")
    with pytest.raises(DataError, match="not UTF-8 text"):
        prepare_16px(csv, tmp_path / "out")
    csv.write_bytes(b"path,label\nimg/0.png\0,a\n")
    with pytest.raises(DataError) as err:
        prepare_16px(csv, tmp_path / "out")
    one_line(err)

