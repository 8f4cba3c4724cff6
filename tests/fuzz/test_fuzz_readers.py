"""Property-based fuzzing of every reader (issue 26): whatever bytes come in, a reader returns
or raises the project's one-line DataError, within a time bound (Hypothesis' deadline and
pytest-timeout), and writes nothing outside its output.

Limits are set low here so that generated inputs reach every limit's branch cheaply.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from PIL import Image

from lungxray import data, images, predict, prepare, raw_source
from lungxray import limits as limiting
from lungxray.errors import DataError, safe_name
from tests.data_helpers import tree_digest
from tests.fuzz import hostile

# Per test: the short profile's runs take seconds; the long one's (make fuzz) minutes.
TIMEOUT = 300 if settings().max_examples < 1000 else 3600
SMALL = limiting.with_overrides(limiting.DEFAULT, {
    "max_image_pixels": 1_000_000, "max_image_bytes": 8 << 20, "max_file_bytes": 4 << 20,
    "max_npz_member_bytes": 4 << 20, "max_classes": 6, "max_csv_line": 300,
    "max_csv_field": 120, "max_csv_rows": 60, "max_path_chars": 100,
    "max_path_component": 40, "max_decode_bytes": 64 << 20})


def assert_one_line(err: DataError) -> None:
    text = str(err)
    assert isinstance(err, DataError)
    assert "\n" not in text and "\r" not in text and len(text) < 4000, text[:300]


# ---------------------------------------------------------------------------- CSV manifests

_CELL = st.one_of(
    st.sampled_from(["img/0.png", "img/1.png", "img/2.png", "missing.png", "../x.png",
                     "/etc/passwd", "C:\\x.png", "img\\1.png", "fifo", "link/x.png", "",
                     "a", "b", "train", "val", "test", "P1", " img/0.png ", '"q,uoted"']),
    st.text(max_size=30),
    st.text(alphabet=",\"\n\r/\\. a\0", max_size=60),
    st.integers(0, 400).map(lambda n: "x" * n),
)
_ROW = st.lists(_CELL, min_size=0, max_size=6).map(lambda cells: ",".join(cells))
_HEADER = st.sampled_from(["path,label", "path,label,split", "path,label,split,patient_id",
                           "label,path", "path", "path,label,path", "\ufeffpath,label", ""])


@st.composite
def csv_bytes(draw) -> bytes:
    text = "\n".join([draw(_HEADER), *draw(st.lists(_ROW, max_size=80))])
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.booleans()):  # stray bytes: not UTF-8, NULs
        raw += draw(st.binary(max_size=20))
    return raw


def _csv_folder(root: Path) -> None:
    (root / "img").mkdir(parents=True)
    for i in range(3):
        (root / "img" / f"{i}.png").write_bytes(hostile.small_png(i * 50))
    os.mkfifo(root / "fifo")
    os.symlink(root.parent, root / "link")


@contextlib.contextmanager
def _source(raw: bytes, name: str) -> Iterator[Path]:
    """``raw`` as ``src/<name>`` in a temp dir; a CSV beside images, a FIFO and a symlink out."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        if name.endswith(".csv"):
            _csv_folder(root)
        root.mkdir(exist_ok=True)
        (root / name).write_bytes(raw)
        yield root / name


@pytest.mark.timeout(TIMEOUT)
@given(raw=csv_bytes())
def test_fuzz_csv_manifest_returns_or_raises_one_line(raw):
    with _source(raw, "labels.csv") as csv:
        root = csv.parent
        try:
            source = raw_source.open_source(str(csv), limits=SMALL)
        except DataError as err:
            assert_one_line(err)
            return
        assert 1 <= len(source.class_names) <= SMALL.max_classes
        for split in source.splits.values():
            for item in split.items:
                assert item.path.resolve().is_relative_to(root.resolve())


# ---------------------------------------------------------------------------------- npz files

_DTYPES = st.sampled_from(["|u1", "<i8", "<u8", "<f4", "|b1", "|O", "<U3", "V8", "<i2"])
_SHAPES = st.lists(st.one_of(st.integers(0, 40), st.integers(0, 10**13)), max_size=5).map(tuple)


