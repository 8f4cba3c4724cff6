"""Every kind of source through prepare.preprocess: npz variants, folder trees, CSV manifests;
and hostile folders and npz members refused at the scan, in one line (issue 26)."""

from __future__ import annotations

import os
import tracemalloc

import numpy as np
import pandas as pd
import pytest

from lungxray import data, pools, prepare, raw_source
from lungxray import limits as limiting
from lungxray.errors import DataError
from tests.data_helpers import (
    folder_source,
    one_line,
    prepare_16px,
    real_images,
    tree_digest,
    write_folder,
)
from tests.fuzz import hostile


@pytest.fixture(scope="module")
def pictures(shared_npz) -> tuple[np.ndarray, np.ndarray]:
    return real_images(shared_npz, 30)


def rows_by_pixels(output, name: str) -> dict[bytes, int]:
    split = data.load_split(output, name)
    return {img.tobytes(): int(lab) for img, lab in zip(split.images, split.labels, strict=True)}


# ------------------------------------------------------------------------------------- npz


def test_rgb_npz_with_only_a_train_split_gets_val_and_test(pictures, tmp_path):
    grey, labels = pictures
    rgb = np.stack([grey, 255 - grey, grey // 2], axis=-1)  # (N, 28, 28, 3)
    np.savez_compressed(tmp_path / "rgb.npz", train_images=rgb, train_labels=labels[:, None])
    manifest = prepare.preprocess(str(tmp_path / "rgb.npz"), tmp_path / "out", seed=1,
                                  val_fraction=0.2, test_fraction=0.2)
    assert manifest["channels"] == 3 and manifest["image_size"] == 28
    assert manifest["carved"] == {"test": "train", "val": "train"}
    assert manifest["class_names"] == ["0", "1"]  # no names known for an unknown file
    train = data.load_split(tmp_path / "out", "train")
    assert isinstance(train.images, np.memmap)  # streamed from disk, not loaded
    assert train.images.shape[1:] == (28, 28, 3)
    every = {}
    for name in data.SPLITS:
        every.update(rows_by_pixels(tmp_path / "out", name))
    assert every == {img.tobytes(): int(lab) for img, lab in zip(rgb, labels, strict=True)}


def test_npz_at_64px_with_test_only_is_kept_as_given_for_evaluation(pictures, tmp_path):
    grey, labels = pictures
    big = np.stack([np.kron(g, np.ones((2, 2), np.uint8))[..., None] for g in grey])
    np.savez(tmp_path / "pneumoniamnist_64.npz", test_images=big, test_labels=labels)
    manifest = prepare.preprocess(str(tmp_path / "pneumoniamnist_64.npz"), tmp_path / "out",
                                  carve_missing=False, image_size=32, channels=3)
    assert list(manifest["splits"]) == ["test"] and manifest["carved"] == {}
    assert manifest["class_names"] == ["normal", "pneumonia"]  # the MedMNIST names
    test = data.load_split(tmp_path / "out", "test")
    assert test.images.shape == (len(grey), 32, 32, 3)
    np.testing.assert_array_equal(test.labels, labels)


def test_npz_is_read_in_chunks(shared_npz, monkeypatch, tmp_path):
    whole = prepare.preprocess(str(shared_npz), tmp_path / "whole", max_per_split=300, seed=2)
    monkeypatch.setattr(pools, "CHUNK_BYTES", 28 * 28 * 7)  # 7 images per step
    chunked = prepare.preprocess(str(shared_npz), tmp_path / "chunked", max_per_split=300, seed=2)
    assert chunked["splits"] == whole["splits"]


# ----------------------------------------------------------------------------------- folders


def test_flat_folder_with_three_classes_nested_files_and_litter(pictures, tmp_path):
    grey, labels = pictures
    root = tmp_path / "xray"
    names = ("covid", "normal", "viral")
    three = labels + (np.arange(len(labels)) % 3 == 0)  # labels 0, 1, 2
    write_folder(root, grey, three, names=names)
    write_folder(root / "viral" / "2024", grey[:6], np.zeros(6, int), names=("batch",),
                 prefix="nested")
    (root / "README.md").write_text("where these came from")
    (root / "normal" / ".DS_Store").write_bytes(b"\0\1")
    (root / "normal" / "Thumbs.db").write_bytes(b"\0\1")
    manifest = prepare.preprocess(str(root), tmp_path / "out", image_size=32, seed=0,
                                  val_fraction=0.2, test_fraction=0.2)
    assert manifest["class_names"] == list(names)
    assert manifest["ignored"] == ["README.md"]
    total = {c: sum(s["counts"][c] for s in manifest["splits"].values()) for c in names}
    assert total == {"covid": int((three == 0).sum()), "normal": int((three == 1).sum()),
                     "viral": int((three == 2).sum()) + 6}
    files = pd.read_csv(tmp_path / "out" / data.FILES_INDEX)
    assert "viral/2024/batch/nested0000.png" in set(files["file"])
    assert not files["file"].str.contains("DS_Store|Thumbs").any()


def test_folder_split_layout_keeps_given_splits(pictures, tmp_path):
    grey, labels = pictures
    root = tmp_path / "chest_xray"
    write_folder(root / "train", grey[::2], labels[::2])
    write_folder(root / "val", grey[1::4], labels[1::4])
    write_folder(root / "test", grey[3::4], labels[3::4])
    manifest = prepare.preprocess(str(root), tmp_path / "out", image_size=28)
    assert manifest["carved"] == {}
    assert [manifest["splits"][s]["n"] for s in data.SPLITS] == [30, 15, 15]


def test_folder_mixing_split_and_class_folders_is_refused(pictures, tmp_path):
    grey, labels = pictures
    write_folder(tmp_path / "src" / "train", grey, labels)
    write_folder(tmp_path / "src", grey[[0, -1]], labels[[0, -1]])
    with pytest.raises(data.DataError, match=r"mixes split folders \['train'\] with other "
                                             r"folders \['NORMAL', 'PNEUMONIA'\]"):
        prepare.preprocess(str(tmp_path / "src"), tmp_path / "out")


def test_external_folder_may_lack_a_class_of_the_model(pictures, tmp_path):
    grey, labels = pictures
    write_folder(tmp_path / "ext", grey[labels == 1], labels[labels == 1],
                 names=("normal", "pneumonia"))
    manifest = prepare.preprocess(str(tmp_path / "ext"), tmp_path / "out", image_size=28,
                                  class_names=["normal", "pneumonia"], carve_missing=False)
    assert manifest["splits"]["test"]["counts"] == {"normal": 0, "pneumonia": 30}
    assert set(data.load_split(tmp_path / "out", "test").labels) == {1}


# --------------------------------------------------------------------------------------- CSV


def write_csv_source(root, grey, labels, patients=None, splits=None):
    paths = write_folder(root / "images", grey, labels)
    table = pd.DataFrame({"path": [p.relative_to(root).as_posix() for p in paths],
                          "label": np.array(["normal", "pneumonia"])[labels]})
    if splits is not None:
        table["split"] = splits
    if patients is not None:
        table["patient_id"] = patients
    table.to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


def test_csv_without_splits_is_carved(pictures, tmp_path):
    grey, labels = pictures
    csv = write_csv_source(tmp_path / "src", grey, labels)
    before = tree_digest(tmp_path / "src")
    manifest = prepare.preprocess(str(csv), tmp_path / "out", image_size=28, seed=4,
                                  val_fraction=0.2, test_fraction=0.2)
    assert tree_digest(tmp_path / "src") == before
    assert manifest["source_kind"] == "csv" and manifest["class_names"] == ["normal", "pneumonia"]
    assert manifest["carved"] == {"test": "train", "val": "train"}
    assert sum(s["n"] for s in manifest["splits"].values()) == 60
    assert manifest["splits"]["test"]["counts"] == {"normal": 6, "pneumonia": 6}


def test_csv_with_split_column_and_windows_separators(pictures, tmp_path):
    grey, labels = pictures
    splits = np.array(["train", "train", "val", "test"])[np.arange(60) % 4]
    csv = write_csv_source(tmp_path / "src", grey, labels, splits=splits)
    table = pd.read_csv(csv)
    table["path"] = table["path"].str.replace("/", "\\")
    table.to_csv(csv, index=False)
    manifest = prepare.preprocess(str(csv), tmp_path / "out", image_size=28)
    assert manifest["carved"] == {}
    assert [manifest["splits"][s]["n"] for s in data.SPLITS] == [30, 15, 15]


def test_csv_patient_groups_never_span_two_splits(pictures, tmp_path):
    grey, labels = pictures
    # 20 patients with 3 images each, one label per patient.
    order = np.argsort(labels, kind="stable")
    grey, labels = grey[order], labels[order]
    patients = np.array([f"P{i // 3:03d}" for i in range(60)])
    csv = write_csv_source(tmp_path / "src", grey, labels, patients=patients)
    manifest = prepare.preprocess(str(csv), tmp_path / "out", image_size=28, seed=3,
                                  val_fraction=0.2, test_fraction=0.2)
    assert manifest["grouped_by"] == "patient_id"
    files = pd.read_csv(tmp_path / "out" / data.FILES_INDEX)
    owners = files.groupby("patient_id")["split"].nunique()
    assert (owners == 1).all(), owners[owners > 1]
    assert files.groupby("patient_id").size().eq(3).all()  # every image of every patient
    assert all(info["count"] == 0 for info in manifest["cross_split_patients"].values())
    for name in ("val", "test"):  # stratified: both classes in every carved split
        assert min(manifest["splits"][name]["counts"].values()) >= 3


def test_csv_given_splits_sharing_a_patient_are_reported(pictures, tmp_path):
    grey, labels = pictures
    i = np.arange(60)
    splits = np.where(i % 3 == 0, "test", "train")
    # Test images 0, 3, ..., 27 share their patient with train images 1, 4, ..., 28.
    patients = np.where(i < 30, np.char.add("S", (i - i % 3).astype(str)),
                        np.char.add("U", i.astype(str)))
    csv = write_csv_source(tmp_path / "src", grey, labels, patients=patients, splits=splits)
    manifest = prepare.preprocess(str(csv), tmp_path / "out", image_size=28, seed=0,
                                  val_fraction=0.2)
    assert manifest["cross_split_patients"]["train/test"]["count"] == 10
    assert manifest["cross_split_patients"]["train/test"]["examples"][0] == "S0"
    files = pd.read_csv(tmp_path / "out" / data.FILES_INDEX)
    val, test = (set(files.loc[files["split"] == s, "patient_id"]) for s in ("val", "test"))
    assert len(val) >= 3 and not val & test  # the carved val takes no patient of test


# ------------------------------------------------------------------------- hostile folders


def test_folder_symlink_leaving_the_root_is_refused(tmp_path):
    root = folder_source(tmp_path / "src")
    secret = tmp_path / "secret.png"
    secret.write_bytes(hostile.small_png(7))
    os.symlink(secret, root / "a" / "link.png")
    os.symlink(root / "a" / "good0.png", root / "b" / "inside.png")  # inside: fine
    for skip in (False, True):  # never skippable, as in a CSV
        with pytest.raises(DataError, match=r"1 file\(s\) outside the source folder: "
                                            r"'a/link.png' leads outside the source folder"):
            prepare_16px(root, tmp_path / "out", skip_bad=skip)
    os.unlink(root / "a" / "link.png")
    os.symlink(tmp_path, root / "c")  # a class folder that is a symlink out
    with pytest.raises(DataError, match=r"'c' leads outside the source folder"):
        prepare_16px(root, tmp_path / "out")


@pytest.mark.timeout(30)
def test_folder_fifo_and_socket_are_named_and_skippable(tmp_path):
    import socket

    root = folder_source(tmp_path / "src", per_class=6)
    os.mkfifo(root / "a" / "pipe.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "b" / "sock.png"))
        with pytest.raises(DataError, match=r"a/pipe.png: not a regular file \(FIFO\); "
                                            r"b/sock.png: not a regular file \(socket\)"):
            prepare_16px(root, tmp_path / "out")
        manifest = prepare_16px(root, tmp_path / "out", skip_bad=True)
    assert {s["file"] for s in manifest["skipped"]} == {"a/pipe.png", "b/sock.png"}


def test_non_utf8_file_name_is_named_early_and_safely(tmp_path):
    root = folder_source(tmp_path / "src", per_class=6)
    (root / "a" / os.fsdecode(b"x\xff\n.png")).write_bytes(hostile.small_png(3))
    with pytest.raises(DataError, match=r"a/x\\xff\\n.png: file name is not valid UTF-8") as err:
        prepare_16px(root, tmp_path / "out")
    one_line(err)
    manifest = prepare_16px(root, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"][0]["file"] == "a/x\\xff\\n.png"
    assert "x\\xff\\n.png" in (tmp_path / "out" / "data_report.md").read_text()


def test_folder_class_count_is_limited(tmp_path):
    root = folder_source(tmp_path / "src")
    (root / "c").mkdir()
    (root / "c" / "x.png").write_bytes(hostile.small_png(1))
    few = limiting.with_overrides(limiting.DEFAULT, ["max_classes=2"])
    with pytest.raises(DataError, match=r"3 class folders, above the limit of 2 \(max_classes\)"):
        prepare_16px(root, tmp_path / "out", limits=few)


# ----------------------------------------------------------------------------- hostile npz


def test_npz_labels_declaring_gigabytes_are_refused_at_the_header(tmp_path):
    """Nothing is inflated: the member holds a header and 1 MiB of its declared 2.4 GB."""
    npz = hostile.write_npz_stream(tmp_path / "bomb.npz", "train_labels",
                                   hostile.npy_header((300_000_000,)), 1 << 20,
                                   {"train_images": hostile.npy(hostile.good_images())})
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"train_labels: declares 300000000 of int64 = "
                                            r"2,400,000,000 bytes, above the limit"):
            raw_source.open_source(str(npz))
        assert tracemalloc.get_traced_memory()[1] < 32 << 20
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize(("member", "message"), [
    (hostile.npy_header((10**12,)), r"declares 1000000000000 of int64"),
    (hostile.npy_header((8,), raw=b"{'descr': '<i8', 'shape': (8,"), r"invalid .npy header"),
    (hostile.npy_header((8,), raw=b"{'descr': 'junk', 'fortran_order': False, 'shape': (8,)}"),
     r"invalid .npy header"),
    (hostile.npy_header((8,), raw=b"{'descr': '<i8', 'fortran_order': False, 'shape': (-8,)}"),
     r"invalid .npy header"),
    (hostile.npy_header((8,), "|O"), r"holds Python objects"),
    (b"\x93NUMPY\x09\x00" + b"\0" * 60, r"invalid .npy header"),
    (b"\x93NUM", r"invalid .npy header"),
    (hostile.npy_header((8,)) + b"\0" * 10, r"truncated \(10 of 64 bytes\)"),
    # Found by make fuzz: a zero-sized shape whose product overflows numpy's index type.
    (hostile.npy_header((0, 146134, 7889481603233)), r"invalid .npy header \(shape"),
])
def test_npz_invalid_label_headers_are_one_line_data_errors(tmp_path, member, message):
    npz = hostile.write_npz(tmp_path / "bad.npz", {
        "train_images": hostile.npy(hostile.good_images()), "train_labels": member})
    with pytest.raises(DataError, match=message) as err:
        raw_source.open_source(str(npz))
    one_line(err)


def test_npz_member_with_a_damaged_local_header_is_one_line(tmp_path):
    """Found by make fuzz: zipfile raised BadZipFile when opening the member."""
    npz = hostile.write_npz(tmp_path / "bad.npz", {
        "train_images": hostile.npy(hostile.good_images()),
        "train_labels": hostile.npy(hostile.good_labels())})
    raw = bytearray(npz.read_bytes())
    raw[0] = 0  # the first member's local header signature
    npz.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=r"train_images.*cannot read \(BadZipFile: Bad magic"):
        raw_source.open_source(str(npz))


def test_npz_image_member_has_a_pixel_limit(tmp_path):
    npz = hostile.write_npz(tmp_path / "big.npz", {
        "train_images": hostile.npy_header((2, 50000, 50000), "|u1"),
        "train_labels": hostile.npy(hostile.good_labels(2))})
    with pytest.raises(DataError, match=r"images of 50000x50000 = 2,500,000,000 pixels, above "
                                        r"the limit of 40,000,000 \(max_image_pixels\)"):
        raw_source.open_source(str(npz))
    with pytest.raises(DataError, match="invalid .npy header"):
        raw_source.open_source(str(hostile.write_npz(tmp_path / "cut.npz", {
            "train_images": b"\x93NUMPY\x01\x00\xff", "train_labels": b""})))
