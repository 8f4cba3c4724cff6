"""lungxray.storage against a real gcp-storage-emulator server (no mocks)."""

from __future__ import annotations

import base64
import io
import logging
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from gcp_storage_emulator.server import create_server
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage as gcs
from PIL import Image

from lungxray.errors import ConfigError
from lungxray.storage import StorageError, exists, fetch, is_gcs, parse_gcs, upload
from tests.gcs_preconditions import enforced

pytestmark = pytest.mark.timeout(120)


class RequestLog(logging.Handler):
    """Collects the emulator's access-log lines, so tests can count real media downloads."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def downloads(self, bucket: str) -> int:
        return sum(f"/download/storage/v1/b/{bucket}/o/" in line for line in self.lines)


@dataclass
class Emulator:
    host: str
    requests: RequestLog


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def emulator() -> Iterator[Emulator]:
    port = _free_port()
    requests = RequestLog()
    access_log = logging.getLogger("gcp_storage_emulator.server")
    old_level = access_log.level
    access_log.addHandler(requests)
    access_log.setLevel(logging.INFO)
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield Emulator(f"http://127.0.0.1:{port}", requests)
    finally:
        server.stop()
        access_log.removeHandler(requests)
        access_log.setLevel(old_level)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8), color=seed % 256).save(buf, format="PNG")
    return buf.getvalue()


# Objects under the prefix the tests fetch, plus neighbours that must not be fetched with it.
TREE = {
    "data/train/normal/a.png": _png(1),
    "data/train/pneumonia/b.png": _png(2),
    "data/test/normal/c.png": _png(3),
    "data/labels.csv": b"path,label\ntrain/normal/a.png,0\n",
}
NEIGHBOURS = {"data2/x.bin": b"\x00\x01", "other/readme.txt": b"hi"}


@dataclass
class Bucket:
    name: str
    handle: gcs.Bucket
    requests: RequestLog

    def uri(self, path: str = "") -> str:
        return f"gs://{self.name}/{path}"

    def put(self, name: str, data: bytes) -> None:
        self.handle.blob(name).upload_from_string(data)

    def downloads(self) -> int:
        return self.requests.downloads(self.name)


@pytest.fixture
def bucket(emulator: Emulator, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    """A fresh bucket holding TREE and NEIGHBOURS, with the emulator wired in via env."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", emulator.host)
    client = gcs.Client(project="test", credentials=AnonymousCredentials())
    handle = client.create_bucket(f"lx-{uuid.uuid4().hex[:12]}")
    b = Bucket(handle.name, handle, emulator.requests)
    for name, data in {**TREE, **NEIGHBOURS}.items():
        b.put(name, data)
    return b


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _stamps(root: Path) -> dict[str, tuple[int, int]]:
    return {
        p.relative_to(root).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


# -- URIs and local paths ---------------------------------------------------------------------


def test_is_gcs() -> None:
    assert is_gcs("gs://bucket/x")
    assert not is_gcs("/tmp/gs://x")
    assert not is_gcs("s3://bucket/x")


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("gs://my-bucket", ("my-bucket", "")),
        ("gs://my-bucket/", ("my-bucket", "")),
        ("gs://my.bucket_1/a/b.png", ("my.bucket_1", "a/b.png")),
        ("gs://my-bucket/a/b/", ("my-bucket", "a/b/")),
    ],
)
def test_parse_gcs(uri: str, expected: tuple[str, str]) -> None:
    assert parse_gcs(uri) == expected


@pytest.mark.parametrize("uri", ["gs://", "gs:///x", "gs://UPPER/x", "gs://ab/x", "s3://b/x"])
def test_parse_gcs_rejects_malformed(uri: str) -> None:
    with pytest.raises(ValueError, match="gs://"):
        parse_gcs(uri)


