"""Opening a raw source: local paths checked before anything is read (missing, special files,
unknown kinds, over-long names), and gs:// sources end to end through prepare.preprocess,
against a real gcp-storage-emulator."""

from __future__ import annotations

import io
import os
import uuid

import numpy as np
import pandas as pd
import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from PIL import Image

from lungxray import data, prepare, raw_source, sources
from lungxray.errors import DataError
from tests.data_helpers import csv_source, folder_source, real_images

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def bucket(emulator_host, monkeypatch) -> gcs.Bucket:
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator_host)
    client = gcs.Client(project="test", credentials=AnonymousCredentials())
    return client.create_bucket(f"lx-data-{uuid.uuid4().hex[:10]}")


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).resize((48, 48)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pictures(shared_npz):
    return real_images(shared_npz, 15)


def upload_tree(bucket: gcs.Bucket, pictures, prefix: str) -> dict[str, int]:
    """Upload chest_xray-style folders; returns object name -> label."""
    names = {}
    for i, (image, label) in enumerate(zip(*pictures, strict=True)):
        split = "test" if i % 5 == 0 else "train"
        name = f"{prefix}/{split}/{['NORMAL', 'PNEUMONIA'][label]}/{i:03d}.png"
        bucket.blob(name).upload_from_string(png(image))
        names[name] = int(label)
    return names


def test_gs_folder_end_to_end_and_cached(bucket, pictures, tmp_path):
    names = upload_tree(bucket, pictures, "chest_xray")
    bucket.blob("elsewhere/x.png").upload_from_string(b"not fetched")
    cache = tmp_path / "cache"
    source = f"gs://{bucket.name}/chest_xray/"
    manifest = prepare.preprocess(source, tmp_path / "out", image_size=32, seed=0,
                                  val_fraction=0.2, cache_dir=cache)
    assert manifest["source"] == source and manifest["carved"] == {"val": "train"}
    assert manifest["splits"]["test"]["n"] == 6
    assert sum(s["n"] for s in manifest["splits"].values()) == len(names)
    files = pd.read_csv(tmp_path / "out" / data.FILES_INDEX)
    # Files are named relative to the source, never by the machine's cache path.
    assert set(files["file"]) == {n.removeprefix("chest_xray/") for n in names}
    assert not (cache / bucket.name / "elsewhere").exists()
    # A second run downloads nothing: the cached copies are reused as they are.
    stamps = {p: p.stat().st_mtime_ns for p in (cache / bucket.name).rglob("*.png")}
    again = prepare.preprocess(source, tmp_path / "again", image_size=32, seed=0,
                               val_fraction=0.2, cache_dir=cache)
    assert again["splits"] == manifest["splits"]
    assert again["source_sha256"] == manifest["source_sha256"]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


def test_gs_csv_fetches_its_folder(bucket, pictures, tmp_path):
    names = upload_tree(bucket, pictures, "export")
    table = pd.DataFrame({"path": [n.removeprefix("export/") for n in names],
                          "label": [["normal", "pneumonia"][v] for v in names.values()]})
    bucket.blob("export/labels.csv").upload_from_string(table.to_csv(index=False))
    manifest = prepare.preprocess(f"gs://{bucket.name}/export/labels.csv", tmp_path / "out",
                                  image_size=32, seed=0, val_fraction=0.2, test_fraction=0.2,
                                  cache_dir=tmp_path / "cache")
    assert manifest["source_kind"] == "csv"
    assert sum(s["n"] for s in manifest["splits"].values()) == len(names)


def test_gs_npz(bucket, pictures, tmp_path):
    grey, labels = pictures
    buffer = io.BytesIO()
    np.savez_compressed(buffer, train_images=grey, train_labels=labels)
    bucket.blob("medmnist/pneumoniamnist.npz").upload_from_string(buffer.getvalue())
    manifest = prepare.preprocess(f"gs://{bucket.name}/medmnist/pneumoniamnist.npz",
                                  tmp_path / "out", seed=0, val_fraction=0.2, test_fraction=0.2,
                                  cache_dir=tmp_path / "cache")
    assert manifest["image_size"] == 28 and manifest["class_names"] == ["normal", "pneumonia"]


def test_gs_missing_prefix_is_a_clear_data_error(bucket, tmp_path):
    with pytest.raises(data.DataError, match=f"no objects under gs://{bucket.name}/nothing/"):
        prepare.preprocess(f"gs://{bucket.name}/nothing/", tmp_path / "out",
                           cache_dir=tmp_path / "cache")
    assert not (tmp_path / "out").exists()


def test_a_local_source_is_checked_then_scanned_by_its_kind(tmp_path):
    folder = raw_source.open_source(str(folder_source(tmp_path / "folder")))
    assert folder.class_names == ["a", "b"] and isinstance(folder.splits["train"], sources.FileSet)
    csv = raw_source.open_source(str(csv_source(tmp_path / "csv")))
    assert len(csv.splits["train"]) == 8
    cases = {"": "the source is empty",
             str(tmp_path / "gone"): "gone: no such file or directory",
             str(tmp_path / "notes.txt"): r"must be a MedMNIST-style .npz or a .csv manifest",
             str(tmp_path / "pipe"): r"pipe: not a regular file \(FIFO\)",
             "x" * 5000: r"is longer than 4096 characters \(max_path_chars\)"}
    (tmp_path / "notes.txt").write_text("not a source")
    os.mkfifo(tmp_path / "pipe")
    for source, message in cases.items():
        with pytest.raises(DataError, match=message) as err:
            raw_source.open_source(source)
        assert "\n" not in str(err.value) and len(str(err.value)) < 400
