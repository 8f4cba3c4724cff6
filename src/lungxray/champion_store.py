"""The champion folder, local or on ``gs://``: which run is the champion and where its files are.

Layout::

    champion.json          the pointer: {"run_id": ..., "history": "history/<run id>", ...}
    history/<run id>/      one entry per promotion, written complete and never modified:
        model/  model_card.md  decision.json

The pointer is the one file a promotion replaces (:mod:`lungxray.promotion`), in one atomic
step, so a reader that follows it sees the old champion or the new one, never a mix. An entry
that no pointer ever named (a promotion killed before its swap) is ignored. Folders written
before issue #34 also hold copies of the current ``model/``, ``model_card.md`` and
``decision.json`` beside the pointer: readers ignore them (the pointer names the same history
entry) and the next promotion removes them.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lungxray import safeio, uris
from lungxray.artifacts import CHAMPION_FILE as RECORD_FILE
from lungxray.artifacts import CHAMPION_HISTORY_DIR as HISTORY_DIR
from lungxray.artifacts import CHAMPION_MODEL_DIR as MODEL_DIR
from lungxray.artifacts import DECISION_FILE, INFO_FILE
from lungxray.artifacts import MODEL_CARD_FILE as CARD_FILE
from lungxray.errors import ConfigError, ModelError, quote
from lungxray.limits import DEFAULT, Limits

RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
STAGING_PREFIX = ".promote-"  # a local promotion's staging folder, inside the champion folder
LEGACY_COPIES = (MODEL_DIR, CARD_FILE, DECISION_FILE)  # beside the pointer before #34
SERVING_DIR = "saved_model"  # where docs/serving.md exports the champion for KServe
HASH_CHUNK = 1 << 20


def check_run_id(run_id: Any) -> str:
    """A run id becomes a folder name under history/: no separators, no '..'."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ConfigError(f"run id {quote(str(run_id))} must be 1-128 letters, digits, '.', "
                          f"'_' or '-', starting with a letter or digit")
    return run_id


def gcs_name(champion_uri: str, *parts: str) -> str:
    return "/".join([str(champion_uri).rstrip("/"), *parts])


