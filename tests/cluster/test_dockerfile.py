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


def arg_defaults(path: Path) -> dict[str, str]:
    """Default values of the ARG instructions (NAME=value)."""
    found = {}
    for word, args in instructions(path):
        name, sep, value = args.partition("=")
        if word == "ARG" and sep:
            found[name] = value.strip('"')
    return found


def base_images(path: Path) -> list[str]:
    """FROM images with ARG defaults substituted."""
    defaults = arg_defaults(path)
    froms = [args.split()[0] for word, args in instructions(path) if word == "FROM"]
    return [re.sub(r"\$\{?(\w+)\}?", lambda m: defaults[m.group(1)], f) for f in froms]


@pytest.mark.parametrize("flavour", sorted(DOCKERFILES))
def test_base_images_are_pinned(flavour: str) -> None:
    froms = base_images(DOCKERFILES[flavour])
    assert len(froms) >= 2, "multi-stage: builder + runtime"
    for image in froms:
        assert re.fullmatch(r"[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?", image), image
        assert not image.split("@")[0].endswith(":latest")


def test_runtime_bases() -> None:
    gpu_from = base_images(DOCKERFILES["gpu"])[-1]
    cpu_from = base_images(DOCKERFILES["cpu"])[-1]
    assert final_stage(DOCKERFILES["gpu"])[0][1] == "${TF_GPU_IMAGE}"  # a digest via make
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


# ---- issue 23: the base image's Python, the CPU image's architecture --------------------------

check_python = _load("check_python")


def test_gpu_base_python_is_checked_first_against_requires_python() -> None:
    """The GPU base's Python is not visible from here (no registry): the build checks it
    against requires-python before installing anything."""
    runs = [args for word, args in final_stage(DOCKERFILES["gpu"]) if word == "RUN"]
    assert "check_python.py /tmp/pyproject.toml" in runs[0]


@pytest.mark.parametrize(("version", "ok"), [
    ("3.11.9", True), ("3.12.3", True), ("3.10.14", False), ("3.13.0", False), ("3.11", True),
])
def test_check_python_against_the_real_requires_python(version: str, ok: bool) -> None:
    spec = check_python.requires_python((REPO / "pyproject.toml").read_text())
    assert check_python.satisfies(version, spec) is ok
    result = subprocess.run([sys.executable, str(REPO / "docker" / "check_python.py"),
                             str(REPO / "pyproject.toml"), version], capture_output=True,
                            text=True, timeout=30)
    assert (result.returncode == 0) is ok, result.stderr


def test_check_python_clauses() -> None:
    assert check_python.satisfies("3.11.2", "~=3.11.0")
    assert not check_python.satisfies("3.12.0", "~=3.11.0")
    assert check_python.satisfies("3.12.1", "==3.12")
    assert not check_python.satisfies("3.12.1", "!=3.12")
    with pytest.raises(ValueError, match="unsupported"):
        check_python.satisfies("3.11", ">=3.11.*")


def test_builder_python_meets_requires_python() -> None:
    spec = check_python.requires_python((REPO / "pyproject.toml").read_text())
    for flavour in DOCKERFILES:
        builder = base_images(DOCKERFILES[flavour])[0]
        version = re.match(r"python:(\d+\.\d+)", builder).group(1)
        assert check_python.satisfies(version, spec), (flavour, builder)


def test_cpu_image_refuses_other_architectures_early() -> None:
    stage = final_stage(DOCKERFILES["cpu"])
    words = [word for word, _ in stage]
    arch_check = next(i for i, (w, a) in enumerate(stage) if w == "RUN" and "TARGETARCH" in a)
    assert arch_check < words.index("COPY")  # before the pip install it explains
    assert "--platform linux/amd64" in stage[arch_check][1]
