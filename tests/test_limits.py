"""Issue 26, the readers: each hostile input of its table ends within seconds in a one-line
error (or, with skip_bad, a skipped file), under a memory cap, with no staging folder left.

Inputs are built here, small on disk (tests/fuzz/hostile.py). Boundedness is enforced by
resource limits, not timing asserts: the corpus runs in a subprocess whose address space is
capped at 2 GiB, and slow paths hit pytest-timeout.
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lungxray import data, images, manifest_csv, pixels, pools, raw_source, sources
from lungxray import limits as limiting
from lungxray.errors import ConfigError, DataError
from lungxray.prepare import preprocess
from tests.fuzz import hostile

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


def prepare(source: Path, output: Path, **options) -> dict:
    return preprocess(str(source), output, seed=0, image_size=16, val_fraction=0.25,
                      test_fraction=0.25, **options)


def assert_clean(output: Path) -> None:
    assert not output.exists()
    assert not list(output.parent.glob(".prepare-*"))


def one_line(err: pytest.ExceptionInfo, most: int = 1200) -> str:
    text = str(err.value)
    assert "\n" not in text and len(text) < most, text[:300]
    return text


def csv_source(root: Path, extra: str = "", header: str = "path,label") -> Path:
    rows = hostile.csv_folder(root, 8)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n" + extra)
    return root / "labels.csv"


def folder_source(root: Path, per_class: int = 4) -> Path:
    for i in range(per_class):
        for label in ("a", "b"):
            path = root / label / f"good{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hostile.small_png(i * 40 + (label == "b") * 10))
    return root


# ------------------------------------------------------------------- the table, end to end


EXPECTED = {  # case -> (exit code, fragment of the one stderr line; "" when it succeeds)
    "csv_commas": (2, "line 2 is longer than 16,384 characters (max_csv_line)"),
    "csv_deep_path": (2, "line 2 is longer than 16,384 characters"),
    "csv_big_header": (2, "line 1 is longer than 16,384 characters"),
    "csv_big_path": (2, "line 26 is longer than 16,384 characters"),
    "csv_many_labels": (2, "more than 1000 distinct labels (max_classes)"),
    "csv_fifo": (2, "fifo.png: not a regular file (FIFO)"),
    "csv_fifo_skip": (0, ""),
    "npz_label_bomb": (2, "train_labels: declares 300000000 of int64 = 2,400,000,000 bytes"),
    "npz_image_bomb": (2, "images of 50000x50000 = 2,500,000,000 pixels, above the limit"),
    "npz_header_1e12": (2, "declares 1000000000000 of int64"),
    "npz_header_truncated": (2, "train_labels: invalid .npy header (TokenError"),
    "npz_wide_default_size": (0, ""),
    "dicom_deflated_bomb": (2, "a/d0.dcm: Deflated DICOM inflates to more than"),
    "png16_13000": (2, "a/p0.png: 13000x13000 = 169,000,000 pixels, above the limit"),
    "decoder_crashes": (2, "a/dds.png: corrupt or truncated image (NotImplementedError"),
    "decoder_crashes_skip": (0, ""),
    "non_utf8_name": (2, r"a/\xff\xfe.png: file name is not valid UTF-8"),
    "non_utf8_name_skip": (0, ""),
    "image_size_50000": (2, "image size 50000 px is above the limit of 1024 px"),
}


def _cap_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (2 * GiB, 2 * GiB))


@pytest.mark.timeout(180)
def test_every_table_row_ends_in_one_line_under_2_gib(tmp_path):
    """The whole corpus through `lungxray preprocess`, in one process capped at 2 GiB of
    address space: an unbounded allocation (2.4 GB labels, 10 GB image member, 11 GB DICOM,
    8.5 GB PNG) fails this test instead of the machine."""
    run = subprocess.run(
        [sys.executable, "-m", "tests.fuzz.hostile", "--run", str(tmp_path / "in"),
         str(tmp_path / "out"), "--quick"], cwd=ROOT, capture_output=True, text=True,
        timeout=170, preexec_fn=_cap_memory, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    assert set(results) == set(EXPECTED)
    for case, (code, fragment) in EXPECTED.items():
        result = results[case]
        lines = result["stderr"].splitlines()
        assert result["rc"] == code, (case, result["stderr"][-500:])
        assert result["staging"] == [], case
        if code:
            assert len(lines) == 1 and fragment in lines[0], (case, lines)
            assert "Traceback" not in result["stderr"] and len(lines[0]) < 2000, case
        else:
            assert lines == [], (case, lines)
    assert results["decoder_crashes_skip"]["skipped"] == 3
    assert results["csv_fifo_skip"]["skipped"] == results["non_utf8_name_skip"]["skipped"] == 1
    manifest = json.loads((tmp_path / "out" / "npz_wide_default_size" / "prepared" /
                           "manifest.json").read_text())
    assert manifest["image_size"] == 1024  # max(8, 200000) capped, not 200000


# --------------------------------------------------------------------------------------- CSV


@pytest.mark.timeout(30)
def test_csv_line_of_ten_million_commas_stops_at_its_length(tmp_path):
    csv = csv_source(tmp_path, "," * 10_000_000 + "\n")
    with pytest.raises(DataError, match=r"line 10 is longer than 16,384 characters") as err:
        prepare(csv, tmp_path / "out")
    assert "(10000000 characters)" not in one_line(err)  # only its start is shown
    assert_clean(tmp_path / "out")


def test_csv_row_with_more_fields_than_the_header_stops_there(tmp_path):
    csv = csv_source(tmp_path, "img/0.png,a,extra\n" + "x\n" * 1000)
    with pytest.raises(DataError, match=r"line 10 has 3 fields but the header has 2"):
        prepare(csv, tmp_path / "out")


@pytest.mark.timeout(30)
def test_csv_long_field_and_header_are_cut_in_the_message(tmp_path):
    wide = limiting.with_overrides(limiting.DEFAULT, ["max_csv_line=20000000"])
    csv = csv_source(tmp_path, "p" * 10_000_000 + ",a\n")
    with pytest.raises(DataError, match=r"line 10 has a field longer than 131,072 characters, "
                                        r"above the limit of 4096 \(max_csv_field\)") as err:
        prepare(csv, tmp_path / "out", limits=wide)
    one_line(err)
    csv = csv_source(tmp_path, "p" * 100_000 + ",a\n")
    with pytest.raises(DataError, match=r"line 10 has a field of 100,000 characters, above "
                                        r"the limit of 4096 \(max_csv_field\)") as err:
        prepare(csv, tmp_path / "out", limits=wide)
    assert "... (100000 characters)" in one_line(err)
    header = csv_source(tmp_path / "h", header="path,label," + "h" * 10_000_000)
    with pytest.raises(DataError, match="line 1 has a field longer than 131,072") as err:
        prepare(header, tmp_path / "out", limits=wide)
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
        prepare(csv, tmp_path / "out", limits=wide)
    one_line(err)
    csv = csv_source(tmp_path / "c", "img/" + "n" * 300 + ".png,a\n")
    with pytest.raises(DataError, match=r"has a component longer than 255 characters"):
        prepare(csv, tmp_path / "out")


@pytest.mark.timeout(30)
def test_csv_fifo_is_refused_without_hanging_and_skippable(tmp_path):
    csv = csv_source(tmp_path, "fifo.png,a\n")
    os.mkfifo(tmp_path / "fifo.png")
    with pytest.raises(DataError, match=r"fifo.png: not a regular file \(FIFO\)"):
        prepare(csv, tmp_path / "out")
    assert_clean(tmp_path / "out")
    manifest = prepare(csv, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"] == [{"split": "train", "file": "fifo.png",
                                    "reason": "not a regular file (FIFO)"}]
    assert not list(tmp_path.glob(".prepare-*"))


@pytest.mark.timeout(30)
def test_a_fifo_or_device_put_there_after_the_scan_is_refused_on_open(tmp_path):
    os.mkfifo(tmp_path / "late.png")
    assert pools._read_one(sources.Item(tmp_path / "late.png", "late.png", 0),
                           pools.Settings(16, 1, False, 8, 1))[3] == "not a regular file (FIFO)"
    assert pools._read_one(sources.Item(Path("/dev/zero"), "zero.png", 0),
                           pools.Settings(16, 1, False, 8, 1))[3] == (
        "not a regular file (character device)")


@pytest.mark.timeout(30)
def test_csv_with_150k_labels_hits_the_class_limit_and_lookup_is_linear(tmp_path):
    rows = "".join(f"img/{i}.png,label{i}\n" for i in range(150_000))
    (tmp_path / "labels.csv").write_text("path,label\n" + rows)
    with pytest.raises(DataError, match=r"more than 1000 distinct labels \(max_classes\)"):
        prepare(tmp_path / "labels.csv", tmp_path / "out")
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
        prepare(csv, tmp_path / "out")
    csv.write_bytes(b"path,label\nimg/0.png\0,a\n")
    with pytest.raises(DataError) as err:
        prepare(csv, tmp_path / "out")
    one_line(err)


# ------------------------------------------------------------------------------------ folders


def test_folder_symlink_leaving_the_root_is_refused(tmp_path):
    root = folder_source(tmp_path / "src")
    secret = tmp_path / "secret.png"
    secret.write_bytes(hostile.small_png(7))
    os.symlink(secret, root / "a" / "link.png")
    os.symlink(root / "a" / "good0.png", root / "b" / "inside.png")  # inside: fine
    for skip in (False, True):  # never skippable, as in a CSV
        with pytest.raises(DataError, match=r"1 file\(s\) outside the source folder: "
                                            r"'a/link.png' leads outside the source folder"):
            prepare(root, tmp_path / "out", skip_bad=skip)
    os.unlink(root / "a" / "link.png")
    os.symlink(tmp_path, root / "c")  # a class folder that is a symlink out
    with pytest.raises(DataError, match=r"'c' leads outside the source folder"):
        prepare(root, tmp_path / "out")


@pytest.mark.timeout(30)
def test_folder_fifo_and_socket_are_named_and_skippable(tmp_path):
    import socket

    root = folder_source(tmp_path / "src", per_class=6)
    os.mkfifo(root / "a" / "pipe.png")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(root / "b" / "sock.png"))
        with pytest.raises(DataError, match=r"a/pipe.png: not a regular file \(FIFO\); "
                                            r"b/sock.png: not a regular file \(socket\)"):
            prepare(root, tmp_path / "out")
        manifest = prepare(root, tmp_path / "out", skip_bad=True)
    assert {s["file"] for s in manifest["skipped"]} == {"a/pipe.png", "b/sock.png"}


def test_non_utf8_file_name_is_named_early_and_safely(tmp_path):
    root = folder_source(tmp_path / "src", per_class=6)
    (root / "a" / os.fsdecode(b"x\xff\n.png")).write_bytes(hostile.small_png(3))
    with pytest.raises(DataError, match=r"a/x\\xff\\n.png: file name is not valid UTF-8") as err:
        prepare(root, tmp_path / "out")
    one_line(err)
    manifest = prepare(root, tmp_path / "out", skip_bad=True)
    assert manifest["skipped"][0]["file"] == "a/x\\xff\\n.png"
    assert "x\\xff\\n.png" in (tmp_path / "out" / "data_report.md").read_text()


def test_folder_class_count_is_limited(tmp_path):
    root = folder_source(tmp_path / "src")
    (root / "c").mkdir()
    (root / "c" / "x.png").write_bytes(hostile.small_png(1))
    few = limiting.with_overrides(limiting.DEFAULT, ["max_classes=2"])
    with pytest.raises(DataError, match=r"3 class folders, above the limit of 2 \(max_classes\)"):
        prepare(root, tmp_path / "out", limits=few)


# ---------------------------------------------------------------------------------------- npz


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


def test_npz_default_size_is_capped_and_image_size_bounded(tmp_path):
    wide = hostile.npy(np.zeros((4, 8, 3000), np.uint8) + np.arange(4, dtype=np.uint8)[
        :, None, None] * 60)
    labels = hostile.npy(hostile.good_labels(4))
    npz = hostile.write_npz(tmp_path / "wide.npz", {
        f"{s}_{k}": v for s in ("train", "val", "test")
        for k, v in (("images", wide), ("labels", labels))})
    small = limiting.with_overrides(limiting.DEFAULT, ["max_image_size=64"])
    manifest = preprocess(str(npz), tmp_path / "out", limits=small)
    assert manifest["image_size"] == 64  # max(8, 3000) capped at max_image_size
    with pytest.raises(DataError, match=r"image size 65 px is above the limit of 64 px"):
        preprocess(str(npz), tmp_path / "out2", image_size=65, limits=small)
    assert_clean(tmp_path / "out2")


# ------------------------------------------------------------------------------------- images


def test_16bit_png_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(images.ImageError, match=r"13000x13000 = 169,000,000 pixels, above the "
                                                r"limit of 40,000,000 \(max_image_pixels\)"):
        images.decode(hostile.png_16bit(13000, full=False), "p.png", 16, 1)
    with pytest.raises(images.ImageError, match=r"7000x7000 = 49,000,000 pixels"):
        images.decode(hostile.png_16bit(7000, full=False), "p.png", 16, 1)
    more = limiting.with_overrides(limiting.DEFAULT, ["max_image_pixels=50000000"])
    assert images.decode(hostile.png_16bit(7000, full=False), "p.png", 16, 1,
                         limits=more).shape == (16, 16, 1)


def test_stretch_makes_no_full_float64_copy():
    wide = (np.arange(3000 * 3000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(3000, -1)
    tracemalloc.start()
    try:
        out = pixels.stretch(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    assert peak < 4 * wide.size  # a float64 copy alone would be 8 bytes per pixel
    floats = np.array([[np.nan, 0.0, np.inf], [1.0, -np.inf, 2.0]])
    np.testing.assert_array_equal(pixels.stretch(floats), [[0, 0, 255], [128, 0, 255]])


def test_dicom_declared_size_is_checked_before_pixel_data():
    bomb = hostile.dicom(20000, 20000, pixel_bytes=2)
    with pytest.raises(images.ImageError, match=r"20000x20000 = 400,000,000 pixels, above"):
        images.decode(bomb, "x.dcm", 16, 1)
    with pytest.raises(images.ImageError, match=r"multi-frame DICOM \(7 frames\)"):
        images.decode(hostile.dicom(64, 64, frames="7"), "x.dcm", 16, 1)


def test_deflated_dicom_inflation_is_bounded_and_a_good_one_decodes():
    tight = limiting.with_overrides(limiting.DEFAULT, ["max_image_bytes=1048576"])
    bomb = hostile.dicom(4000, 4000, deflated=True)  # 32 MB of pixels in 32 KB
    with pytest.raises(images.ImageError, match=r"Deflated DICOM inflates to more than "
                                                r"17,825,792 bytes"):
        images.decode(bomb, "x.dcm", 16, 1, limits=tight)
    good = hostile.dicom(64, 64, deflated=True)
    assert images.decode(good, "x.dcm", 16, 1).shape == (16, 16, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("payload", "name", "message"), [
    (hostile.dicom_nested(5000), "n.dcm", r"corrupt DICOM file \(RecursionError"),
    (hostile.dicom(64, 64, frames="x"), "f.dcm", r"DICOM NumberOfFrames is not a number"),
    (hostile.dds_unsupported(), "d.png", r"corrupt or truncated image \(NotImplementedError"),
    (hostile.dicom(64, 64, pixel_bytes=10), "short.dcm", r"cannot decode DICOM pixel data"),
    (b"\0" * 128 + b"DICM" + b"\xff" * 64, "junk.dcm", r"DICOM"),
])
def test_any_decoder_failure_is_that_files_image_error(payload, name, message):
    with pytest.raises(images.ImageError, match=message) as err:
        images.decode(payload, name, 16, 1)
    one_line(err)


def test_any_exception_in_a_decoder_becomes_a_skippable_record(tmp_path, monkeypatch):
    root = folder_source(tmp_path / "src", per_class=6)
    (root / "a" / "boom.png").write_bytes(hostile.small_png(5))
    real = images._decode

    def flaky(data_, name, *args):
        if name == "boom.png":
            raise MemoryError("simulated")
        return real(data_, name, *args)

    monkeypatch.setattr(images, "_decode", flaky)
    with pytest.raises(DataError, match=r"a/boom.png: cannot decode \(MemoryError: simulated\)"):
        prepare(root, tmp_path / "out")
    assert prepare(root, tmp_path / "out", skip_bad=True)["skipped"][0]["file"] == "a/boom.png"


def test_budget_lets_large_decodes_run_one_at_a_time():
    budget, inside, most = images.Budget(100), [0], [0]
    lock = threading.Lock()

    def work(cost: int) -> None:
        with budget.hold(cost):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(60,)) for _ in range(4)]
    threads.append(threading.Thread(target=work, args=(500,)))  # above the budget: alone
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and budget.used == 0


# ---------------------------------------------------------------------- image size, signals


def test_image_size_above_its_limit_is_refused_before_anything_is_written(tmp_path):
    root = folder_source(tmp_path / "src")
    with pytest.raises(DataError, match=r"image size 50000 px is above the limit of 1024 px "
                                        r"\(max_image_size; raise it with --limit"):
        preprocess(str(root), tmp_path / "out" / "prepared", image_size=50000)
    assert not (tmp_path / "out").exists()


def test_limits_from_environment_and_cli(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGXRAY_MAX_IMAGE_SIZE", "2048")
    assert limiting.from_env().max_image_size == 2048
    from lungxray import cli

    code = cli.main(["preprocess", "--source", str(tmp_path), "--output", str(tmp_path / "o"),
                     "--limit", "max_classes=0"])
    assert code == 2
    with pytest.raises(ConfigError, match="unknown limit 'nope'"):
        limiting.with_overrides(limiting.DEFAULT, ["nope=3"])


def _start(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """preprocess on 600 images with one worker, stopped once its staging folder exists."""
    root = tmp_path / "src"
    rng = np.random.default_rng(0)
    from PIL import Image

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
        prepare(root, tmp_path / "out")
    finally:
        os.close(fd)
    assert not dead.exists() and live.exists() and other.exists()
    assert data.is_prepared(tmp_path / "out")
