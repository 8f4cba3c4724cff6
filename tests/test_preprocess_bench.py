"""bench.preprocess_bench at a tiny size: the folder it generates and the numbers it returns."""

from __future__ import annotations

import pytest

from bench.preprocess_bench import bench_preprocess
from lungxray import data


def test_bench_preprocess_generates_real_size_pngs_and_times_them(tmp_path):
    result = bench_preprocess(40, 64, tmp_path, image_size=32, workers=1)
    assert result["images"] == 40 and result["seconds"] > 0
    assert result["images_per_s"] == pytest.approx(40 / result["seconds"], rel=0.05)
    manifest = data.read_manifest(tmp_path / "prepared")
    assert sum(s["n"] for s in manifest["splits"].values()) == 40
    assert manifest["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert result["settings"]["image_size"] == 32
