"""Helpers for the champion and promotion tests: valid decisions, a winning comparison, model
folders that promotion can carry (it never loads the Keras model, so a stand-in file will do),
and a "kill" injected at the k-th file-system change."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from lungxray import champion, champion_store

CLASSES = ["normal", "pneumonia"]
# A paired comparison whose CI lies above 0: decide() says promote at margin 0.
WIN = {"metric": "roc_auc", "n": 120, "champion": 0.8, "challenger": 0.9,
       "difference": 0.9 - 0.8, "ci": [0.04, 0.16], "ci_level": 0.95, "p_not_better": 0.0,
       "n_bootstrap": 200, "seed": 0, "method": "paired stratified bootstrap"}


def _stand_in_archive(path: Path, seed: int) -> None:
    """A .keras archive with the members Keras writes (the loader's checks pass; no network
    is built from it): config, metadata and an uncompressed HDF5 weights file."""
    import io
    import zipfile

    import h5py
    import numpy as np

    weights = io.BytesIO()
    with h5py.File(weights, "w") as h5:
        h5.create_dataset("layers/dense/vars/0", data=np.full(64, seed, np.float32))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("config.json", json.dumps({"class_name": "Functional", "config": {}}))
        archive.writestr("metadata.json", json.dumps({"keras_version": "3", "seed": seed}))
        archive.writestr("model.weights.h5", weights.getvalue())


def fake_model(path: Path, seed: int = 0, classes: list[str] | None = None,
               size: int = 32) -> Path:
    """A model folder as train writes it, with stand-in weights (``seed`` changes the bytes)."""
    path.mkdir(parents=True)
    _stand_in_archive(path / "model.keras", seed)
    (path / "model_info.json").write_text(json.dumps({
        "model_name": "VGG16", "class_names": classes or CLASSES, "threshold": 0.5,
        "image_size": size, "channels": 1, "positive_class": 1}))
    return path


def decision(model_dir: Path, home: Path | str, run_id: str,
             comparison: dict[str, Any] | None = None, margin: float = 0.0,
             cache_dir: Path | None = None) -> dict[str, Any]:
    """The decision challenge would write for ``model_dir`` against the champion at ``home``
    now; ``comparison`` None when there is no champion, else e.g. :data:`WIN`."""
    info = champion_store.model_info(model_dir)
    state = champion.current(home)
    champion_info = None if state["run_id"] is None else champion_store.champion_info(
        home, state, cache_dir)
    return champion.decision_record(run_id, info, champion_info, comparison, margin,
                                    champion_state=state,
                                    challenger_sha256=champion_store.model_sha256(model_dir),
                                    champion_uri=home)


def winning(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with a comparison that says promote (the swap is what a test is about)."""
    return {**record, **champion.decide(WIN, 0.0), "comparison": WIN, "margin": 0.0}


def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for folders)."""
    return {str(p.relative_to(root)): None if p.is_dir() else p.read_bytes()
            for p in sorted(root.rglob("*"))}


class Killed(BaseException):
    """The process died here: no handler, no cleanup may act on the file system after it."""


MUTATORS = ("replace", "rename", "mkdir", "rmdir", "unlink", "remove", "link", "fsync")


@contextmanager
def killed_at(k: int, monkeypatch) -> Iterator[list[str]]:
    """Count every file-system change (rename, replace, mkdir, rmdir, unlink, link, fsync, a
    file created through os.open) and raise :class:`Killed` at the k-th; from then on every
    change raises too, so no ``finally`` can tidy up: the state is what a SIGKILL at that
    instant leaves. Yields the list of changes made so far ("name" per call)."""
    calls: list[str] = []
    dead = [False]

    def wrap(name: str, real):
        def change(*args, **kwargs):
            if name == "open" and not (args[1] if len(args) > 1 else kwargs.get("flags", 0)) \
                    & os.O_CREAT:
                return real(*args, **kwargs)
            if dead[0]:
                raise Killed(name)
            calls.append(name)
            if len(calls) == k:
                dead[0] = True
                raise Killed(name)
            return real(*args, **kwargs)
        return change

    with monkeypatch.context() as patch:
        for name in (*MUTATORS, "open"):
            patch.setattr(os, name, wrap(name, getattr(os, name)))
        yield calls