@st.composite
def npy_member(draw) -> bytes:
    kind = draw(st.sampled_from(["header", "valid", "random", "raw_header"]))
    if kind == "valid":
        n = draw(st.integers(0, 12))
        side = draw(st.integers(1, 20))
        dtype = draw(st.sampled_from([np.uint8, np.int64, np.float32]))
        shape = draw(st.sampled_from([(n,), (n, 1), (n, side, side), (n, side, side, 3),
                                      (n, side, side, 2)]))
        payload = hostile.npy(np.zeros(shape, dtype) + draw(st.integers(0, 3)))
    elif kind == "header":
        payload = hostile.npy_header(draw(_SHAPES), draw(_DTYPES))
        payload += draw(st.binary(max_size=200))
    elif kind == "raw_header":
        payload = hostile.npy_header((1,), raw=draw(st.binary(max_size=120)))
    else:
        payload = draw(st.binary(max_size=300))
    cut = draw(st.one_of(st.none(), st.integers(0, len(payload))))
    return payload if cut is None else payload[:cut]


@st.composite
def npz_bytes(draw) -> bytes:
    keys = draw(st.lists(st.sampled_from(
        ["train_images", "train_labels", "val_images", "val_labels", "test_images",
         "test_labels", "images", "x"]), min_size=0, max_size=6, unique=True))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", draw(st.sampled_from([zipfile.ZIP_STORED,
                                                            zipfile.ZIP_DEFLATED]))) as archive:
        for key in keys:
            archive.writestr(f"{key}.npy", draw(npy_member()))
    raw = buffer.getvalue()
    if draw(st.booleans()) and raw:  # flip some bytes of the archive itself
        raw = bytearray(raw)
        for position, value in draw(st.lists(st.tuples(st.integers(0, len(raw) - 1),
                                                        st.integers(0, 255)), max_size=4)):
            raw[position] = value
        raw = bytes(raw)
    return raw


@pytest.mark.timeout(TIMEOUT)
@given(raw=npz_bytes())
def test_fuzz_npz_headers_and_members_return_or_raise_one_line(raw):
    with _source(raw, "data.npz") as path:
        try:
            source = raw_source.open_source(str(path), limits=SMALL)
            for split in source.splits.values():
                for chunk in split.chunks(4):
                    assert chunk.dtype == np.uint8 and chunk.ndim == 4
        except DataError as err:
            assert_one_line(err)


# ------------------------------------------------------------------ predict's source listing


def assert_listed(listing: predict.Listing, root: Path) -> list[predict.Entry]:
    """Every batch of a listing: names printable on one UTF-8 line, files inside the root."""
    found = []
    for batch, rows in listing.batches(5):
        assert 1 <= len(batch) <= 5
        if rows is not None:
            assert rows.dtype == np.uint8 and rows.ndim == 4 and len(rows) == len(batch)
        for entry in batch:
            assert safe_name(entry.origin) == entry.origin
            entry.origin.encode("utf-8")
            if entry.path is not None and entry.key == "":
                assert entry.path.resolve().is_relative_to(root.resolve())
        found += batch
    return found


@st.composite
def path_csv_bytes(draw) -> bytes:
    """A CSV as predict takes it: a 'path' column, maybe others, rows of likely paths."""
    header = draw(st.sampled_from(["path"] * 4 + ["path,note", "note,path", "\ufeffpath",
                                                  "path,path", "x", "path,label"]))
    rows = draw(st.lists(st.one_of(_CELL, _CELL, st.lists(_CELL, min_size=1, max_size=2).map(
        ",".join)), max_size=40))
    return "\n".join([header, *rows]).encode("utf-8", "surrogatepass")


@st.composite
def image_npz_bytes(draw) -> bytes:
    """An unlabeled npz: image members, valid or not, and other members that are ignored."""
    keys = draw(st.lists(st.sampled_from(["images", "train_images", "val_images", "test_images",
                                          "train_labels", "x"]), max_size=4, unique=True))
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for key in keys:
            if draw(st.integers(0, 3)):
                shape = (draw(st.integers(0, 6)), draw(st.integers(1, 20)),
                         draw(st.integers(1, 20)), *draw(st.sampled_from([(), (1,), (3,)])))
                member = hostile.npy(np.full(shape, draw(st.integers(0, 255)), np.uint8))
                cut = draw(st.one_of(st.none(), st.integers(0, len(member))))
                archive.writestr(f"{key}.npy", member if cut is None else member[:cut])
            else:
                archive.writestr(f"{key}.npy", draw(npy_member()))
    return buffer.getvalue()


