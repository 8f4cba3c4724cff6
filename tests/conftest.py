"""Shared fixtures: the real PneumoniaMNIST file from ../shared and small prepared subsets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of logs

ROOT = Path(__file__).resolve().parents[1]
SHARED_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"


@pytest.fixture(scope="session")
def shared_npz() -> Path:
    """The real PneumoniaMNIST train/val file (CI lays ../shared beside the repo)."""
    assert SHARED_NPZ.is_file(), f"missing {SHARED_NPZ}: ../shared must sit beside the repo"
    return SHARED_NPZ


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, shared_npz) -> Path:
    """A prepared, stratified 32 px subset of the real data (at most 160 images per split)."""
    from lungxray import data

    output = tmp_path_factory.mktemp("data") / "small"
    data.preprocess(str(shared_npz), output, image_size=32, max_per_split=160, seed=0)
    return output


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_dataset) -> Path:
    """VGG16 trained from scratch for two epochs on the small real subset."""
    from lungxray import train

    output = tmp_path_factory.mktemp("model") / "VGG16"
    train.train(small_dataset, "VGG16", output, epochs=2, weights="none", seed=0)
    return output
