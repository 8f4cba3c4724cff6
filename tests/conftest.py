"""Shared fixtures: the real PneumoniaMNIST file from ../shared and small prepared subsets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # keep TensorFlow's C++ banner out of logs

ROOT = Path(__file__).resolve().parents[1]
# Modules whose tests train, tune, build Keras models, run the pipeline or its components, or
# bootstrap hundreds of metric sets: `make test-fast` (-m "not slow") leaves them to `make test`.
# Chosen from a full run's durations (pytest --junitxml): the rest runs in under 3 minutes.
SLOW_MODULES = frozenset({
    "test_train.py", "test_train_jax.py", "test_tune.py", "test_tune_resume.py",
    "test_smallcnn.py", "test_models.py", "test_features.py", "test_gradcam.py",
    "test_evaluate.py", "test_evaluate_robustness.py", "test_champion.py", "test_predict.py",
    "test_export.py", "test_report.py", "test_selection.py", "test_ensemble.py",
    "test_metrics.py", "test_cli.py", "test_site_metrics.py", "test_refit.py",
    "test_local_run.py", "test_gpu_bench.py", "test_gpu_profile.py",
})
SLOW_FOLDERS = frozenset({"components"})  # every component test runs real steps
SHARED_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"
# A second site: 1000 adult NIH radiographs (256 px PNGs), manifest.csv with patient ids.
SHARED_NIH = ROOT.parent / "shared" / "data" / "nih_cxr_1000" / "manifest.csv"


@pytest.fixture(scope="session")
def shared_npz() -> Path:
    """The real PneumoniaMNIST train/val file (CI lays ../shared beside the repo)."""
    assert SHARED_NPZ.is_file(), f"missing {SHARED_NPZ}: ../shared must sit beside the repo"
    return SHARED_NPZ


@pytest.fixture(scope="session")
def shared_nih() -> Path:
    """The real NIH site's manifest.csv (path,label,patient_id,...), beside the npz."""
    assert SHARED_NIH.is_file(), f"missing {SHARED_NIH}: ../shared must sit beside the repo"
    return SHARED_NIH


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, shared_npz) -> Path:
    """A prepared, stratified 32 px subset of the real data (at most 160 images per split)."""
    from lungxray import prepare

    output = tmp_path_factory.mktemp("data") / "small"
    prepare.preprocess(str(shared_npz), output, image_size=32, max_per_split=160, seed=0)
    return output


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory, shared_npz, shared_nih) -> Path:
    """A 16 px real subset of both sites (at most 200 images per split and site) with a carved
    test_shifted split."""
    from lungxray import prepare

    output = tmp_path_factory.mktemp("two_sites") / "data"
    prepare.preprocess(str(shared_npz), output, image_size=16, seed=0, max_per_split=200,
                       shifted_test_fraction=0.1, sites=[("nih", str(shared_nih))])
    return output


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_dataset) -> Path:
    """VGG16 trained from scratch for two epochs on the small real subset."""
    from lungxray import train

    output = tmp_path_factory.mktemp("model") / "VGG16"
    train.train(small_dataset, "VGG16", output, epochs=2, weights="none", seed=0)
    return output


@pytest.fixture(scope="session")
def carved(tmp_path_factory, shared_npz) -> Path:
    """A 32 px real subset with a carved test_shifted split."""
    from lungxray import prepare

    output = tmp_path_factory.mktemp("carved") / "data"
    prepare.preprocess(str(shared_npz), output, image_size=32, max_per_split=80, seed=0,
                       shifted_test_fraction=0.1)
    return output


@pytest.fixture(scope="session")
def pick(tmp_path_factory, carved) -> Path:
    """SmallCNN trained one epoch on train alone, thresholded by the platt rule."""
    from lungxray import train

    output = tmp_path_factory.mktemp("pick") / "SmallCNN"
    train.train(carved, "SmallCNN", output, epochs=1, seed=3, threshold_rule="platt")
    return output


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (see SLOW_MODULES)."""
    for item in items:
        if item.path.name in SLOW_MODULES or item.path.parent.name in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="module")
def emulator_host() -> Iterator[str]:
    """A real GCS API server (gcp-storage-emulator, in memory) on a free local port."""
    import socket

    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
