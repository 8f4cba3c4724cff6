"""Preprocess on the real PneumoniaMNIST file and on image folders made from it; a stopped or
killed run leaves no staging folder behind (issue 26)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from lungxray import data, download, pools, prepare
from tests.data_helpers import folder_source, image_hashes, load_npz, prepare_16px

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, shared_npz):
    output = tmp_path_factory.mktemp("prep") / "full"
    return output, prepare.preprocess(str(shared_npz), output, seed=7)


def raw_hashes(npz: str) -> dict[str, np.ndarray]:
    """sha1 of every image of the source file's splits, computed here, not by lungxray."""
    with np.load(npz, allow_pickle=False) as archive:
        return {s: np.array([hashlib.sha1(image.tobytes()).hexdigest()
                             for image in archive[f"{s}_images"]]) for s in ("train", "val")}


def test_carves_stratified_test_and_keeps_given_val(prepared, shared_npz):
    output, manifest = prepared
    splits = manifest["splits"]
    assert manifest["carved"] == {"test": "train"}  # val exists in the file, test does not
    assert splits["val"]["n"] == 524
    assert splits["train"]["n"] + splits["test"]["n"] == 4708
    assert 0.09 < splits["test"]["n"] / 4708 < 0.11
    # Stratified: the carved test keeps train's pneumonia share (3494 / 4708).
    share = splits["test"]["counts"]["pneumonia"] / splits["test"]["n"]
    assert abs(share - 3494 / 4708) < 0.01
    assert manifest["class_names"] == ["normal", "pneumonia"]
    assert manifest["image_size"] == 28 and manifest["channels"] == 1
    assert manifest["source_sha256"] == download.file_sha256(shared_npz)
    on_disk = json.loads((output / data.MANIFEST).read_text())
    assert on_disk == manifest


def test_no_image_leaks_into_the_carved_test_split(prepared):
    output, manifest = prepared
    dups = manifest["cross_split_duplicates"]
    # The real file has val images with a copy in train (8, its README says); the split we
    # carve adds none.
    assert dups["train/test"]["count"] == 0
    assert dups["val/test"]["count"] == 0
    raw = raw_hashes(manifest["source"])
    assert dups["train/val"]["count"] == int(np.isin(raw["val"], raw["train"]).sum()) == 8
    train, test = data.load_split(output, "train"), data.load_split(output, "test")
    assert not image_hashes(train.images) & image_hashes(test.images)


def test_same_seed_same_split_other_seed_other_split(prepared, shared_npz, tmp_path):
    _, manifest = prepared
    again = prepare.preprocess(str(shared_npz), tmp_path / "again", seed=7)
    other = prepare.preprocess(str(shared_npz), tmp_path / "other", seed=8)
    assert again["splits"]["test"]["sha256"] == manifest["splits"]["test"]["sha256"]
    assert other["splits"]["test"]["sha256"] != manifest["splits"]["test"]["sha256"]


def test_resize_and_subsample(small_dataset):
    manifest = data.read_manifest(small_dataset)
    assert manifest["image_size"] == 32
    for name in data.SPLITS:
        split = data.load_split(small_dataset, name)
        assert split.images.shape[1:] == (32, 32, 1) and split.images.dtype == np.uint8
        assert len(split) == manifest["splits"][name]["n"] <= 160
        assert set(np.unique(split.labels)) == {0, 1}


def _write_folder(root, images, labels, names=("NORMAL", "PNEUMONIA")):
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.squeeze(-1)).resize((64, 64)).save(folder / f"{i:04d}.png")


