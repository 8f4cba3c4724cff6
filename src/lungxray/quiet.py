"""Keep TensorFlow's native start-up logging off stderr, where the one-line errors go.

On some CPUs (AVX-512 ones among them) TensorFlow's C++ side prints oneDNN, ``cpu_feature_guard``
and absl lines while it loads, before absl's logging is initialised, so ``TF_CPP_MIN_LOG_LEVEL``
alone does not hold them back. The only reliable switch is the file descriptor: while the
``tensorflow`` package executes, descriptor 2 points at ``/dev/null``. Nothing is imported here;
the first import of TensorFlow, wherever it happens, is the one that is quieted.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

QUIETED = ("tensorflow",)  # Keras, keras-tuner and tf.keras all load TensorFlow through this


@contextmanager
def stderr_silenced() -> Iterator[None]:
    """Point file descriptor 2 at /dev/null for the block (C++ and Python writes alike)."""
    sys.stderr.flush()
    saved = os.dup(2)
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 2)
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietLoader(importlib.abc.Loader):
    """Runs another loader's ``exec_module`` with stderr silenced."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with stderr_silenced():
            self._loader.exec_module(module)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds the QUIETED packages as usual and wraps their loader; steps aside afterwards."""

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 (importlib's API)
        if fullname not in QUIETED:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def quiet_native_logs() -> None:
    """Silence TensorFlow's native logging from here on (idempotent; a no-op once it is loaded).

    Errors still surface: an import that fails raises as usual once stderr is back.
    """
    # Later C++ lines too: oneDNN's "DT_BOOL only on AVX-512" is logged at ERROR level on
    # every training run on such CPUs. Real failures still raise Python exceptions.
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietFinder())
