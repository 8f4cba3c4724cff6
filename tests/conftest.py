"""Shared fixtures: the real PneumoniaMNIST file from ../shared and small prepared subsets."""

from __future__ import annotations

import fcntl
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
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


def built_once(tmp_path_factory: pytest.TempPathFactory, name: str,
               build: Callable[[Path], object]) -> Path:
    """``<this run's temp dir>/built/<name>``, made by ``build`` once per test run: the first
    xdist worker to ask builds it under a lock, the other waits for it and reads the same files
    (each would otherwise prepare and train its own copy of a session fixture). A build that
    failed is started again from nothing."""
    base = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        base = base.parent  # the run's directory, above every worker's own
    output = base / "built" / name
    output.parent.mkdir(parents=True, exist_ok=True)
    done = output.with_name(output.name + ".done")
    with open(output.with_name(output.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(output, ignore_errors=True)
            build(output)
            done.touch()
    return output


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory, shared_npz) -> Path:
    """A prepared, stratified 32 px subset of the real data (at most 160 images per split)."""
    from lungxray import prepare

    return built_once(tmp_path_factory, "data/small", lambda output: prepare.preprocess(
        str(shared_npz), output, image_size=32, max_per_split=160, seed=0))


@pytest.fixture(scope="session")
def two_sites(tmp_path_factory, shared_npz, shared_nih) -> Path:
    """A 16 px real subset of both sites (at most 200 images per split and site) with a carved
    test_shifted split."""
    from lungxray import prepare

    return built_once(tmp_path_factory, "two_sites/data", lambda output: prepare.preprocess(
        str(shared_npz), output, image_size=16, seed=0, max_per_split=200,
        shifted_test_fraction=0.1, sites=[("nih", str(shared_nih))]))


@pytest.fixture(scope="session")
def trained_model(tmp_path_factory, small_dataset) -> Path:
    """VGG16 trained from scratch for two epochs on the small real subset."""
    from lungxray import train

    return built_once(tmp_path_factory, "model/VGG16", lambda output: train.train(
        small_dataset, "VGG16", output, epochs=2, weights="none", seed=0))


@pytest.fixture(scope="session")
def carved(tmp_path_factory, shared_npz) -> Path:
    """A 32 px real subset with a carved test_shifted split."""
    from lungxray import prepare

    return built_once(tmp_path_factory, "carved/data", lambda output: prepare.preprocess(
        str(shared_npz), output, image_size=32, max_per_split=80, seed=0,
        shifted_test_fraction=0.1))


@pytest.fixture(scope="session")
def pick(tmp_path_factory, carved) -> Path:
    """SmallCNN trained one epoch on train alone, thresholded by the platt rule."""
    from lungxray import train

    return built_once(tmp_path_factory, "pick/SmallCNN", lambda output: train.train(
        carved, "SmallCNN", output, epochs=1, seed=3, threshold_rule="platt"))


# `make test` deals whole modules to its two xdist workers in collection order (--dist loadfile
# --no-loadscope-reorder). By default xdist deals the modules with the most tests first, which
# left the whole-pipeline run (one test, about a quarter of a worker's time) to start last, with
# the other worker idle for minutes at the end; so it starts first, and the rest keep xdist's
# order.
FIRST = "pipelines/test_local_run.py"


def pytest_collection_modifyitems(config, items):
    """Mark the slow tier (see SLOW_MODULES) and deal the whole-pipeline run first."""
    tests_in = Counter(item.path for item in items)
    for item in items:
        if item.path.name in SLOW_MODULES or item.path.parent.name in SLOW_FOLDERS:
            item.add_marker(pytest.mark.slow)
    # Stable: every module keeps its own order and stays in one piece.
    items.sort(key=lambda item: (not item.path.as_posix().endswith(f"tests/{FIRST}"),
                                 -tests_in[item.path]))


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