def test_folder_with_splits(shared_npz, tmp_path):
    train = load_npz(shared_npz)["train"]
    root = tmp_path / "chest_xray"
    for label in (0, 1):
        idx = np.flatnonzero(train.labels == label)
        _write_folder(root / "train", train.images[idx[:40]], train.labels[idx[:40]])
        _write_folder(root / "test", train.images[idx[40:50]], train.labels[idx[40:50]])
    manifest = prepare.preprocess(str(root), tmp_path / "out", image_size=48, seed=1)
    assert manifest["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert manifest["carved"] == {"val": "train"}
    assert manifest["splits"]["test"]["counts"] == {"NORMAL": 10, "PNEUMONIA": 10}
    assert manifest["image_size"] == 48
    assert data.load_split(tmp_path / "out", "val").images.shape[1:] == (48, 48, 1)


def test_folder_classes_must_match_between_splits(tmp_path):
    for split, cls in (("train", "NORMAL"), ("train", "PNEUMONIA"), ("test", "NORMAL")):
        (tmp_path / "src" / split / cls).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "src" / split / cls / "a.png")
    with pytest.raises(data.DataError, match=r"split 'test' lacks class folders \['PNEUMONIA'\]"):
        prepare.preprocess(str(tmp_path / "src"), tmp_path / "out")


