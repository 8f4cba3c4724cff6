"""`lungxray predict`'s input side under hostile input, without a model: everything here is
refused (or listed) before a model is loaded, through the data step's bounded readers.

The end-to-end cases that need a model (names written to predictions.csv, a CSV of missing
files streamed, signals) are in tests/test_predict.py.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lungxray import limits as limiting
from lungxray import predict
from lungxray.errors import ConfigError, DataError, ModelError, safe_name
from tests.fuzz import hostile

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def model_dir(tmp_path) -> Path:
    """A folder standing in for a model: every case here fails before it is loaded."""
    path = tmp_path / "model"
    path.mkdir()
    return path


def one_line(err: pytest.ExceptionInfo, most: int = 2000) -> str:
    text = str(err.value)
    assert "\n" not in text and "\r" not in text and len(text) < most, text[:300]
    return text


def write_csv(path: Path, rows: list[str], header: str = "path") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join([header, *rows]) + "\n")
    return path


def entries(listing: predict.Listing) -> list[predict.Entry]:
    return [entry for batch, _ in listing.batches(7) for entry in batch]


# ---------------------------------------------------------------------------------------- npz


def test_npz_member_of_huge_images_is_refused_at_its_header(model_dir, tmp_path):
    """Issue 34: a 7.5 MB npz with a (2, 30000, 30000) member took > 3 GiB; the header alone
    is refused now (here with 1 MiB of its 1.8 GB behind it), in a few MiB."""
    npz = hostile.write_npz_stream(tmp_path / "big.npz", "images",
                                   hostile.npy_header((2, 30000, 30000), "|u1"), 1 << 20, {})
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"images of 30000x30000 = 900,000,000 pixels, "
                                            r"above the limit of 40,000,000 \(max_image_pixels\)"):
            predict.predict(model_dir, str(npz), tmp_path / "out")
        assert tracemalloc.get_traced_memory()[1] < 32 << 20
    finally:
        tracemalloc.stop()
    assert not (tmp_path / "out").exists()


def test_npz_header_declaring_a_trillion_rows_is_refused(model_dir, tmp_path):
    """Issue 34: a 216-byte member header declaring 10**12 rows; nothing is listed per row."""
    npz = hostile.write_npz(tmp_path / "rows.npz", {
        "images": hostile.npy_header((10**12, 28, 28), "|u1")})
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=r"images: declares 1000000000000x28x28x1 of uint8 = "
                                            r"784,000,000,000,000 bytes but holds 0 "
                                            r"\(truncated\)") as err:
            predict.predict(model_dir, str(npz), tmp_path / "out")
        assert tracemalloc.get_traced_memory()[1] < 16 << 20
    finally:
        tracemalloc.stop()
    one_line(err)


@pytest.mark.parametrize(("members", "message"), [
    ({"train_images": hostile.npy_header((4, 16, 16), "|u1") + b"\0" * 100},
     r"train_images: declares 4x16x16x1 of uint8 = 1,024 bytes but holds 100 \(truncated\)"),
    ({"images": hostile.npy_header((4, 16, 16), "<f4")}, r"expected uint8 pixels"),
    ({"images": hostile.npy_header((4, 16), "|u1")}, r"expected images shaped"),
    ({"images": b"\x93NUMPY\x01\x00\xff"}, r"invalid .npy header"),
    ({"images": hostile.npy_header((10**30, 16, 16), "|u1")}, r"invalid .npy header \(shape"),
    ({"labels": hostile.npy(np.zeros(3, np.int64))}, r"no image key"),
])
def test_npz_image_members_are_checked_as_the_data_step_checks_them(model_dir, tmp_path,
                                                                    members, message):
    npz = hostile.write_npz(tmp_path / "bad.npz", members)
    with pytest.raises(DataError, match=message) as err:
        predict.predict(model_dir, str(npz), tmp_path / "out")
    one_line(err)


def test_npz_rows_stream_in_bounded_chunks(tmp_path, monkeypatch):
    """Big images come a few at a time whatever the batch size: a batch holds at most
    CHUNK_BYTES of source pixels (and one image at least)."""
    images = np.arange(6 * 64 * 64, dtype=np.uint64).astype(np.uint8).reshape(6, 64, 64)
    npz = tmp_path / "x.npz"
    np.savez(npz, train_images=images[:4], test_images=images[4:])
    monkeypatch.setattr(predict, "CHUNK_BYTES", 2 * 64 * 64)
    listing = predict.list_source(str(npz))
    batches = list(listing.batches(64))
    assert [len(rows) for _, rows in batches] == [2, 2, 2]
    assert [e.origin for batch, _ in batches for e in batch] == [
        "train_images[0]", "train_images[1]", "train_images[2]", "train_images[3]",
        "test_images[0]", "test_images[1]"]
    assert np.array_equal(np.concatenate([rows for _, rows in batches])[..., 0], images)


# ---------------------------------------------------------------------------------------- CSV


@pytest.mark.parametrize(("row", "message"), [
    ("../outside.png", r"line 2: path '../outside.png' contains '\.\.'"),
    ("a\\..\\..\\outside.png", r"contains '\.\.'"),
    ("/etc/passwd", r"absolute path '/etc/passwd' is not allowed"),
    ("C:\\x.png", r"absolute path 'C:/x.png' is not allowed"),
    ("\\\\server\\share\\x.png", r"absolute path"),
    ("a" * 300 + ".png", r"has a component longer than 255 characters \(max_path_component\)"),
])
def test_csv_paths_that_leave_its_folder_or_are_too_long_are_refused(model_dir, tmp_path, row,
                                                                      message):
    csv = write_csv(tmp_path / "src" / "todo.csv", [f'"{row}"'])
    with pytest.raises(DataError, match=message) as err:
        predict.predict(model_dir, str(csv), tmp_path / "out")
    assert "1 bad row(s)" in one_line(err)
    assert not (tmp_path / "out").exists()


def test_csv_path_over_max_path_chars_is_refused_before_it_is_resolved(model_dir, tmp_path,
                                                                       monkeypatch):
    monkeypatch.setenv("LUNGXRAY_MAX_CSV_FIELD", "200000")
    monkeypatch.setenv("LUNGXRAY_MAX_CSV_LINE", "200000")
    csv = write_csv(tmp_path / "src" / "todo.csv", ["a/" * 50_000 + "x.png"])
    with pytest.raises(DataError, match=r"\(100005 characters\) is longer than 4096 characters "
                                        r"\(max_path_chars\)") as err:
        predict.predict(model_dir, str(csv), tmp_path / "out")
    one_line(err)


def test_csv_symlink_out_of_its_folder_is_refused(model_dir, tmp_path):
    (tmp_path / "secret.png").write_bytes(hostile.small_png(1))
    csv = write_csv(tmp_path / "src" / "todo.csv", ["link.png"])
    os.symlink(tmp_path / "secret.png", tmp_path / "src" / "link.png")
    with pytest.raises(DataError, match=r"line 2: path 'link.png' leads outside the CSV's "
                                        r"folder \(symlink\)"):
        predict.predict(model_dir, str(csv), tmp_path / "out")


@pytest.mark.parametrize(("text", "message"), [
    ("", r"empty file"),
    ("name,label\nx.png,a\n", r"missing column\(s\) \['path'\]; expected a 'path' column"),
    ("path\n", r"has a header but no rows"),
    ("path,path\nx.png,y.png\n", r"repeated column names"),
    ("path\n" + "," * 20000 + "\n", r"line 2 is longer than 16,384 characters \(max_csv_line\)"),
    ("path\n\"open quote\n", r"not a readable CSV"),
])
def test_csv_header_and_shape_problems_are_one_line(model_dir, tmp_path, text, message):
    (tmp_path / "todo.csv").write_text(text)
    with pytest.raises(DataError, match=message) as err:
        predict.predict(model_dir, str(tmp_path / "todo.csv"), tmp_path / "out")
    one_line(err)


def test_csv_not_utf8_is_one_line(model_dir, tmp_path):
    (tmp_path / "todo.csv").write_bytes(b"path\nimg/\xff.png\n")
    with pytest.raises(DataError, match=r"not UTF-8 text"):
        predict.predict(model_dir, str(tmp_path / "todo.csv"), tmp_path / "out")


def test_csv_is_read_as_it_streams_in_flat_memory(tmp_path):
    """30 000 rows of missing files: listed a batch at a time, never held (held, they would
    take 4 MiB), each a bad file known before any decoding (so no thread opens it)."""
    rows = [f"img/missing_{i}.png" for i in range(30_000)]
    csv = write_csv(tmp_path / "todo.csv", rows, header="id,path,note")
    csv.write_text(csv.read_text().replace("\n", ",x\n").replace("id,path,note,x", "id,path,note"))
    tracemalloc.start()
    try:
        listing = predict.list_source(str(csv))
        assert listing.total is None  # a CSV is counted as it streams
        count = bad = 0
        for batch, rows_ in listing.batches(64):
            assert rows_ is None and len(batch) <= 64
            count += len(batch)
            bad += sum(entry.problem == predict.MISSING for entry in batch)
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()
    assert count == bad == 30_000


def test_csv_rows_are_bounded_by_max_csv_rows(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGXRAY_MAX_CSV_ROWS", "1000")
    csv = write_csv(tmp_path / "todo.csv", [f"m{i}.png" for i in range(5000)])
    listing = predict.list_source(str(csv))
    with pytest.raises(DataError, match=r"more than 1,000 rows \(max_csv_rows\)"):
        entries(listing)


def test_progress_is_printed_while_a_folder_is_listed(tmp_path, monkeypatch):
    for i in range(5):
        (tmp_path / "src" / f"d{i}").mkdir(parents=True)
        (tmp_path / "src" / f"d{i}" / "x.png").write_bytes(hostile.small_png(i))
    monkeypatch.setattr(predict, "PROGRESS_EVERY_S", 0.0)
    stream = io.StringIO()
    predict.list_source(str(tmp_path / "src"), meter=predict.Progress(stream))
    lines = stream.getvalue().splitlines()
    assert len(lines) == 5 and lines[-1] == f"predict: listing {tmp_path / 'src'}: 5 files so far"


# ------------------------------------------------------------------------------------ folders


def test_folder_names_are_data_listed_escaped_never_dropped(tmp_path):
    root = tmp_path / "src"
    (root / "sub").mkdir(parents=True)
    raw_names = [b"\xff\xfe.png", b'a\nb,"c".png', b"tab\there.png", b"ok.png", b"sub/\xc3.png"]
    for raw in raw_names:
        Path(os.fsdecode(os.fsencode(root) + b"/" + raw)).write_bytes(hostile.small_png(3))
    os.mkfifo(root / "pipe.png")
    (root / ".hidden").mkdir()
    (root / ".hidden" / "x.png").write_bytes(b"never listed")
    (root / "Thumbs.db").write_bytes(b"litter")
    listing = predict.list_source(str(root))
    found = {entry.origin: entry.problem for entry in entries(listing)}
    assert found == {r"\xff\xfe.png": "", r'a\nb,"c".png': "", r"tab\there.png": "",
                     "ok.png": "", r"sub/\xc3.png": "", "pipe.png": "not a regular file (FIFO)"}
    assert listing.total == 6
    for entry in entries(predict.list_source(str(root))):
        assert safe_name(entry.origin) == entry.origin  # printable on one UTF-8 line
        entry.origin.encode("utf-8")
        if not entry.problem:
            assert entry.path.is_file()  # the real name is kept for reading


def test_deep_folders_are_walked_without_recursion(tmp_path):
    """A tree deeper than the recursion limit allows is still one listing (pathlib's rglob
    recursed: a RecursionError traceback). The limit is lowered instead of building a tree
    deeper than 1000, which shutil.rmtree (pytest's clean-up) could not remove."""
    deepest = tmp_path / ("d/" * 300)
    deepest.mkdir(parents=True)
    (deepest / "x.png").write_bytes(hostile.small_png(1))
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(len(inspect.stack()) + 120)
    try:
        (entry,) = entries(predict.list_source(str(tmp_path)))
    finally:
        sys.setrecursionlimit(limit)
    assert entry.origin == "d/" * 300 + "x.png"


def test_a_symlink_out_of_a_folder_is_that_files_problem(tmp_path):
    root = tmp_path / "src"
    root.mkdir()
    (tmp_path / "secret.png").write_bytes(hostile.small_png(1))
    os.symlink(tmp_path / "secret.png", root / "link.png")
    os.symlink(root / "loop", root / "loop")
    os.symlink(tmp_path, root / "up")  # a symlinked folder is never entered
    (root / "inner").mkdir()
    (root / "inner" / "x.png").write_bytes(hostile.small_png(2))
    os.symlink(root / "inner", root / "again")
    found = {e.origin: e.problem for e in entries(predict.list_source(str(root)))}
    assert found == {"link.png": "leads outside the source folder (symlink)",
                     "loop": found["loop"], "up": "leads outside the source folder (symlink)",
                     "inner/x.png": ""}
    assert found["loop"].startswith("unresolvable symlink")


# ---------------------------------------------------------------- arguments, checked up front


def test_arguments_and_outputs_are_refused_before_the_model_is_loaded(model_dir, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    (images / "x.png").write_bytes(hostile.small_png(1))
    (tmp_path / "file").write_text("x")
    (tmp_path / "mine" / "gradcam").mkdir(parents=True)  # the user's own: never removed
    (tmp_path / "odd" / "predictions.csv").mkdir(parents=True)
    cases = [
        (dict(model_dir=tmp_path / "nope"), ModelError, "no such model directory"),
        (dict(source=str(tmp_path / "void")), DataError, "no such file or directory"),
        (dict(source=""), DataError, "the source is empty"),
        (dict(source=str(tmp_path / "file")), DataError, "expected an image folder"),
        (dict(source="/dev/zero"), DataError, r"not a regular file \(character device\)"),
        (dict(source="x" * 5000), DataError, r"longer than 4096 characters \(max_path_chars\)"),
        (dict(output=tmp_path / "file"), ConfigError, "exists and is not a directory"),
        (dict(output=tmp_path / "file" / "out"), ConfigError, "is not a directory"),
        (dict(output=images / "out"), ConfigError, "lies inside the source folder"),
        (dict(output=model_dir / "out"), ConfigError, "lies inside the model folder"),
        (dict(output=tmp_path / "mine"), ConfigError, "holds gradcam but no predictions.csv"),
        (dict(output=tmp_path / "odd"), ConfigError, "predictions.csv there is a symlink or not "
                                                     "a regular file"),
        (dict(batch_size=0), ConfigError, "batch size must be between 1 and 4096, got 0"),
        (dict(batch_size=10**8), ConfigError, "batch size must be between 1 and 4096"),
        (dict(workers=-1), ConfigError, "workers must be 0"),
    ]
    for change, kind, message in cases:
        args = dict(model_dir=model_dir, source=str(images), output=tmp_path / "out") | change
        with pytest.raises(kind, match=message) as err:
            predict.predict(args.pop("model_dir"), args.pop("source"), args.pop("output"),
                            **args)
        one_line(err)
    assert not (tmp_path / "out").exists() and sorted(p.name for p in model_dir.iterdir()) == []
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["gradcam"]


def test_cli_fails_on_bad_arguments_before_tensorflow_is_imported(tmp_path):
    """Issue 34: a missing model, a missing source or a bad output fails in a second, one
    line, before `import tensorflow` (or keras) happens."""
    (tmp_path / "model").mkdir()
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "x.png").write_bytes(hostile.small_png(1))
    (tmp_path / "file").write_text("x")
    (tmp_path / "rows.npz").write_bytes(hostile.write_npz(tmp_path / "r.npz", {
        "images": hostile.npy_header((10**12, 28, 28), "|u1")}).read_bytes())
    model, src, out = str(tmp_path / "model"), str(tmp_path / "src"), str(tmp_path / "out")
    cases = [[str(tmp_path / "missing"), src, out], [model, str(tmp_path / "nope"), out],
             [model, src, str(tmp_path / "file")], [model, src, str(tmp_path / "src" / "o")],
             [model, str(tmp_path / "rows.npz"), out]]
    script = (
        "import json, sys, contextlib, io\n"
        "from lungxray import cli\n"
        "codes, errors = [], []\n"
        "for model, source, output in json.loads(sys.argv[1]):\n"
        "    err = io.StringIO()\n"
        "    with contextlib.redirect_stderr(err):\n"
        "        codes.append(cli.main(['predict', '--model', model, '--source', source,\n"
        "                               '--output', output]))\n"
        "    errors.append(err.getvalue())\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras'))\n"
        "print(json.dumps({'codes': codes, 'errors': errors, 'heavy': heavy}))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    run = subprocess.run([sys.executable, "-c", script, json.dumps(cases)], capture_output=True,
                         text=True, env=env, timeout=120, check=True)
    result = json.loads(run.stdout)
    assert result["heavy"] == []
    assert result["codes"] == [2] * len(cases)
    for text in result["errors"]:
        assert text.count("\n") == 1 and text.startswith("lungxray predict: error: "), text
    assert not (tmp_path / "out").exists()


def test_limits_come_from_the_environment(model_dir, tmp_path, monkeypatch):
    """The npz member checks use the same limits as the data step (LUNGXRAY_<LIMIT>)."""
    npz = tmp_path / "x.npz"
    np.savez(npz, images=np.zeros((3, 40, 40), np.uint8))
    assert predict.list_source(str(npz)).total == 3
    monkeypatch.setenv("LUNGXRAY_MAX_IMAGE_PIXELS", "1000")
    assert limiting.from_env().max_image_pixels == 1000
    with pytest.raises(DataError, match=r"40x40 = 1,600 pixels, above the limit of 1,000"):
        predict.predict(model_dir, str(npz), tmp_path / "out")
