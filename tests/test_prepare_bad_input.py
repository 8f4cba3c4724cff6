"""Bad input: each case stops with an error naming what and where, or is skipped and listed
with skip_bad; the source is never changed and no output that looks valid is left behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from lungxray import data
from lungxray.prepare import preprocess
from tests.data_helpers import real_images, tree_digest, write_folder


@pytest.fixture(scope="module")
def pictures(shared_npz) -> tuple[np.ndarray, np.ndarray]:
    return real_images(shared_npz, 20)


@pytest.fixture
def folder(pictures, tmp_path):
    """A good flat two-class folder of real X-rays."""
    write_folder(tmp_path / "src", *pictures, size=32)
    return tmp_path / "src"


def assert_no_output(tmp_path, output):
    assert not output.exists()
    assert not list(output.parent.glob(".prepare-*"))  # the staging dir is gone too


def prepare(source, output, **options):
    return preprocess(str(source), output, image_size=28, val_fraction=0.2,
                      test_fraction=0.2, seed=0, **options)


# ------------------------------------------------------------------------------- bad files


def test_zero_byte_file_is_named(folder, tmp_path):
    (folder / "NORMAL" / "empty.png").write_bytes(b"")
    with pytest.raises(data.DataError, match=r"NORMAL/empty.png: empty file \(0 bytes\)"):
        prepare(folder, tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_truncated_png_is_named(folder, tmp_path):
    good = (folder / "PNEUMONIA").iterdir().__next__().read_bytes()
    (folder / "PNEUMONIA" / "cut.png").write_bytes(good[: len(good) // 2])
    with pytest.raises(data.DataError, match="PNEUMONIA/cut.png: corrupt or truncated"):
        prepare(folder, tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_non_image_file_is_named(folder, tmp_path):
    (folder / "NORMAL" / "notes.txt").write_text("patient list, do not share")
    with pytest.raises(data.DataError, match="NORMAL/notes.txt: not an image"):
        prepare(folder, tmp_path / "out")


def test_tiny_image_is_named(folder, tmp_path):
    from PIL import Image

    Image.new("L", (6, 6)).save(folder / "NORMAL" / "thumb.png")
    with pytest.raises(data.DataError, match="NORMAL/thumb.png: 6x6 px, below the minimum of 8"):
        prepare(folder, tmp_path / "out")
    with pytest.raises(data.DataError, match=r"img0000.png: 32x32 px, below the minimum of 40"):
        prepare(folder, tmp_path / "out2", min_size=40)


def test_every_bad_file_is_named_in_one_error(folder, tmp_path):
    (folder / "NORMAL" / "empty.png").write_bytes(b"")
    (folder / "PNEUMONIA" / "junk.jpg").write_bytes(b"\xff\xd8\xff garbage")
    (folder / "PNEUMONIA" / "notes.txt").write_text("x")
    with pytest.raises(data.DataError) as error:
        prepare(folder, tmp_path / "out")
    message = str(error.value)
    assert "3 unusable file(s)" in message and "--skip-bad" in message
    for name in ("NORMAL/empty.png", "PNEUMONIA/junk.jpg", "PNEUMONIA/notes.txt"):
        assert name in message
    assert "\n" not in message  # one line, like every CLI error
    assert_no_output(tmp_path, tmp_path / "out")


def test_skip_bad_skips_lists_and_never_touches_the_source(folder, tmp_path):
    (folder / "NORMAL" / "empty.png").write_bytes(b"")
    (folder / "PNEUMONIA" / "notes.txt").write_text("x")
    before = tree_digest(folder)
    manifest = prepare(folder, tmp_path / "out", skip_bad=True)
    assert tree_digest(folder) == before
    reasons = {s["file"]: s["reason"] for s in manifest["skipped"]}
    assert reasons.keys() == {"NORMAL/empty.png", "PNEUMONIA/notes.txt"}
    assert reasons["NORMAL/empty.png"] == "empty file (0 bytes)"
    assert reasons["PNEUMONIA/notes.txt"].startswith("not an image")
    assert sum(s["n"] for s in manifest["splits"].values()) == 40  # the good ones only
    on_disk = json.loads((tmp_path / "out" / data.MANIFEST).read_text())
    assert on_disk["skipped"] == manifest["skipped"]
    report = (tmp_path / "out" / "data_report.md").read_text()
    assert "Skipped files: 2" in report and "`NORMAL/empty.png`" in report
    assert "PNEUMONIA/notes.txt" in (tmp_path / "out" / "data_report.html").read_text()


def test_source_stays_identical_when_preparation_fails(folder, tmp_path):
    (folder / "NORMAL" / "empty.png").write_bytes(b"")
    before = tree_digest(folder)
    with pytest.raises(data.DataError):
        prepare(folder, tmp_path / "out")
    assert tree_digest(folder) == before


# ------------------------------------------------------------------------ classes and splits


def test_single_class_is_refused(pictures, tmp_path):
    grey, labels = pictures
    write_folder(tmp_path / "src", grey[labels == 1], labels[labels == 1])
    with pytest.raises(data.DataError, match=r"only one class \['PNEUMONIA'\] has training "
                                             r"images"):
        prepare(tmp_path / "src", tmp_path / "out")
    np.savez(tmp_path / "one.npz", train_images=grey, train_labels=np.zeros(len(grey), int))
    with pytest.raises(data.DataError, match="only one class"):
        prepare(tmp_path / "one.npz", tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_empty_split_is_refused_or_dropped_and_carved(pictures, tmp_path):
    write_folder(tmp_path / "src" / "train", *pictures)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "src" / "val" / cls).mkdir(parents=True)
    with pytest.raises(data.DataError, match="split 'val' holds no images"):
        prepare(tmp_path / "src", tmp_path / "out")
    manifest = prepare(tmp_path / "src", tmp_path / "out", skip_bad=True)
    assert manifest["skipped_splits"] == ["val"]
    assert manifest["carved"] == {"test": "train", "val": "train"}


def test_empty_npz_split_is_refused_or_dropped(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "e.npz", train_images=grey, train_labels=labels,
             val_images=grey[:0], val_labels=labels[:0])
    with pytest.raises(data.DataError, match="split 'val' holds no images"):
        prepare(tmp_path / "e.npz", tmp_path / "out")
    manifest = prepare(tmp_path / "e.npz", tmp_path / "out", skip_bad=True)
    assert manifest["skipped_splits"] == ["val"] and manifest["carved"]["val"] == "train"


def test_split_with_only_bad_files_is_dropped_with_skip_bad(pictures, tmp_path):
    write_folder(tmp_path / "src" / "train", *pictures)
    for cls in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "src" / "test" / cls).mkdir(parents=True)
        (tmp_path / "src" / "test" / cls / "x.png").write_bytes(b"")
    manifest = prepare(tmp_path / "src", tmp_path / "out", skip_bad=True)
    assert manifest["skipped_splits"] == ["test"] and len(manifest["skipped"]) == 2
    assert manifest["carved"] == {"test": "train", "val": "train"}


def test_class_with_an_extra_folder_in_one_split_is_refused(pictures, tmp_path):
    write_folder(tmp_path / "src" / "train", *pictures)
    write_folder(tmp_path / "src" / "test", *pictures, names=("NORMAL", "PNEUMONIA_VIRAL"))
    with pytest.raises(data.DataError) as error:
        prepare(tmp_path / "src", tmp_path / "out")
    assert "split 'train' lacks class folders ['PNEUMONIA_VIRAL']" in str(error.value)
    assert "split 'test' lacks class folders ['PNEUMONIA']" in str(error.value)


def test_csv_classes_differing_between_splits_are_refused(pictures, tmp_path):
    paths = write_folder(tmp_path / "src", *pictures)
    labels = ["normal" if "NORMAL" in p.parts else "pneumonia" for p in paths]
    splits = ["train" if label == "pneumonia" or i % 2 else "val"
              for i, label in enumerate(labels)]
    pd.DataFrame({"path": [p.relative_to(tmp_path / "src").as_posix() for p in paths],
                  "label": labels, "split": splits}).to_csv(tmp_path / "src" / "l.csv",
                                                            index=False)
    with pytest.raises(data.DataError, match=r"split 'val' lacks classes \['pneumonia'\]"):
        prepare(tmp_path / "src" / "l.csv", tmp_path / "out")


# ------------------------------------------------------------------------------------- npz


def test_npz_with_wrong_keys_lists_what_it_found(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "keras.npz", x_train=grey, y_train=labels)
    with pytest.raises(data.DataError, match=r"no split keys \(expected some of "
                                             r"train_images/train_labels.*found: x_train, "
                                             r"y_train\)"):
        prepare(tmp_path / "keras.npz", tmp_path / "out")


def test_npz_with_wrong_shapes_names_every_field(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "bad.npz", train_images=grey.reshape(len(grey), -1),
             train_labels=labels, val_images=grey, val_labels=labels[:-3],
             test_images=grey.astype(np.float32), test_labels=np.stack([labels, labels], 1))
    with pytest.raises(data.DataError) as error:
        prepare(tmp_path / "bad.npz", tmp_path / "out")
    message = str(error.value)
    assert "train_images: expected images shaped (N, H, W) or (N, H, W, 1|3), got (40, 784)" \
        in message
    assert "val_images has 40 images but val_labels has 37 labels" in message
    assert "test_images: expected uint8 pixels, got float32" in message
    assert "test_labels: shaped (40, 2); multi-label data is not supported" in message
    assert_no_output(tmp_path, tmp_path / "out")


def test_npz_images_below_the_minimum_size(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "small.npz", train_images=grey, train_labels=labels)
    with pytest.raises(data.DataError, match=r"minimum of 32 px: train_images: 28x28 px"):
        preprocess(str(tmp_path / "small.npz"), tmp_path / "out", image_size=64,
                   min_size=32)
    with pytest.raises(data.DataError, match="image size 4 px is below the minimum of 8 px"):
        preprocess(str(tmp_path / "small.npz"), tmp_path / "out", image_size=4)
    assert_no_output(tmp_path, tmp_path / "out")


# ------------------------------------------------------------------------------------- CSV


def write_csv(folder, rows: list[tuple[str, str]]):
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(folder / "labels.csv", index=False)
    return folder / "labels.csv"


def good_rows(folder) -> list[tuple[str, str]]:
    return [(p.relative_to(folder).as_posix(), p.parent.name.lower())
            for p in sorted(folder.rglob("*.png"))]


@pytest.mark.parametrize("path, reason", [
    ("../outside.png", "contains '..'; paths may not leave the CSV's folder"),
    ("NORMAL/../../outside.png", "contains '..'"),
    ("/etc/passwd", "absolute path '/etc/passwd' is not allowed"),
    ("C:\\scans\\a.png", "absolute path 'C:/scans/a.png' is not allowed"),
])
def test_csv_paths_may_not_escape_its_folder(folder, tmp_path, path, reason):
    csv = write_csv(folder, [*good_rows(folder), (path, "normal")])
    for skip in (False, True):  # never skippable: a path like this is a red flag, not noise
        with pytest.raises(data.DataError, match=f"line 42: .*{reason}".replace("(", r"\(")):
            prepare(csv, tmp_path / "out", skip_bad=skip)
    assert_no_output(tmp_path, tmp_path / "out")


def test_csv_symlink_out_of_its_folder_is_refused(folder, tmp_path):
    secret = tmp_path / "secret"
    secret.mkdir()
    os.symlink(secret, folder / "link")
    csv = write_csv(folder, [*good_rows(folder), ("link/x.png", "normal")])
    with pytest.raises(data.DataError, match="leads outside the CSV's folder"):
        prepare(csv, tmp_path / "out")


def test_csv_missing_file_is_named_or_skipped(folder, tmp_path):
    csv = write_csv(folder, [*good_rows(folder), ("NORMAL/gone.png", "normal")])
    with pytest.raises(data.DataError, match="NORMAL/gone.png: no such file"):
        prepare(csv, tmp_path / "out")
    manifest = prepare(csv, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"] == [{"split": "train", "file": "NORMAL/gone.png",
                                    "reason": "no such file"}]


def test_csv_bad_columns_and_rows_are_named(folder, tmp_path):
    (folder / "a.csv").write_text("file,class\nNORMAL/img0000.png,normal\n")
    with pytest.raises(data.DataError, match=r"missing column\(s\) \['path', 'label'\].*found "
                                             r"\['file', 'class'\]"):
        prepare(folder / "a.csv", tmp_path / "out")
    rows = good_rows(folder)
    (folder / "b.csv").write_text("path,label,split\n" + "".join(
        f"{p},{lab},{'train' if i else 'validation'}\n" for i, (p, lab) in enumerate(rows))
        + f"{rows[1][0]},normal,train\n" + "NORMAL/x.png,,train\n")
    with pytest.raises(data.DataError) as error:
        prepare(folder / "b.csv", tmp_path / "out")
    message = str(error.value)
    assert "line 2: split 'validation' is not one of ['train', 'val', 'test']" in message
    assert "line 43: empty label" in message
    assert f"path '{rows[1][0]}' is listed more than once" in message


# ------------------------------------------------------------------ output and source safety


def test_a_folder_with_a_stray_manifest_is_never_replaced(folder, tmp_path):
    """Only a prepared dataset, and nothing else, may be replaced by a new preparation."""
    user = tmp_path / "user"
    (user / "src").mkdir(parents=True)
    (user / "manifest.json").write_text('{"name": "my web app"}')
    (user / "src" / "notes.txt").write_text("keep me")
    before = tree_digest(user)
    with pytest.raises(data.DataError, match="is not a prepared dataset; refusing to overwrite"):
        prepare(folder, user)
    prepared = tmp_path / "prepared"
    prepare(folder, prepared)
    (prepared / ".DS_Store").write_bytes(b"\0")  # desktop clutter is no reason to refuse
    prepare(folder, prepared)
    (prepared / "my_notes.txt").write_text("written by hand")
    (prepared / "my_scans.npz").write_bytes(b"mine")  # an npz preprocess did not write
    with pytest.raises(data.DataError, match=r"also holds \['my_notes.txt', 'my_scans.npz'\] "
                                             r"which preprocess did not write; refusing"):
        prepare(folder, prepared)
    assert tree_digest(user) == before
    assert (prepared / "my_notes.txt").read_text() == "written by hand"
    assert (prepared / "my_scans.npz").read_bytes() == b"mine"


def test_the_source_is_never_inside_the_output_nor_the_output_inside_it(pictures, folder,
                                                                        tmp_path):
    grey, labels = pictures
    prepared = tmp_path / "prepared"
    np.savez(tmp_path / "small.npz", train_images=grey, train_labels=labels)
    prepare(tmp_path / "small.npz", prepared)
    os.replace(tmp_path / "small.npz", prepared / "small.npz")
    with pytest.raises(data.DataError, match=r"also holds \['small.npz'\] which preprocess "):
        prepare(prepared / "small.npz", prepared)
    assert (prepared / "small.npz").is_file()
    before = tree_digest(folder)
    with pytest.raises(data.DataError, match="lies inside the source folder"):
        prepare(folder, folder / "prepared")
    assert tree_digest(folder) == before and not (folder / "prepared").exists()
    # A CSV names its files, so an output beside it is fine.
    csv = write_csv(folder, good_rows(folder))
    prepare(csv, folder / "prepared")
    assert data.is_prepared(folder / "prepared")


@pytest.mark.parametrize(("options", "message"), [
    ({"val_fraction": 0.0}, "val_fraction must be between 0 and 1"),
    ({"test_fraction": -0.1}, "test_fraction must be between 0 and 1"),
    ({"val_fraction": 0.6, "test_fraction": 0.5},
     "val_fraction \\+ test_fraction \\+ shifted_test_fraction must be below 1"),
    ({"workers": -1}, "must be 0 or more"),
])
def test_impossible_split_settings_are_refused(folder, tmp_path, options, message):
    settings = {"image_size": 28, "val_fraction": 0.2, "test_fraction": 0.2, **options}
    with pytest.raises(data.DataError, match=message):
        preprocess(str(folder), tmp_path / "out", **settings)
    assert_no_output(tmp_path, tmp_path / "out")


def test_both_fractions_are_shares_of_the_given_train(pictures, tmp_path):
    grey, labels = pictures
    write_folder(tmp_path / "flat", grey, labels, size=32)
    manifest = preprocess(str(tmp_path / "flat"), tmp_path / "out", image_size=28,
                          val_fraction=0.25, test_fraction=0.25, seed=0)
    # 10 and 10 of 40; val as a share of what test left would be 8.
    assert manifest["splits"]["test"]["n"] == manifest["splits"]["val"]["n"] == 10


def test_npz_val_without_a_class_is_refused(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "one.npz", train_images=grey, train_labels=labels,
             val_images=grey[labels == 1], val_labels=labels[labels == 1])
    with pytest.raises(data.DataError, match=r"split 'val' has no images of class\(es\) "
                                             r"\['0'\]"):
        prepare(tmp_path / "one.npz", tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_malformed_npz_labels_are_named(pictures, tmp_path):
    grey, labels = pictures
    np.savez(tmp_path / "scalar.npz", train_images=grey, train_labels=np.int64(3))
    with pytest.raises(data.DataError, match=r"train_labels: expected shape \(N,\) or \(N, 1\), "
                                             r"got \(\)"):
        prepare(tmp_path / "scalar.npz", tmp_path / "out")
    np.savez(tmp_path / "scalar_images.npz", train_images=np.uint8(3), train_labels=labels)
    with pytest.raises(data.DataError, match="train_images: expected images shaped"):
        prepare(tmp_path / "scalar_images.npz", tmp_path / "out")
    wrapped = labels.astype(np.uint64)
    wrapped[0] = np.iinfo(np.uint64).max  # would become -1 as int64
    np.savez(tmp_path / "wrapped.npz", train_images=grey, train_labels=wrapped)
    with pytest.raises(data.DataError, match="train_labels: label 18446744073709551615 is out "
                                             "of range"):
        prepare(tmp_path / "wrapped.npz", tmp_path / "out")
    huge = labels.copy()
    huge[0] = 3_000_000
    np.savez(tmp_path / "huge.npz", train_images=grey, train_labels=huge)
    with pytest.raises(data.DataError, match="labels go up to 3000000; at most 1000 classes"):
        prepare(tmp_path / "huge.npz", tmp_path / "out")
    assert_no_output(tmp_path, tmp_path / "out")


def test_an_image_pil_cannot_convert_is_named_or_skipped(folder, tmp_path):
    from PIL import Image

    Image.new("LAB", (40, 40)).save(folder / "NORMAL" / "lab.tif")
    with pytest.raises(data.DataError, match="NORMAL/lab.tif: cannot convert LAB image to grey"):
        prepare(folder, tmp_path / "out")
    manifest = prepare(folder, tmp_path / "out", skip_bad=True)
    assert [s["file"] for s in manifest["skipped"]] == ["NORMAL/lab.tif"]


def test_split_folders_are_matched_whatever_their_case(pictures, tmp_path):
    grey, labels = pictures
    write_folder(tmp_path / "src" / "Train", grey, labels, size=32)
    write_folder(tmp_path / "src" / "Test", grey[::2], labels[::2], size=32, prefix="t")
    manifest = prepare(tmp_path / "src", tmp_path / "out")
    assert manifest["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert manifest["carved"] == {"val": "train"}
    write_folder(tmp_path / "high" / "data" / "train", grey, labels, size=32)
    with pytest.raises(data.DataError, match="split folders inside class folders"):
        prepare(tmp_path / "high", tmp_path / "out2")
