"""quiet: TensorFlow's native start-up lines stay off stderr; real errors still reach it."""

from __future__ import annotations

import os
import subprocess
import sys

from lungxray import quiet

SCRIPT = """
import sys
from lungxray import quiet
quiet.quiet_native_logs()
quiet.quiet_native_logs()  # idempotent
{body}
"""


def _run(body: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, "-c", SCRIPT.format(body=body)], capture_output=True,
                          text=True, timeout=120, env={**environ, **env})


def test_tensorflow_import_leaves_stderr_to_the_program():
    result = _run("import keras, tensorflow as tf\n"
                  "print(float(tf.reduce_sum(tf.ones((3, 3)))))\n"
                  "print('mine', file=sys.stderr)")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "9.0"
    assert result.stderr == "mine\n"  # oneDNN / cpu_feature_guard lines on AVX-512 CPUs otherwise


def test_import_errors_still_surface(tmp_path):
    (tmp_path / "tensorflow").mkdir()
    (tmp_path / "tensorflow" / "__init__.py").write_text("raise ImportError('broken build')\n")
    result = _run("import tensorflow", PYTHONPATH=f"{tmp_path}{os.pathsep}"
                  f"{os.environ.get('PYTHONPATH', '')}")
    assert result.returncode == 1
    assert "ImportError: broken build" in result.stderr


def test_stderr_silenced_restores_the_descriptor(capfd):
    with quiet.stderr_silenced():
        os.write(2, b"hidden\n")
    os.write(2, b"shown\n")
    assert capfd.readouterr().err == "shown\n"


def test_every_subcommand_takes_verbose():
    from lungxray import cli

    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, command in sub.choices.items():
        flags = {o for action in command._actions for o in action.option_strings}
        assert "--verbose" in flags, name
    assert parser.parse_args(["models", "--verbose"]).verbose
    assert not parser.parse_args(["models"]).verbose
