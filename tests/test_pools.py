"""Pass 1 of preprocess: each file is read within its limits and decoded into its pool; what one
file cannot do (a FIFO put there late, a decoder's crash, too many bytes) is reported as that
file's problem, never raised (issue 26)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from lungxray import images, pools, sources
from lungxray.errors import DataError
from tests.data_helpers import folder_source, prepare_16px
from tests.fuzz import hostile


@pytest.mark.timeout(30)
def test_a_fifo_or_device_put_there_after_the_scan_is_refused_on_open(tmp_path):
    os.mkfifo(tmp_path / "late.png")
    assert pools._read_one(sources.Item(tmp_path / "late.png", "late.png", 0),
                           pools.Settings(16, 1, False, 8, 1))[3] == "not a regular file (FIFO)"
    assert pools._read_one(sources.Item(Path("/dev/zero"), "zero.png", 0),
                           pools.Settings(16, 1, False, 8, 1))[3] == (
        "not a regular file (character device)")


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
        prepare_16px(root, tmp_path / "out")
    skipped = prepare_16px(root, tmp_path / "out", skip_bad=True)["skipped"]
    assert skipped[0]["file"] == "a/boom.png"



def test_a_good_file_is_decoded_and_hashed_and_a_large_one_is_unusable(tmp_path):
    png = tmp_path / "good.png"
    png.write_bytes(hostile.small_png(3))
    settings = pools.Settings(16, 1, False, 8, 1)
    pixels, pixel_hash, file_hash, problem = pools._read_one(
        sources.Item(png, "good.png", 0), settings)
    assert problem == "" and pixels.shape == (16, 16, 1)
    assert pixel_hash == hashlib.sha1(pixels.tobytes()).hexdigest()
    assert file_hash == hashlib.sha256(png.read_bytes()).hexdigest()
    size = png.stat().st_size
    with pytest.raises(pools.Unusable, match=rf"{size:,} bytes, above the limit of 10 "
                                             r"\(max_file_bytes\)"):
        pools.read_file(png, 10)
    assert pools.read_file(png, size) == png.read_bytes()
    missing = pools._read_one(sources.Item(tmp_path / "gone.png", "gone.png", 0), settings)
    assert missing[2:] == ("missing", "no such file")
