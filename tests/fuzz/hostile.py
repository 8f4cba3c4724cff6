"""Builders of hostile inputs for the readers (issue 26): each is small on disk and built in
a second or less, yet declares or inflates to gigabytes, hangs a naive reader or crashes a
decoder. Used by tests/test_limits.py, the readers' own test files and, at full size, by
``python -m tests.fuzz.hostile DIR`` (the corpus measured for docs/limits.md)."""

from __future__ import annotations

import io
import os
import struct
import sys
import zipfile
import zlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image

ZEROS = bytes(1 << 20)


def _deflate(chunks: Iterable[bytes], raw: bool = True) -> bytes:
    """A deflate stream (raw, as DICOM and zip use it, or zlib-wrapped as PNG does)."""
    packer = zlib.compressobj(1, zlib.DEFLATED, -15 if raw else 15)
    return b"".join(packer.compress(chunk) for chunk in chunks) + packer.flush()


def zero_chunks(n: int) -> Iterable[bytes]:
    """``n`` zero bytes, a MiB at a time."""
    for start in range(0, n, len(ZEROS)):
        yield ZEROS[:min(len(ZEROS), n - start)]


# ------------------------------------------------------------------------------------- images


def small_png(value: int = 0, size: int = 16) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((size, size), value, np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16bit(side: int, full: bool = True) -> bytes:
    """A grey 16-bit PNG of ``side``² pixels; ``full``: its whole (zero) pixel stream, which
    deflates a thousandfold (13000² = 338 MB decoded from 330 KB)."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0))
    row = 1 + 2 * side  # a filter byte per row
    data = _deflate(zero_chunks(row * side if full else row), raw=False)
    return b"\x89PNG\r\n\x1a\n" + header + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def dds_unsupported() -> bytes:
    """A DDS header with a FourCC pixel format Pillow does not implement (NotImplementedError
    from Image.open itself)."""
    header = bytearray(124)
    struct.pack_into("<3I", header, 0, 124, 0x1007, 16)  # size, flags, height
    struct.pack_into("<I", header, 12, 16)  # width
    struct.pack_into("<4I", header, 72, 32, 0x4, 0x5A595857, 0)  # FOURCC "WXYZ"
    return b"DDS " + bytes(header) + bytes(256)


# -------------------------------------------------------------------------------------- DICOM


def _dicom_parts(rows: int, columns: int, syntax: str, **tags: object) -> tuple[bytes, bytes]:
    """(preamble + file meta, data set body without pixel data) written by pydicom."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = "1.2.3.4"
    meta.TransferSyntaxUID = syntax
    head = DicomBytesIO()
    head.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    return head.getvalue(), body.getvalue()


def _pixel_header(n: int) -> bytes:
    return b"\xe0\x7f\x10\x00OW\0\0" + struct.pack("<I", n)


def dicom(rows: int, columns: int, pixel_bytes: int | None = None, deflated: bool = False,
          frames: str | None = None, **tags: object) -> bytes:
    """A 16-bit grey DICOM declaring rows x columns, holding ``pixel_bytes`` zero bytes of
    pixel data (default: all of them); ``deflated``: Deflated Explicit VR Little Endian, so
    20000² x 16 bit = 800 MB inflates from under a megabyte. ``frames``: NumberOfFrames as
    written, even junk such as "x" (pydicom would refuse to write that, so it is patched in)."""
    from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

    if frames is not None:
        tags["NumberOfFrames"] = "7"
    head, body = _dicom_parts(rows, columns, DeflatedExplicitVRLittleEndian if deflated
                              else ExplicitVRLittleEndian, **tags)
    if frames is not None:
        text = (frames + " " * (len(frames) % 2)).encode()
        body = body.replace(b"\x28\x00\x08\x00IS\x02\x007 ",
                            b"\x28\x00\x08\x00IS" + struct.pack("<H", len(text)) + text)
    n = rows * columns * 2 if pixel_bytes is None else pixel_bytes
    n += n % 2
    parts = [body, _pixel_header(n), *zero_chunks(n)]
    return head + (_deflate(parts) if deflated else b"".join(parts))


def dicom_nested(depth: int) -> bytes:
    """A DICOM whose data set is one sequence nested ``depth`` deep (undefined lengths)."""
    from pydicom.uid import ExplicitVRLittleEndian

    head, _ = _dicom_parts(8, 8, ExplicitVRLittleEndian)
    open_sq = b"\x08\x00\x15\x11SQ\0\0\xff\xff\xff\xff"  # (0008,1115), undefined length
    open_item = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
    close_item = b"\xfe\xff\x0d\xe0\0\0\0\0"
    close_sq = b"\xfe\xff\xdd\xe0\0\0\0\0"
    return head + (open_sq + open_item) * depth + (close_item + close_sq) * depth


# ---------------------------------------------------------------------------------------- npz


def npy_header(shape: tuple[int, ...], dtype: str = "<i8", raw: bytes | None = None) -> bytes:
    """A version 1.0 ``.npy`` header declaring ``shape`` (or ``raw`` header text)."""
    text = raw if raw is not None else (
        f"{{'descr': '{dtype}', 'fortran_order': False, 'shape': {shape}, }}".encode())
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text


def write_npz(path: Path, members: dict[str, bytes]) -> Path:
    """An npz whose members are given as raw ``.npy`` bytes, deflated."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for key, payload in members.items():
            archive.writestr(f"{key}.npy", payload)
    return path


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array)
    return buffer.getvalue()


def write_npz_stream(path: Path, key: str, header: bytes, n_zero_bytes: int,
                     others: dict[str, bytes]) -> Path:
    """An npz with one member streamed (a header, then ``n_zero_bytes`` zeros): a 2.4 GB
    member in a few MB without ever holding it."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, payload in others.items():
            archive.writestr(f"{name}.npy", payload)
        with archive.open(f"{key}.npy", "w", force_zip64=True) as member:
            member.write(header)
            for chunk in zero_chunks(n_zero_bytes):
                member.write(chunk)
    return path


def good_images(n: int = 8, side: int = 16) -> np.ndarray:
    """``n`` distinct small uint8 images."""
    return (np.arange(n, dtype=np.uint8)[:, None, None] * 17 + np.zeros((side, side), np.uint8))


def good_labels(n: int = 8) -> np.ndarray:
    return np.arange(n, dtype=np.int64) % 2


# ---------------------------------------------------------------------------------------- CSV


def csv_folder(root: Path, n: int = 8) -> list[str]:
    """``n`` good small PNGs under root/img/, returned as CSV rows ``img/<i>.png,<label>``."""
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        (root / "img" / f"{i}.png").write_bytes(small_png(i * 10))
        rows.append(f"img/{i}.png,{'ab'[i % 2]}")
    return rows


# ------------------------------------------------------------------------- the whole corpus


def build_corpus(root: Path, full: bool = True) -> dict[str, list[str]]:
    """Every row of issue 26's table that concerns readers: name -> preprocess arguments
    (besides --output). ``full``: the bombs hold all their (zero) data, as measured for
    docs/limits.md (14 s to build); else the npz bombs are cut after a MiB (refused at the
    header all the same) and the other bombs are built once, just above the limits."""
    root.mkdir(parents=True, exist_ok=True)
    cases: dict[str, list[str]] = {}

    def csv_case(name: str, text: str, rows: int = 24, **files: bytes) -> None:
        folder = root / name
        good = csv_folder(folder, rows)
        for file_name, payload in files.items():
            (folder / file_name).write_bytes(payload)
        (folder / "labels.csv").write_text(text.replace("{good}", "\n".join(good)))
        cases[name] = ["--source", str(folder / "labels.csv")]

    csv_case("csv_commas", "path,label\n" + "," * 10_000_000 + "\n")
    csv_case("csv_deep_path", "path,label\n" + "a/" * 5_000_000 + "x.png,a\n{good}\n")
    csv_case("csv_big_header", "path,label," + "h" * 10_000_000 + "\n{good}\n")
    csv_case("csv_big_path", "path,label\n{good}\n" + "p" * 10_000_000 + ",a\n")
    csv_case("csv_many_labels", "path,label\n" + "".join(
        f"img/{i}.png,label{i}\n" for i in range(150_000)))
    fifo_dir = root / "csv_fifo"
    csv_case("csv_fifo", "path,label\n{good}\nfifo.png,a\n")
    os.mkfifo(fifo_dir / "fifo.png")
    cases["csv_fifo_skip"] = [*cases["csv_fifo"], "--skip-bad"]

    labels_header = npy_header((300_000_000,))
    cases["npz_label_bomb"] = ["--source", str(write_npz_stream(
        root / "label_bomb.npz", "train_labels", labels_header,
        2_400_000_000 if full else 1 << 20,
        {"train_images": npy(good_images())}))]
    cases["npz_image_bomb"] = ["--source", str(write_npz_stream(
        root / "image_bomb.npz", "train_images", npy_header((2, 50000, 50000), "|u1"),
        5_000_000_000 if full else 1 << 20, {"train_labels": npy(good_labels(2))}))]
    cases["npz_header_1e12"] = ["--source", str(write_npz(root / "header_1e12.npz", {
        "train_images": npy(good_images()), "train_labels": npy_header((10**12,))}))]
    cases["npz_header_truncated"] = ["--source", str(write_npz(root / "header_cut.npz", {
        "train_images": npy(good_images()),
        "train_labels": npy_header((8,), raw=b"{'descr': '<i8', 'shape': (8,")}))]
    wide = np.zeros((4, 8, 200000), np.uint8) + np.arange(4, dtype=np.uint8)[:, None, None] * 60
    cases["npz_wide_default_size"] = ["--source", str(write_npz(root / "wide.npz", {
        "train_images": npy(wide), "train_labels": npy(good_labels(4)),
        "val_images": npy(wide), "val_labels": npy(good_labels(4)),
        "test_images": npy(wide), "test_labels": npy(good_labels(4))}))]

    def folder_case(name: str, files: dict[str, bytes], *extra: str) -> None:
        for i in range(12):
            for label in ("a", "b"):
                path = root / name / label / f"good{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(small_png(i * 20 + (label == "b") * 10))
        for file_name, payload in files.items():
            (root / name / "a" / file_name).write_bytes(payload)
        cases[name] = ["--source", str(root / name), *extra]

    copies = 2 if full else 1
    # 12300² x 2 bytes = 303 MB: just above max_image_bytes + 16 MiB.
    side = 20000 if full else 12300
    folder_case("dicom_deflated_bomb", {f"d{i}.dcm": dicom(side, side, deflated=True)
                                        for i in range(copies)})
    folder_case("png16_13000", {f"p{i}.png": png_16bit(13000) for i in range(copies)})
    bad = {"nested.dcm": dicom_nested(5000), "frames.dcm": dicom(64, 64, frames="x"),
           "dds.png": dds_unsupported()}
    folder_case("decoder_crashes", bad)
    folder_case("decoder_crashes_skip", bad, "--skip-bad")
    folder_case("non_utf8_name", {})
    (root / "non_utf8_name" / "a").joinpath(os.fsdecode(b"\xff\xfe.png")).write_bytes(
        small_png(99))
    cases["non_utf8_name_skip"] = [*cases["non_utf8_name"], "--skip-bad"]
    folder_case("image_size_50000", {}, "--image-size", "50000")
    return cases


def run_corpus(cases: dict[str, list[str]], output_root: Path) -> dict[str, dict]:
    """Run ``lungxray preprocess`` on each case in this process (one interpreter start for
    all; run it under a memory limit): exit code, stderr, seconds, staging folders left and
    the files skipped."""
    import contextlib
    import json
    import time

    from lungxray import cli

    results = {}
    for name, arguments in cases.items():
        output = output_root / name / "prepared"
        stderr, start = io.StringIO(), time.perf_counter()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            try:
                # A few dozen images each: too few for the shift proxy's clusters.
                code = cli.main(["preprocess", *arguments, "--output", str(output),
                                 "--shifted-test-fraction", "0"])
            except SystemExit as exit_:
                code = exit_.code
        manifest = output / "manifest.json"
        results[name] = {
            "rc": code, "stderr": stderr.getvalue(),
            "seconds": round(time.perf_counter() - start, 2),
            "staging": [p.name for p in output.parent.glob(".prepare-*")],
            "skipped": len(json.loads(manifest.read_text())["skipped"])
            if manifest.exists() else None}
    return results


if __name__ == "__main__":
    # python -m tests.fuzz.hostile DIR: build the full corpus and list its cases;
    # python -m tests.fuzz.hostile --run DIR OUT [--quick]: build and run it, JSON results.
    if sys.argv[1] == "--run":
        import json

        corpus = build_corpus(Path(sys.argv[2]), full="--quick" not in sys.argv)
        print(json.dumps(run_corpus(corpus, Path(sys.argv[3]))))
    else:
        for case, arguments in build_corpus(Path(sys.argv[1])).items():
            print(case, " ".join(arguments))