def _listed(raw: bytes, name: str) -> tuple[predict.Listing, list[predict.Entry]] | None:
    """predict's listing of ``raw`` as ``src/<name>``, read to its end; None when it is refused
    with a one-line DataError."""
    with _source(raw, name) as path:
        try:
            listing = predict.list_source(str(path), limits=SMALL)
            return listing, assert_listed(listing, path.parent)
        except DataError as err:
            assert_one_line(err)
            event(f"refused: {str(err).partition(': ')[2][:20]}")
            return None


@pytest.mark.timeout(TIMEOUT)
@given(raw=st.one_of(csv_bytes(), path_csv_bytes()))
def test_fuzz_predict_csv_listing_streams_or_raises_one_line(raw):
    """predict's CSV listing (a 'path' column, the rest ignored) is the data step's reader."""
    if (listed := _listed(raw, "labels.csv")) is not None:
        listing, found = listed
        event("stopped by a bad row" if listing.stops else "listed")
        assert 1 <= len(found) <= SMALL.max_csv_rows
        if listing.stops:
            assert_one_line(listing.stops.error("labels.csv", "bad row(s)"))


@pytest.mark.timeout(TIMEOUT)
@given(raw=st.one_of(npz_bytes(), image_npz_bytes()))
def test_fuzz_predict_npz_listing_reads_or_raises_one_line(raw):
    if (listed := _listed(raw, "data.npz")) is not None:
        event("listed")
        assert len(listed[1]) == listed[0].total


_NAME = st.binary(min_size=1, max_size=24).filter(
    lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))


@pytest.mark.timeout(TIMEOUT)
@given(names=st.lists(st.tuples(st.booleans(), _NAME), max_size=8, unique=True),
       fifo=st.booleans())
def test_fuzz_predict_folder_listing_keeps_every_name(names, fifo):
    """Any bytes the file system allows as a name: every visible file is listed once, its
    name escaped, never dropped (issue 34)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = os.fsencode(Path(tmp) / "src")
        os.makedirs(root + b"/sub\xff")
        expected = set()
        for nested, name in names:
            path = root + (b"/sub\xff/" if nested else b"/") + name
            with open(path, "wb") as fh:
                fh.write(hostile.small_png(len(name)))
            if not name.startswith(b".") and os.fsdecode(name) not in {"Thumbs.db",
                                                                      "desktop.ini"}:
                expected.add(safe_name(os.fsdecode(path[len(root) + 1:])))
        if fifo:
            os.mkfifo(root + b"/pipe")
            expected.add("pipe")
        try:
            listing = predict.list_source(os.fsdecode(root), limits=SMALL)
        except DataError as err:
            assert not expected and "holds no image files" in str(err)
            return
        found = assert_listed(listing, Path(os.fsdecode(root)))
        assert sorted(e.origin for e in found) == sorted(expected)  # escaped names may repeat
        assert [e.problem for e in found if e.origin == "pipe"] in ([], [
            "not a regular file (FIFO)"])


# -------------------------------------------------------------------------------- image bytes


def _seeds() -> dict[str, bytes]:
    """One small valid file per format the readers meet, to mutate."""
    grey = (np.arange(24 * 24, dtype=np.uint8) % 251).reshape(24, 24)
    out = {}
    for name, (fmt, mode) in {"png": ("PNG", "L"), "jpg": ("JPEG", "L"), "tif": ("TIFF", "L"),
                              "rgb.png": ("PNG", "RGB"), "p.png": ("PNG", "P"),
                              "bmp": ("BMP", "L"), "gif": ("GIF", "L"),
                              "webp": ("WEBP", "RGB")}.items():
        buffer = io.BytesIO()
        Image.fromarray(grey).convert(mode).save(buffer, fmt)
        out[name] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.fromarray(grey.astype(np.uint16) * 200).save(buffer, "PNG")
    out["16.png"] = buffer.getvalue()
    buffer = io.BytesIO()
    Image.new("RGB", (16, 16)).save(buffer, "DDS")
    out["dds"] = buffer.getvalue()
    out["dcm"] = hostile.dicom(24, 24)
    out["deflated.dcm"] = hostile.dicom(24, 24, deflated=True)
    out["window.dcm"] = hostile.dicom(24, 24, WindowCenter=100, WindowWidth=50,
                                      RescaleSlope=2, RescaleIntercept=-10)
    out["nested.dcm"] = hostile.dicom_nested(30)
    out["unsupported.dds"] = hostile.dds_unsupported()
    out["big16.png"] = hostile.png_16bit(1200, full=False)
    return out


SEEDS = _seeds()
_NAMES = st.sampled_from(["x.png", "x.jpg", "x.dcm", "x", "x.tif", "x.dicom", "x.dds"])


@st.composite
def image_bytes(draw) -> bytes:
    seed = SEEDS[draw(st.sampled_from(sorted(SEEDS)))]
    raw = bytearray(seed)
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "repeat"]))
        position = draw(st.integers(0, max(0, len(raw) - 1)))
        if action == "flip" and raw:
            raw[position] = draw(st.integers(0, 255))
        elif action == "cut":
            del raw[position:position + draw(st.integers(1, 64))]
        elif action == "insert":
            raw[position:position] = draw(st.binary(min_size=1, max_size=16))
        else:
            raw[position:position] = raw[position:position + 32] * draw(st.integers(1, 8))
    return bytes(raw)


_SIDE = st.one_of(st.integers(0, 64), st.integers(0, 65535))  # DICOM Rows/Columns are US


@st.composite
def declared_bytes(draw) -> bytes:
    """Headers declaring any size, with little data behind them: every size check's branch."""
    if draw(st.booleans()):
        return hostile.png_16bit(max(1, draw(_SIDE)), full=False)
    return hostile.dicom(draw(_SIDE), draw(_SIDE), pixel_bytes=draw(st.integers(0, 9000)),
                         deflated=draw(st.booleans()),
                         frames=draw(st.one_of(st.none(), st.sampled_from(
                             ["1", "0", "2", "-1", "x", "1e9", "", "99999999999"]))))