def test_bad_inputs_fail_clearly_and_write_nothing(tmp_path, shared_npz):
    bad = tmp_path / "bad.npz"
    np.savez(bad, train_images=np.zeros((4, 8, 8), np.uint8))
    with pytest.raises(data.DataError, match="train_images but not its pair"):
        prepare.preprocess(str(bad), tmp_path / "out1")
    assert not (tmp_path / "out1").exists()

    corrupt = tmp_path / "folder" / "train" / "NORMAL"
    corrupt.mkdir(parents=True)
    (corrupt / "broken.png").write_bytes(b"not a png")
    with pytest.raises(data.DataError, match="broken.png"):
        prepare.preprocess(str(tmp_path / "folder"), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()

    with pytest.raises(data.DataError, match="no such file"):
        prepare.preprocess(str(tmp_path / "missing.npz"), tmp_path / "out3")

    pickled = tmp_path / "pickled.npz"
    objects = np.empty((2, 28, 28), dtype=object)  # right shape: refused for its dtype alone
    np.savez(pickled, train_images=objects, train_labels=np.array([0, 1]))
    with pytest.raises(data.DataError, match="train_images: expected uint8 pixels, got object"):
        prepare.preprocess(str(pickled), tmp_path / "out4")
    assert not (tmp_path / "out4").exists()


def test_refuses_to_overwrite_a_foreign_directory(shared_npz, tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(data.DataError, match="refusing to overwrite"):
        prepare.preprocess(str(shared_npz), precious, max_per_split=50)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_source_is_never_modified(shared_npz, tmp_path):
    before = download.file_sha256(shared_npz)
    prepare.preprocess(str(shared_npz), tmp_path / "out", max_per_split=50)
    assert download.file_sha256(shared_npz) == before


def test_within_split_duplicates_of_the_shared_file(prepared):
    _, manifest = prepared
    within = manifest["within_split_duplicates"]
    # The real train split holds extra copies (18, its README says); grouped, every pair stays
    # on one side of the carved split, so none is lost or added.
    raw = raw_hashes(manifest["source"])
    extra = {s: len(h) - len(np.unique(h)) for s, h in raw.items()}
    assert within["train"]["count"] + within["test"]["count"] == extra["train"] == 18
    assert within["val"]["count"] == extra["val"]
    assert all(w["label_conflicts"] == 0 for w in within.values())
    output, _ = prepared
    train = data.load_split(output, "train")
    i, j = within["train"]["examples"][0]
    np.testing.assert_array_equal(train.images[i], train.images[j])


def test_prepared_layout_is_memory_mapped_and_indexed(prepared):
    output, manifest = prepared
    train = data.load_split(output, "train")
    assert isinstance(train.images, np.memmap) and train.images.dtype == np.uint8
    assert train.labels.dtype == np.int64
    files = pd.read_csv(output / data.FILES_INDEX)
    assert files.groupby("split").size().to_dict() == {
        name: split["n"] for name, split in manifest["splits"].items()}
    row = files[(files["split"] == "train") & (files["index"] == 0)].iloc[0]
    assert row["file"].startswith("train_images[")
    source = load_npz(Path(manifest["source"]))["train"]
    n = int(row["file"].split("[")[1].rstrip("]"))
    np.testing.assert_array_equal(source.images[n], train.images[0])
    assert (output / "data_report.html").is_file() and (output / "data_report.md").is_file()


def test_folder_duplicates_are_grouped_and_seeded(shared_npz, tmp_path):
    train = load_npz(shared_npz)["train"]
    idx = np.concatenate([np.flatnonzero(train.labels == c)[:40] for c in (0, 1)])
    images, labels = train.images[idx], train.labels[idx]
    root = tmp_path / "dups"
    _write_folder(root, images, labels)
    # Ten exact copies under other names: they must never straddle two splits.
    for i in range(0, 80, 8):
        name = ("NORMAL", "PNEUMONIA")[labels[i]]
        (root / name / f"copy{i:04d}.png").write_bytes((root / name / f"{i:04d}.png").read_bytes())
    first = prepare.preprocess(str(root), tmp_path / "a", image_size=28, seed=5,
                               val_fraction=0.2, test_fraction=0.2)
    again = prepare.preprocess(str(root), tmp_path / "b", image_size=28, seed=5,
                               val_fraction=0.2, test_fraction=0.2)
    assert all(info["count"] == 0 for info in first["cross_split_duplicates"].values())
    assert sum(w["count"] for w in first["within_split_duplicates"].values()) == 10
    assert again["splits"] == first["splits"] and again["source_sha256"] == first["source_sha256"]
    assert (tmp_path / "a" / data.FILES_INDEX).read_bytes() == (
        tmp_path / "b" / data.FILES_INDEX).read_bytes()


def _peak_memory(source, output, size: int) -> int:
    import tracemalloc

    tracemalloc.start()
    try:
        prepare.preprocess(str(source), output, image_size=size, seed=0, workers=2)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_memory_does_not_grow_with_the_number_of_images(shared_npz, tmp_path, monkeypatch):
    train = load_npz(shared_npz)["train"]
    size = 128
    monkeypatch.setattr(pools, "CHUNK_BYTES", 16 * size * size)  # 16 images per step
    peaks = {}
    for n in (150, 450):  # 2.5 MB and 7.4 MB of prepared pixels
        idx = np.concatenate([np.flatnonzero(train.labels == c)[:n // 2] for c in (0, 1)])
        _write_folder(tmp_path / f"src{n}", train.images[idx], train.labels[idx])
        peaks[n] = _peak_memory(tmp_path / f"src{n}", tmp_path / f"out{n}", size)
    # Held in memory, three times the images would add about 5 MB.
    assert peaks[450] - peaks[150] < 1_000_000, peaks


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """preprocess on 600 images with one worker, stopped once its staging folder exists."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(300):
            Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(
                root / label / f"{i}.png")
    process = subprocess.Popen(
        [sys.executable, "-m", "lungxray.cli", "preprocess", "--source", str(root),
         "--output", str(tmp_path / "out"), "--workers", "1", "--image-size", "512"],
        cwd=ROOT, stderr=subprocess.PIPE, text=True)
    for _ in range(300):
        if list(tmp_path.glob(".prepare-out-*/.pools/*")):
            break
        time.sleep(0.05)
    return process, root


@pytest.mark.timeout(90)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_remove_the_staging_folder(tmp_path, signum):
    process, _ = _start(tmp_path)
    assert process.poll() is None, "preprocess ended before the signal"
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signum
    lines = stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"lungxray preprocess: stopped by {signal.Signals(signum).name}; removed the staging "
        f"folder "), stderr[-2000:]
    assert not list(tmp_path.glob(".prepare-*")) and not (tmp_path / "out").exists()


def test_staging_left_by_sigkill_is_swept_but_a_live_one_is_kept(tmp_path):
    root = folder_source(tmp_path / "src", per_class=6)
    dead = tmp_path / ".prepare-out-dead1234"
    (dead / ".pools").mkdir(parents=True)
    live = tmp_path / ".prepare-out-live5678"
    live.mkdir()
    other = tmp_path / ".prepare-other-abcd1234"  # another output's: not ours to sweep
    other.mkdir()
    fd = os.open(live, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        prepare_16px(root, tmp_path / "out")
    finally:
        os.close(fd)
    assert not dead.exists() and live.exists() and other.exists()
    assert data.is_prepared(tmp_path / "out")
