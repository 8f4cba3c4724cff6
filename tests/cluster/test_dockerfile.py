"""The Dockerfiles lint clean and keep their promises; their helper scripts work.

No Docker engine is needed: hadolint and a small Dockerfile parser stand in for a build.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = {"gpu": REPO / "docker" / "Dockerfile", "cpu": REPO / "docker" / "Dockerfile.cpu"}
HADOLINT = Path(sys.executable).with_name("hadolint")


def _load(name: str) -> ModuleType:
    """Import a docker/ helper script by path (docker/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"docker_{name}", REPO / "docker" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


prebake_weights = _load("prebake_weights")
requirements = _load("requirements")


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", path.read_text())
    result = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            result.append((word.upper(), rest.strip()))
    return result


def final_stage(path: Path) -> list[tuple[str, str]]:
    steps = instructions(path)
    last_from = max(i for i, (word, _) in enumerate(steps) if word == "FROM")
    return steps[last_from:]


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "warning", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_hadolint_clean_at_warning(flavour: str) -> None:
    result = hadolint(DOCKERFILES[flavour])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_does_fail_on_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above: this hadolint invocation really fails on warnings."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # :latest
    assert "DL3008" in result.stdout  # unpinned apt package


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_images_are_pinned(flavour: str) -> None:
    froms = [args.split()[0] for word, args in instructions(DOCKERFILES[flavour]) if word == "FROM"]
    assert len(froms) >= 2, "multi-stage: builder + runtime"
    for image in froms:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
        assert not image.split("@")[0].endswith(":latest")


def test_runtime_bases() -> None:
    gpu_from = final_stage(DOCKERFILES["gpu"])[0][1]
    cpu_from = final_stage(DOCKERFILES["cpu"])[0][1]
    assert gpu_from.startswith("tensorflow/tensorflow:2.21.0-gpu")
    assert cpu_from.startswith("python:3.11-slim")


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_runs_as_fixed_non_root_user(flavour: str) -> None:
    users = [args for word, args in final_stage(DOCKERFILES[flavour]) if word == "USER"]
    assert users, "no USER instruction"
    uid = users[-1].split(":")[0]
    assert uid == "1000", users[-1]  # numeric, so runAsNonRoot can check it; matches the PVC chown
    env = " ".join(args for word, args in final_stage(DOCKERFILES[flavour]) if word == "ENV")
    assert "HOME=/home/lungxray" in env
    assert "KERAS_HOME=/home/lungxray/.keras" in env


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_prebake_weights_build_arg(flavour: str) -> None:
    steps = final_stage(DOCKERFILES[flavour])
    arg_at = steps.index(("ARG", 'PREBAKE_WEIGHTS=""'))
    runs = [(i, args) for i, (word, args) in enumerate(steps) if word == "RUN"]
    prebake = [(i, args) for i, args in runs if "prebake_weights.py" in args]
    assert len(prebake) == 1
    at, command = prebake[0]
    assert at > arg_at and '"${PREBAKE_WEIGHTS}"' in command
    # Run as the app user so the weights land in (and are found from) its writable KERAS_HOME.
    users_before = [args for word, args in steps[:at] if word == "USER"]
    assert users_before[-1].split(":")[0] == "1000"


def test_wheel_built_in_builder_and_extras() -> None:
    gpu = instructions(DOCKERFILES["gpu"])
    cpu = instructions(DOCKERFILES["cpu"])
    for steps in (gpu, cpu):
        assert any(w == "RUN" and "pip wheel" in a and "--no-deps" in a for w, a in steps)
        assert any(w == "RUN" and "--no-deps /tmp/wheels/*.whl" in a for w, a in steps)
    gpu_req = next(a for w, a in gpu if w == "RUN" and "requirements.py" in a)
    cpu_req = next(a for w, a in cpu if w == "RUN" and "requirements.py" in a)
    # GPU: no extra (tensorflow comes from the base image); CPU: the `cpu` extra.
    assert re.search(r"requirements\.py pyproject\.toml >", gpu_req)
    assert re.search(r"requirements\.py pyproject\.toml cpu >", cpu_req)


def test_requirements_split_by_extra() -> None:
    pyproject = REPO / "pyproject.toml"
    gpu = requirements.requirements(pyproject, [])
    cpu = requirements.requirements(pyproject, ["cpu"])
    assert not [r for r in gpu if r.lower().startswith("tensorflow")]
    assert "tensorflow-cpu==2.21.0" in cpu
    assert set(gpu) < set(cpu)
    assert all("==" in r for r in cpu), "image dependencies must be pinned"
    with pytest.raises(SystemExit, match="unknown extra"):
        requirements.requirements(pyproject, ["nope"])


def test_prebake_parse_names() -> None:
    assert prebake_weights.parse_names([""]) == []
    assert prebake_weights.parse_names(["VGG16 ResNet152V2,InceptionV3", "VGG16"]) == [
        "VGG16",
        "ResNet152V2",
        "InceptionV3",
    ]


def test_prebake_instantiates_notop_imagenet_models() -> None:
    calls: list[tuple[str, dict]] = []
    cleared: list[int] = []

    def fake_app(name: str):
        return lambda **kwargs: calls.append((name, kwargs))

    apps = SimpleNamespace(VGG16=fake_app("VGG16"), InceptionV3=fake_app("InceptionV3"))
    prebake_weights.prebake(apps, ["VGG16", "InceptionV3"], lambda: cleared.append(1))
    assert calls == [
        ("VGG16", {"weights": "imagenet", "include_top": False}),
        ("InceptionV3", {"weights": "imagenet", "include_top": False}),
    ]
    assert len(cleared) == 2


def test_prebake_rejects_unknown_names_before_downloading() -> None:
    calls: list[str] = []
    apps = SimpleNamespace(VGG16=lambda **kw: calls.append("VGG16"))
    with pytest.raises(SystemExit, match="unknown Keras application.*VGG61.*known: VGG16"):
        prebake_weights.prebake(apps, ["VGG16", "VGG61"], lambda: None)
    assert calls == []


def test_prebake_with_nothing_to_do_exits_zero() -> None:
    result = subprocess.run(
        [sys.executable, str(REPO / "docker" / "prebake_weights.py"), ""],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0
    assert "nothing to prebake" in result.stdout


def test_dockerignore_keeps_heavy_and_local_files_out() -> None:
    patterns = {
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for needed in (".git", ".venv", "build", "runs", "**/*.npz", "**/*.h5", "**/*.keras"):
        assert needed in patterns, needed
    # What the Dockerfiles COPY must stay in the context.
    for kept in ("src", "pyproject.toml", "README.md", "docker"):
        assert kept not in patterns
