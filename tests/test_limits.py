"""Issue 26, the readers' one budget: each hostile input of its table ends within seconds in a
one-line error (or, with skip_bad, a skipped file), under a memory cap, with no staging folder
left; the limits are read from the environment and the CLI.

Inputs are built here, small on disk (tests/fuzz/hostile.py). Boundedness is enforced by
resource limits, not timing asserts: the corpus runs in a subprocess whose address space is
capped at 2 GiB, and slow paths hit pytest-timeout. Each reader's own hostile inputs are tested
in its file (test_manifest_csv.py, test_sources.py, test_pools.py, test_pixels.py,
test_images.py, test_dicom.py); preprocess's signals in test_prepare.py.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lungxray import limits as limiting
from lungxray.errors import ConfigError, DataError
from lungxray.prepare import preprocess
from tests.data_helpers import assert_clean, folder_source
from tests.fuzz import hostile

ROOT = Path(__file__).resolve().parents[1]
GiB = 1 << 30


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


# ---------------------------------------------------------------------------------------- npz


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


# ------------------------------------------------------------------------- image size, CLI


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
