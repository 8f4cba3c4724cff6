"""Imports only go downward (docs/architecture.md): lint-imports keeps every contract of
pyproject.toml, the contracts do catch an upward import, and the Keras-free entry points load
without Keras."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("keras", "tensorflow", "keras_tuner", "jax")


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root/src`` with ``root/pyproject.toml``."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.exists() else [shutil.which("lint-imports") or "lint-imports"]
    env = {**os.environ, "PYTHONPATH": str(root / "src")}
    return subprocess.run([*command, "--no-cache", "--no-logo"], cwd=root, env=env,
                          capture_output=True, text=True, timeout=120)


def _contract_layers() -> list[set[str]]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    contract = next(c for c in config["contracts"] if c["id"] == "layers")
    return [{name.strip() for name in re.split(r"[:|]", layer)} for layer in contract["layers"]]


def test_the_package_keeps_every_import_contract():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout


def test_an_upward_import_keras_in_the_data_layer_and_an_unplaced_module_are_caught(tmp_path):
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    package = tmp_path / "src" / "lungxray"
    shutil.copytree(ROOT / "src" / "lungxray", package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    # Lazy imports count: a function-level import that climbs is still an upward import.
    with (package / "errors.py").open("a") as out:
        out.write(textwrap.dedent("""

            def _upward():
                from lungxray import cli  # noqa: F401
            """))
    with (package / "sources.py").open("a") as out:
        out.write("\n\ndef _heavy():\n    import keras  # noqa: F401\n")
    (package / "unplaced.py").write_text('"""A module no layer names."""\n')
    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Contracts: 0 kept, 3 broken." in result.stdout, result.stdout
    assert "lungxray.errors -> lungxray.cli" in result.stdout
    assert "lungxray.sources -> keras" in result.stdout
    assert "lungxray.unplaced" in result.stdout


def test_the_architecture_doc_lists_the_contract_layers():
    """docs/architecture.md's table is the layers contract, top to bottom, module for module."""
    doc = (ROOT / "docs" / "architecture.md").read_text()
    rows = [line.split("|")[2] for line in doc.splitlines()
            if line.startswith("| ") and "`" in line.split("|")[2]]
    assert [set(re.findall(r"`([a-z_]+)`", row)) for row in rows] == _contract_layers()
    placed = set().union(*_contract_layers())
    modules = {p.stem for p in (ROOT / "src" / "lungxray").glob("*.py")} - {"__init__"}
    assert placed == modules


def test_names_parameters_and_the_cli_parser_load_without_keras():
    """schema, backbones and integrity, and the CLI until a command runs, never import Keras:
    model names come from the Keras-free backbones.REGISTRY."""
    code = textwrap.dedent(f"""
        import argparse, contextlib, io, sys
        from lungxray import backbones, cli, integrity, schema  # noqa: F401
        assert backbones.get_spec("SmallCNN").scratch_only
        parser = cli.build_parser()
        commands = next(a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)).choices
        assert len(commands) > 5, commands
        for command in commands:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
                parser.parse_args([command, "--help"])
        print(sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY!r}))
        """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])}
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