@pytest.mark.timeout(TIMEOUT)
@given(raw=st.one_of(image_bytes(), declared_bytes(), st.binary(max_size=200)), name=_NAMES,
       channels=st.sampled_from([1, 3]), keep_aspect=st.booleans())
def test_fuzz_image_bytes_decode_or_raise_image_error(raw, name, channels, keep_aspect):
    try:
        out = images.decode(raw, name, 16, channels, keep_aspect, limits=SMALL,
                            budget=images.Budget(SMALL.max_decode_bytes))
    except images.ImageError as err:
        assert_one_line(err)
        event(f"refused: {str(err)[:24]}")
        return
    event("decoded")
    assert out.shape == (16, 16, channels) and out.dtype == np.uint8


# --------------------------------------------------------------------- preprocess end to end


@pytest.mark.timeout(TIMEOUT)
@settings(max_examples=max(10, settings().max_examples // 20))  # a whole run per example
@given(files=st.lists(st.tuples(st.sampled_from(["a", "b"]), image_bytes()), max_size=6),
       skip_bad=st.booleans())
def test_fuzz_preprocess_writes_only_its_output(files, skip_bad):
    """A folder of good and mutated files: preprocess succeeds or raises one line, never
    changes the source, and leaves nothing beside its output (no staging folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "src"
        for i in range(6):
            for label in ("a", "b"):
                (root / label).mkdir(parents=True, exist_ok=True)
                (root / label / f"good{i}.png").write_bytes(
                    hostile.small_png(i * 40 + (label == "b") * 10))
        for i, (label, raw) in enumerate(files):
            (root / label / f"fuzz{i}.{['png', 'dcm', 'jpg'][i % 3]}").write_bytes(raw)
        before = tree_digest(root)
        output = Path(tmp) / "out" / "prepared"
        try:
            manifest = prepare.preprocess(str(root), output, image_size=16, seed=0,
                                          val_fraction=0.25, test_fraction=0.25,
                                          skip_bad=skip_bad, limits=SMALL, workers=2)
            assert data.is_prepared(output) and len(manifest["skipped"]) <= len(files)
        except DataError as err:
            assert_one_line(err)
            assert not output.exists()
        assert tree_digest(root) == before
        # a failed first run removes the folder it made; a success holds only its output
        out = Path(tmp) / "out"
        assert not out.exists() or [p.name for p in out.iterdir()] == ["prepared"]
