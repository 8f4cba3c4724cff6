"""Fixtures for the cluster-side tests: a fake KFP server, a tiny compiled pipeline, clean env.

No `from __future__ import annotations` here: the KFP component below needs real annotations.
"""

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.fake_kfp import FakeKfp

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent

# kfp.Client reads these; a developer's shell must not change what the tests send.
KFP_ENV_VARS = (
    "KF_PIPELINES_ENDPOINT",
    "KF_PIPELINES_UI_ENDPOINT",
    "KF_PIPELINES_DEFAULT_EXPERIMENT_NAME",
    "KF_PIPELINES_OVERRIDE_EXPERIMENT_NAME",
    "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
    "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET",
)
# Read by pipelines.submit / pipelines.vertex when called: unset for every test, which may then
# set them (monkeypatch.setenv) for the CLI it runs.
CALL_TIME_VARS = (
    "KFP_TOKEN",
    "REGISTRY_USER",
    "REGISTRY_PASSWORD",
    "GOOGLE_APPLICATION_CREDENTIALS",
    "STORAGE_EMULATOR_HOST",
)


@pytest.fixture(autouse=True)
def isolated_kfp_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """HOME in a temp dir, and kfp.Client's context file there too.

    kfp computes `~/.config/kfp/context.json` once at import, so changing HOME alone is not
    enough in-process: the class attribute is patched as well. A real context file could add
    a namespace or auth cookies to every request.
    """
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for var in KFP_ENV_VARS + CALL_TIME_VARS:
        monkeypatch.delenv(var, raising=False)
    from kfp.client import client as kfp_client

    monkeypatch.setattr(
        kfp_client.Client, "_LOCAL_KFP_CONTEXT", str(home / ".config" / "kfp" / "context.json")
    )
    return home


@pytest.fixture
def fake_kfp() -> Iterator[FakeKfp]:
    """A running fake KFP v2beta1 API server."""
    with FakeKfp() as server:
        yield server


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A compiled two-parameter pipeline (message: str, epochs: int = 3) with one PVC mount."""
    from kfp import compiler, dsl, kubernetes

    @dsl.component(base_image="registry.example/lungxray:abc123", install_kfp_package=False)
    def shout(message: str, epochs: int) -> str:
        return message.upper() * epochs

    @dsl.pipeline(name="tiny-lungxray")
    def tiny(message: str, epochs: int = 3):
        task = shout(message=message, epochs=epochs)
        kubernetes.mount_pvc(task, pvc_name="lungxray-cache", mount_path="/cache")

    path = tmp_path_factory.mktemp("pkg") / "pipeline.yaml"
    compiler.Compiler().compile(tiny, str(path))
    return path


@pytest.fixture
def package_for(tmp_path: Path):
    """Compile a one-step pipeline (message: str = "hi") whose step runs ``image``."""
    from kfp import compiler, dsl

    def build(image: str) -> Path:
        @dsl.component(base_image=image, install_kfp_package=False)
        def hello(message: str) -> str:
            return message

        @dsl.pipeline(name="tiny-registry")
        def tiny(message: str = "hi"):
            hello(message=message)

        path = tmp_path / f"pkg-{abs(hash(image))}.yaml"
        compiler.Compiler().compile(tiny, str(path))
        return path

    return build


@pytest.fixture
def closed_port_url() -> str:
    """URL of a local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def run_module(isolated_kfp_home: Path):
    """Run `python -m <module> args...` from the repo root with a clean HOME; return the result."""

    def run(module: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in KFP_ENV_VARS}
        env.update(HOME=str(isolated_kfp_home), PYTHONPATH=str(REPO), PYTHONWARNINGS="")
        return subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    return run