def identity(champion_uri: str | Path) -> str:
    """The champion location in one spelling (a local path absolute), as a decision records it
    and a promotion compares it."""
    text = str(champion_uri)
    if uris.is_gcs(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


# --------------------------------------------------------------------------- what is there


def _ours(name: str) -> bool:
    """A name a champion folder may hold: the pointer, the history, the served export, the
    older layout's copies, and what a killed promotion leaves (its staging folder, the
    pointer's temporary file)."""
    name = name.rstrip("/")
    return (name in (RECORD_FILE, HISTORY_DIR, SERVING_DIR, *LEGACY_COPIES)
            or name.startswith((STAGING_PREFIX, f".{RECORD_FILE}.")))


def _refuse_foreign(where: str, names: Any) -> None:
    for name in names:
        if not _ours(name):
            raise ModelError(f"{where}: not a champion folder (no {RECORD_FILE}, and it holds "
                             f"{quote(name, 60)}); expected one written by promote, or an empty "
                             f"folder")


def _names(root: Path) -> list[str]:
    """The names in a local folder, as many as it takes to tell whether it is a champion's
    (a foreign name stops the listing: "/" is not read whole)."""
    names = []
    try:
        with os.scandir(root) as entries:
            for entry in entries:
                names.append(entry.name)
                if not _ours(entry.name):
                    break
    except OSError as err:
        raise ModelError(f"cannot read the champion folder {quote(str(root))}: "
                         f"{err.strerror or err}") from None
    return names


def check_uri(champion_uri: str, what: str = "champion_uri") -> str:
    """``champion_uri`` if a champion can live there: a local folder or ``gs://`` prefix
    (:func:`lungxray.uris.check_location`) and, when it is a local folder that exists, a
    champion folder or one holding nothing else than what a killed promotion leaves."""
    uris.check_location(champion_uri, what, folder=True)
    if not uris.is_gcs(champion_uri):
        root = Path(champion_uri)
        if root.is_dir() and not os.path.lexists(root / RECORD_FILE):
            _refuse_foreign(f"{what} {quote(champion_uri)}", _names(root))
    return champion_uri


def current(champion_uri: str | Path) -> dict[str, Any]:
    """Who the champion is now: ``{"run_id": ... or None, "generation": ...}``. A decision
    records it, and a promotion refuses to replace any other champion than the one the
    challenger was compared with. ``generation`` is the GCS generation of champion.json (0:
    none yet); locally always 0."""
    if uris.is_gcs(champion_uri):
        from lungxray import storage

        found = storage.read_generation(gcs_name(str(champion_uri), RECORD_FILE))
        if found is None:
            return {"run_id": None, "generation": 0}
        record = safeio.loads_json(found[0], f"{champion_uri}/{RECORD_FILE}", error=ModelError)
        return {"run_id": _record_run_id(record, str(champion_uri)), "generation": found[1]}
    record_path = Path(champion_uri) / RECORD_FILE
    if not os.path.lexists(record_path):
        return {"run_id": None, "generation": 0}
    record = safeio.load_json_object(record_path, "champion record", error=ModelError)
    return {"run_id": _record_run_id(record, str(champion_uri)), "generation": 0}


def _record_run_id(record: Any, where: str) -> str:
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ModelError(f"{where}: {RECORD_FILE} names no valid run id")
    return run_id


def _check_empty(champion_uri: str | Path) -> None:
    """No pointer: the location must be new, empty, or hold only what a killed first promotion
    leaves; anything else is not a champion's and is never written into."""
    if uris.is_gcs(champion_uri):
        from lungxray import storage

        _refuse_foreign(str(champion_uri), storage.list_top(str(champion_uri)))
        return
    root = Path(champion_uri)
    if not root.exists():
        return
    if not root.is_dir():
        raise ModelError(f"{root}: not a champion folder (not a folder)")
    _refuse_foreign(str(root), _names(root))


def champion_model(champion_uri: str | Path, state: dict[str, Any],
                   cache_dir: Path | None = None) -> Path | None:
    """The ``model/`` folder of the champion ``state`` names (:func:`current`; on ``gs://``
    fetched into the cache), or None when there is none yet."""
    run_id = state["run_id"]
    if run_id is None:
        _check_empty(champion_uri)
        return None
    if uris.is_gcs(champion_uri):
        from lungxray import storage

        model = storage.fetch(gcs_name(str(champion_uri), HISTORY_DIR, run_id, MODEL_DIR) + "/",
                              cache_dir, progress=False)
    else:
        model = Path(champion_uri) / HISTORY_DIR / run_id / MODEL_DIR
    _entry_info(champion_uri, run_id, model)
    return model


def champion_info(champion_uri: str | Path, state: dict[str, Any],
                  cache_dir: Path | None = None) -> dict[str, Any] | None:
    """The champion's ``model_info.json`` (on ``gs://`` that one file fetched, not the model),
    or None when there is none yet."""
    run_id = state["run_id"]
    if run_id is None:
        _check_empty(champion_uri)
        return None
    if not uris.is_gcs(champion_uri):
        return _entry_info(champion_uri, run_id, Path(champion_uri) / HISTORY_DIR / run_id /
                           MODEL_DIR)
    from lungxray import storage

    try:
        info = storage.fetch(gcs_name(str(champion_uri), HISTORY_DIR, run_id, MODEL_DIR,
                                      INFO_FILE), cache_dir, progress=False)
    except storage.StorageError as err:
        raise ModelError(f"{champion_uri}: {RECORD_FILE} names run {run_id}, whose history "
                         f"entry is not complete ({err})") from None
    return _entry_info(champion_uri, run_id, info.parent)


def _entry_info(champion_uri: str | Path, run_id: str, model: Path) -> dict[str, Any]:
    try:
        return model_info(model)
    except ModelError as err:
        raise ModelError(f"{champion_uri}: {RECORD_FILE} names run {run_id}, whose history entry "
                         f"is not complete ({err})") from None


def read_champion(champion_uri: str | Path, cache_dir: Path | None = None) -> Path | None:
    """The current champion's ``model/`` folder (on ``gs://``: fetched into the cache), or None
    when ``champion_uri`` holds none yet. A location that holds something else, or a pointer to
    an incomplete entry, is a ModelError naming it."""
    return champion_model(champion_uri, current(champion_uri), cache_dir)


# --------------------------------------------------------------------------- model files


def model_info(model_dir: Path) -> dict[str, Any]:
    """A model folder's ``model_info.json``, bounded (no Keras import: promotion never loads
    the model)."""
    return safeio.load_json_object(Path(model_dir) / INFO_FILE, "model info", error=ModelError)


def model_sha256(model_dir: Path | str, limits: Limits = DEFAULT) -> str:
    """SHA-256 over a model folder: every regular file's relative path, size and bytes, in path
    order. The same planner as the model copy (regular files inside the folder only, at most
    ``max_model_folder_bytes``), so a folder and its promoted copy hash the same."""
    root = Path(model_dir)
    digest = hashlib.sha256()
    for rel, size in sorted(safeio.check_model_folder(root, limits),
                            key=lambda item: item[0].as_posix()):
        digest.update(os.fsencode(rel.as_posix()) + b"\0" + str(size).encode() + b"\0")
        _hash_file(root.resolve() / rel, size, digest)
    return digest.hexdigest()


def _hash_file(path: Path, size: int, digest: Any) -> None:
    """Hash exactly the ``size`` bytes planned; a file that changed meanwhile is refused."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as err:
        raise ModelError(f"cannot read {quote(str(path))}: {err.strerror or err}") from None
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fh.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_size != size:
            raise ModelError(f"{quote(str(path))} changed while it was read")
        left = size
        while left > 0:
            chunk = fh.read(min(HASH_CHUNK, left))
            if not chunk:
                raise ModelError(f"{quote(str(path))} changed while it was read")
            digest.update(chunk)
            left -= len(chunk)


def pointer(run_id: str, record: dict[str, Any], previous: str | None) -> bytes:
    """The content of champion.json for a new champion."""
    return (json.dumps({"run_id": run_id, "history": f"{HISTORY_DIR}/{run_id}",
                        "previous_run_id": previous,
                        "model_name": (record.get("challenger") or {}).get("model_name"),
                        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds")},
                       indent=2) + "\n").encode()