def test_fetch_refuses_a_local_path(tmp_path: Path) -> None:
    (tmp_path / "x.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="not a gs:// URI"):
        fetch(str(tmp_path / "x.npz"), tmp_path / "cache")


# -- fetch --------------------------------------------------------------------------------------


def test_fetch_single_object(bucket: Bucket, tmp_path: Path) -> None:
    path = fetch(bucket.uri("data/labels.csv"), tmp_path, progress=False)

    assert path == tmp_path.resolve() / bucket.name / "data" / "labels.csv"
    assert path.read_bytes() == TREE["data/labels.csv"]
    assert bucket.downloads() == 1


@pytest.mark.parametrize("suffix", ["data/", "data"])
def test_fetch_prefix_preserves_layout(
    bucket: Bucket, tmp_path: Path, suffix: str, capsys: pytest.CaptureFixture[str]
) -> None:
    root = fetch(bucket.uri(suffix), tmp_path, workers=4)

    assert root == tmp_path.resolve() / bucket.name / "data"
    expected = {name.removeprefix("data/"): data for name, data in TREE.items()}
    assert _files(root) == expected  # and nothing from data2/ or other/
    assert _files(tmp_path / bucket.name) == {f"data/{k}": v for k, v in expected.items()}
    assert bucket.downloads() == len(TREE)
    assert "4/4 files" in capsys.readouterr().err


def test_fetch_whole_bucket(bucket: Bucket, tmp_path: Path) -> None:
    root = fetch(bucket.uri(), tmp_path, progress=False)
    assert _files(root) == {**TREE, **NEIGHBOURS}


def test_second_fetch_downloads_nothing(bucket: Bucket, tmp_path: Path) -> None:
    root = fetch(bucket.uri("data/"), tmp_path, progress=False)
    single = fetch(bucket.uri("data/labels.csv"), tmp_path, progress=False)
    before = _stamps(root)
    assert bucket.downloads() == len(TREE)

    assert fetch(bucket.uri("data/"), tmp_path, progress=False) == root
    assert fetch(bucket.uri("data/labels.csv"), tmp_path, progress=False) == single

    assert bucket.downloads() == len(TREE)
    assert _stamps(root) == before


def test_new_generation_is_downloaded_again(bucket: Bucket, tmp_path: Path) -> None:
    root = fetch(bucket.uri("data/"), tmp_path, progress=False)
    before = _stamps(root)
    # Same size as before, so only the generation can tell the cache it is stale.
    new = TREE["data/labels.csv"].replace(b",0\n", b",1\n")
    assert len(new) == len(TREE["data/labels.csv"])
    bucket.put("data/labels.csv", new)

    fetch(bucket.uri("data/"), tmp_path, progress=False)

    assert bucket.downloads() == len(TREE) + 1
    assert (root / "labels.csv").read_bytes() == new
    after = _stamps(root)
    assert after["labels.csv"] != before["labels.csv"]
    assert {k: v for k, v in after.items() if k != "labels.csv"} == {
        k: v for k, v in before.items() if k != "labels.csv"
    }


def test_objects_gone_from_the_bucket_leave_the_cache(bucket: Bucket, tmp_path: Path) -> None:
    """A moved (relabelled) image must not come back under its old class on the next fetch."""
    root = fetch(bucket.uri("data/"), tmp_path, progress=False)
    single = fetch(bucket.uri("data2/x.bin"), tmp_path, progress=False)
    bucket.put("data/train/pneumonia/a.png", TREE["data/train/normal/a.png"])
    bucket.handle.blob("data/train/normal/a.png").delete()

    assert fetch(bucket.uri("data/"), tmp_path, progress=False) == root

    expected = {k.removeprefix("data/"): v for k, v in TREE.items()
                if k != "data/train/normal/a.png"}
    expected["train/pneumonia/a.png"] = TREE["data/train/normal/a.png"]
    assert _files(root) == expected
    assert not (root / "train" / "normal").exists()  # no empty class folder either
    assert single.read_bytes() == NEIGHBOURS["data2/x.bin"]  # other prefixes are left alone
    records = [p for p in tmp_path.rglob("*.json") if p.parent.parent.name == bucket.name]
    assert len(records) == len(TREE) + 1  # the gone object's generation record went with it


def test_tampered_cache_file_is_replaced(bucket: Bucket, tmp_path: Path) -> None:
    uri = bucket.uri("data/labels.csv")
    fetch(uri, tmp_path, progress=False).write_bytes(b"truncated")  # size no longer matches

    path = fetch(uri, tmp_path, progress=False)

    assert path.read_bytes() == TREE["data/labels.csv"]
    assert bucket.downloads() == 2


def test_failed_download_keeps_previous_copy(bucket: Bucket, tmp_path: Path) -> None:
    root = fetch(bucket.uri("data/"), tmp_path, progress=False)
    bucket.put("data/labels.csv", b"a newer version")
    # The emulator lets clients overwrite stored hashes, so the download fails verification.
    blob = bucket.handle.get_blob("data/labels.csv")
    blob.md5_hash = base64.b64encode(b"\0" * 16).decode()
    blob.crc32c = base64.b64encode(b"\0" * 4).decode()
    blob.patch()

    with pytest.raises(StorageError, match="checksum mismatch downloading .*data/labels.csv"):
        fetch(bucket.uri("data/"), tmp_path, progress=False)

    assert (root / "labels.csv").read_bytes() == TREE["data/labels.csv"]  # not half-replaced
    assert list((tmp_path / ".tmp").iterdir()) == []  # no partial file left behind


def test_missing_bucket(bucket: Bucket, tmp_path: Path) -> None:
    for uri in (f"gs://{bucket.name}-missing/data/", f"gs://{bucket.name}-missing/x.csv"):
        with pytest.raises(StorageError, match="not found") as excinfo:
            fetch(uri, tmp_path, progress=False)
        assert uri in str(excinfo.value)


def test_empty_prefix(bucket: Bucket, tmp_path: Path) -> None:
    for uri in (bucket.uri("nothing/"), bucket.uri("nothing")):
        with pytest.raises(StorageError) as excinfo:
            fetch(uri, tmp_path, progress=False)
        assert str(excinfo.value) == f"no objects under {bucket.uri('nothing/')}"


def test_object_name_with_absolute_component_is_rejected(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("evil//abs.txt", b"x")  # relative to "evil/", this is "/abs.txt"
    bucket.put("evil/ok.txt", b"ok")

    with pytest.raises(StorageError, match="refusing to cache object 'evil//abs.txt'"):
        fetch(bucket.uri("evil/"), tmp_path, progress=False)
    assert bucket.downloads() == 0  # checked before anything is downloaded


@pytest.mark.parametrize("path", ["../../escape.txt", "data/../../escape.txt", "../"])
def test_traversal_in_uri_is_rejected(bucket: Bucket, tmp_path: Path, path: str) -> None:
    with pytest.raises(StorageError, match="refusing to cache object"):
        fetch(bucket.uri(path), tmp_path / "cache", progress=False)
    assert not (tmp_path / "escape.txt").exists()
    assert bucket.downloads() == 0


# -- upload / exists ----------------------------------------------------------------------------


def test_upload_round_trip(bucket: Bucket, tmp_path: Path) -> None:
    src = tmp_path / "src"
    for name, data in {"a.png": _png(7), "sub/b.png": _png(8), "sub/deep/c.bin": b"c"}.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    upload(src, bucket.uri("uploaded/run1"), workers=2)

    assert exists(bucket.uri("uploaded/run1/sub/deep/c.bin"))
    assert exists(bucket.uri("uploaded/run1"))  # a prefix
    assert exists(bucket.uri("uploaded/run1/a.png"))
    assert exists(bucket.uri())
    assert not exists(bucket.uri("uploaded/run2"))
    assert not exists(f"gs://{bucket.name}-missing/x")
    root = fetch(bucket.uri("uploaded/run1/"), tmp_path / "cache", progress=False)
    assert _files(root) == _files(src)


def test_upload_to_missing_bucket(bucket: Bucket, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "f.txt").write_text("x")
    uri = f"gs://{bucket.name}-missing/run"
    with pytest.raises(StorageError, match="not found") as excinfo:
        upload(tmp_path / "src", uri)
    assert f"{uri}/f.txt" in str(excinfo.value)
    assert "\n" not in str(excinfo.value)


def test_upload_without_overwrite_refuses_an_existing_object(bucket: Bucket,
                                                            tmp_path: Path) -> None:
    """What promotion relies on: a second writer of the same names fails, naming the object
    (tests/gcs_preconditions.py makes the emulator enforce generation preconditions)."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "sub" / "f.txt").write_text("first")
    with enforced():
        upload(src, bucket.uri("entry"), no_overwrite=True)
        (src / "sub" / "f.txt").write_text("second")
        with pytest.raises(StorageError, match=r"entry/sub/f.txt: already exists; not "
                                               r"overwritten") as excinfo:
            upload(src, bucket.uri("entry"), no_overwrite=True)
    assert str(excinfo.value) == f"{bucket.uri('entry/sub/f.txt')}: already exists; not overwritten"
    assert bucket.handle.blob("entry/sub/f.txt").download_as_bytes() == b"first"
    with pytest.raises(FileNotFoundError, match="no such directory"):
        upload(src / "sub" / "f.txt", bucket.uri("entry"))


# -- credentials --------------------------------------------------------------------------------


@pytest.mark.parametrize("key_file", [True, False], ids=["bad-key-file", "no-credentials"])
def test_missing_credentials_message(tmp_path: Path, key_file: bool) -> None:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("GOOGLE_", "GCLOUD", "CLOUDSDK_", "STORAGE_EMULATOR", "GCE_"))
    }
    (tmp_path / "home").mkdir()
    env.update(
        HOME=str(tmp_path / "home"),
        CLOUDSDK_CONFIG=str(tmp_path / "gcloud"),
        # Never wait on a GCE metadata server that is not there (google-auth wants lowercase
        # "true"; the rest bound the probe should that check ever be bypassed).
        NO_GCE_CHECK="true",
        GCE_METADATA_HOST="127.0.0.1:1",
        GCE_METADATA_IP="127.0.0.1:1",
        GCE_METADATA_DETECT_RETRIES="1",
        GCE_METADATA_TIMEOUT="1",
    )
    if key_file:
        env["GOOGLE_APPLICATION_CREDENTIALS"] = str(tmp_path / "nowhere.json")
    uri = "gs://lungxray-no-such-bucket/data/"
    code = f"from lungxray.storage import fetch; fetch({uri!r}, progress=False)"

    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode != 0
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("lungxray.storage.StorageError: ")
    for needle in (uri, "GOOGLE_APPLICATION_CREDENTIALS", "Workload Identity", "gcloud auth"):
        assert needle in last_line
