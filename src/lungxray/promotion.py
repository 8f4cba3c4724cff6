"""Promotion: make a run's model the champion, verified before anything is written, crash-safe.

Verified first (:func:`check_decision`, then the staged copy): the decision says promote and
its own numbers and margin say so (:func:`lungxray.champion.decide` again); it was decided for
this champion location and this champion (run id; on ``gs://`` also the generation of
champion.json); the copy of the model hashes to what challenge recorded; its classes and input
are what was decided on and what the champion takes. Any mismatch is a one-line error and
nothing is changed.

Then one entry, ``history/<run id>/``, is written complete in a staging folder (every file
fsynced) and renamed into ``history/``, and the pointer ``champion.json`` is replaced in one
atomic step (``os.replace`` of a fsynced file; on ``gs://`` a write conditioned on the
generation read, so of two runs promoting at once exactly one wins). Killed at any instant, the
folder holds the old champion or the new one. Before the swap an entry may sit in ``history/``
that the pointer never named (an orphan): the next promotion of that run removes it and starts
again. Staging is removed on SIGTERM/SIGINT and swept by the next promotion after a SIGKILL.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from lungxray import champion_store as store
from lungxray import model_loader, safeio, staging, uris
from lungxray.champion_store import DECISION_FILE, HISTORY_DIR, MODEL_DIR, RECORD_FILE
from lungxray.errors import ConfigError, LungxrayError, ModelError, quote
from lungxray.limits import DEFAULT

SHA256 = re.compile(r"[0-9a-f]{64}")
GCS_STAGING_PREFIX = "lungxray-promote-"  # in the temporary folder: the entry before upload


def promote(model_dir: Path | str, champion_uri: str | Path, record: dict[str, Any],
            model_card: Path | str | None = None) -> str:
    """Copy ``model_dir``, its model card and ``record`` (decision.json) into
    ``champion_uri/history/<run id>/`` and make it the champion. Refuses a decision that does
    not hold up (see the module), a run id already promoted, a model folder without a model,
    and a champion that changed since ``record`` was decided. Returns the history entry (a
    path or a gs:// URI)."""
    uri = store.check_uri(str(champion_uri))
    run_id = check_decision(record, uri)
    model_dir = Path(model_dir)
    try:
        model_loader.open_folder(model_dir)  # the files Keras would open, checked unloaded
    except ModelError as err:
        raise ModelError(f"{model_dir}: not a model folder ({err})") from None
    if uris.is_gcs(uri):
        return _promote_gcs(model_dir, uri, record, model_card, run_id)
    return str(_promote_local(model_dir, Path(uri), record, model_card, run_id))


# --------------------------------------------------------------------------- verification


def check_decision(record: Any, champion_uri: str) -> str:
    """The run id of a decision that may be carried out at ``champion_uri``: it says promote,
    its own comparison and margin say promote, it names the champion it was compared with and
    a hash of the challenger's files. Reads nothing."""
    from lungxray.champion import decide

    if not isinstance(record, dict):
        raise ConfigError(f"a decision must be a JSON object, not {type(record).__name__}")
    run_id = store.check_run_id(record.get("run_id"))
    where = f"decision of run {run_id}"
    if record.get("decision") != "promote":
        raise ConfigError(f"{where} is {quote(str(record.get('decision')))}, not 'promote'")
    state, challenger = record.get("champion_state"), record.get("challenger")
    recorded_uri = record.get("champion_uri")
    if (not isinstance(state, dict) or not isinstance(challenger, dict)
            or not isinstance(recorded_uri, str)
            or not SHA256.fullmatch(str(challenger.get("sha256")))):
        raise ConfigError(f"{where} does not record the champion it was compared with and a "
                          f"hash of the challenger's files; run `lungxray challenge` again")
    if recorded_uri != store.identity(champion_uri):
        raise ConfigError(f"{where} was decided for the champion at {quote(recorded_uri)}, not "
                          f"{quote(store.identity(champion_uri))}")
    margin, comparison = record.get("margin"), record.get("comparison")
    if not _number(margin) or not 0 <= margin < 1:
        raise ConfigError(f"{where}: margin {quote(str(margin), 40)} is not a number in [0, 1)")
    if comparison is None:
        if state.get("run_id") is not None:
            raise ConfigError(f"{where} was compared with champion run "
                              f"{quote(str(state.get('run_id')))} but holds no comparison")
    else:
        _check_comparison(comparison, where)
    verdict = decide(comparison, margin)
    if verdict["decision"] != "promote":
        raise ConfigError(f"{where} says 'promote', but its own numbers say "
                          f"{verdict['decision']!r} ({verdict['reason']}); not promoted")
    return run_id


def _number(value: Any) -> bool:
    return (isinstance(value, int | float) and not isinstance(value, bool)
            and math.isfinite(value))


def _check_comparison(comparison: Any, where: str) -> None:
    """The fields :func:`lungxray.champion.decide` reads, with values a paired bootstrap can
    give: AUCs in [0, 1], difference = challenger - champion, an ordered CI in [-1, 1]."""
    problem = ""
    if not isinstance(comparison, dict):
        problem = "not an object"
    else:
        ci, n = comparison.get("ci"), comparison.get("n")
        aucs = [comparison.get(k) for k in ("champion", "challenger")]
        if not all(_number(v) and 0 <= v <= 1 for v in aucs):
            problem = "its AUCs are not numbers in [0, 1]"
        elif not _number(comparison.get("difference")) or not math.isclose(
                comparison["difference"], aucs[1] - aucs[0], abs_tol=1e-9):
            problem = "its difference is not challenger - champion"
        elif (not isinstance(ci, list) or len(ci) != 2 or not all(_number(v) and -1 <= v <= 1
                                                                  for v in ci)
              or ci[0] > ci[1]):
            problem = "its CI is not an ordered pair in [-1, 1]"
        elif not _number(comparison.get("ci_level")) or not 0.5 <= comparison["ci_level"] < 1:
            problem = "its CI level is not in [0.5, 1)"
        elif not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problem = "its image count is not a positive integer"
    if problem:
        raise ConfigError(f"{where}: the comparison cannot be what challenge wrote ({problem})")


def check_model(model: Path, record: dict[str, Any], champion: dict[str, Any] | None,
                source: Path, champion_uri: str) -> None:
    """The staged copy ``model`` of ``source`` is the model the decision was made for (same
    hash of its files), and takes the classes and input the decision and the champion name."""
    from lungxray.champion import COMPATIBLE_KEYS, check_compatible

    recorded = record["challenger"]
    digest = store.model_sha256(model)
    if digest != recorded["sha256"]:
        raise ConfigError(f"{source}: its files (sha256 {digest[:16]}...) are not the model run "
                          f"{record['run_id']} was decided on ({recorded['sha256'][:16]}...); "
                          f"not promoted")
    info = store.model_info(model)
    for key in COMPATIBLE_KEYS:
        if info.get(key) != recorded.get(key):
            raise ConfigError(f"{source}: {key} {quote(str(info.get(key)), 60)} differs from "
                              f"the decision's {quote(str(recorded.get(key)), 60)}")
    if champion is not None:
        check_compatible(champion, info, where=f"champion {champion_uri}")


def _check_unchanged(champion_uri: str, record: dict[str, Any], now: dict[str, Any]) -> None:
    """The champion must still be the one the decision compared with (two runs that finish
    together both beat the old champion; only the first may replace it)."""
    compared = record["champion_state"]
    if compared.get("run_id") != now["run_id"] or (
            uris.is_gcs(champion_uri) and compared.get("generation") != now["generation"]):
        raise ConfigError(f"{champion_uri}: the champion changed since run {record['run_id']} "
                          f"was compared with it (then {compared.get('run_id')}, now "
                          f"{now['run_id']}); not promoted, run the comparison again")


def _is_orphan(entry_decision: Any, now: dict[str, Any], run_id: str, where: str) -> bool:
    """True for a history entry of ``run_id`` that no pointer ever named (a promotion killed
    before its swap): its own decision was compared with the champion that is still current.
    An entry that was the champion once is refused: history is never rewritten."""
    if now["run_id"] == run_id:
        raise ConfigError(f"{where}: run {run_id} was already promoted (it is the champion)")
    compared = entry_decision.get("champion_state") if isinstance(entry_decision, dict) else None
    if entry_decision is None or (isinstance(compared, dict)
                                  and compared.get("run_id") == now["run_id"]
                                  and compared.get("generation") == now["generation"]):
        return True
    raise ConfigError(f"{where}: run {run_id} was already promoted")


# --------------------------------------------------------------------------- staging


def _stage(folder: Path, model_dir: Path, record: dict[str, Any],
           model_card: Path | str | None) -> None:
    """The whole history entry in ``folder``, every file and folder fsynced."""
    folder.mkdir()
    # Bounded, regular files only, no link followed out of the folder (a model is user input).
    safeio.copy_model_folder(model_dir, folder / MODEL_DIR)
    if model_card is not None:
        card = safeio.read_bounded(Path(model_card), "model card", DEFAULT.max_json_bytes,
                                   error=ConfigError)
        (folder / store.CARD_FILE).write_bytes(card)
    (folder / DECISION_FILE).write_text(json.dumps(record, indent=2) + "\n")
    for path in sorted(folder.rglob("*"), reverse=True):  # files before their folders
        _fsync(path)
    _fsync(folder)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- local


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the champion folder: two local promotions run one after the other."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _local_entry_decision(entry: Path) -> Any:
    try:
        return safeio.load_json_object(entry / DECISION_FILE, "decision", error=ModelError)
    except ModelError:
        return None


def _promote_local(model_dir: Path, root: Path, record: dict[str, Any],
                   model_card: Path | str | None, run_id: str) -> Path:
    """Under a lock on the champion folder: verify, stage the entry, rename it into history/,
    swap the pointer."""
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root), staging.staging_dir(root, store.STAGING_PREFIX,
                                            "lungxray promote") as work:
        now = store.current(root)
        champion = store.champion_info(root, now)
        entry = root / HISTORY_DIR / run_id
        orphan = os.path.lexists(entry) and _is_orphan(_local_entry_decision(entry), now,
                                                       run_id, str(entry))
        _check_unchanged(str(root), record, now)
        _stage(work / "entry", model_dir, record, model_card)
        check_model(work / "entry" / MODEL_DIR, record, champion, model_dir, str(root))
        # Verified: from here on the folder changes, each step leaving a whole champion.
        if orphan:
            os.replace(entry, work / "orphan")
        _retire_leftovers(root, work / "retired")
        (root / HISTORY_DIR).mkdir(exist_ok=True)
        os.replace(work / "entry", entry)
        _fsync(entry.parent)
        swapped = False
        try:
            with staging.signals_blocked():  # the swap and its note are one step
                safeio.write_text_atomic(root / RECORD_FILE, store.pointer(
                    run_id, record, now["run_id"]).decode(), fsync=True)
                swapped = True
            _fsync(root)
        finally:
            if not swapped:  # forget this run's entry, so that it may retry
                os.replace(entry, work / "undone")
    return entry


def _retire_leftovers(root: Path, retired: Path) -> None:
    """Move out what no reader uses: the pointer's temporary files from a killed swap and the
    older layout's copies of the current champion (see :mod:`lungxray.champion_store`)."""
    retired.mkdir()
    for path in root.iterdir():
        if path.name in store.LEGACY_COPIES or path.name.startswith(f".{RECORD_FILE}."):
            os.replace(path, retired / path.name)


# --------------------------------------------------------------------------- gs://


def _gcs_entry_decision(entry: str) -> Any:
    from lungxray import storage

    found = storage.read_generation(f"{entry}/{DECISION_FILE}")
    try:
        return None if found is None else safeio.loads_json(found[0], entry, error=ModelError)
    except ModelError:
        return None


def _promote_gcs(model_dir: Path, champion_uri: str, record: dict[str, Any],
                 model_card: Path | str | None, run_id: str) -> str:
    """The entry staged and verified locally, uploaded with create-only preconditions, then
    champion.json swapped by a compare-and-swap on its generation."""
    from lungxray import storage

    with staging.staging_dir(Path(tempfile.gettempdir()), GCS_STAGING_PREFIX,
                             "lungxray promote") as work:
        now = store.current(champion_uri)
        champion = store.champion_info(champion_uri, now, work / "cache")
        entry = store.gcs_name(champion_uri, HISTORY_DIR, run_id)
        orphan = storage.exists(entry + "/") and _is_orphan(_gcs_entry_decision(entry), now,
                                                            run_id, entry)
        _check_unchanged(champion_uri, record, now)
        _stage(work / "entry", model_dir, record, model_card)
        check_model(work / "entry" / MODEL_DIR, record, champion, model_dir, champion_uri)
        if orphan:
            storage.delete_prefix(entry)
        try:
            storage.upload(work / "entry", entry, no_overwrite=True)
            storage.write_if_generation(store.gcs_name(champion_uri, RECORD_FILE), store.pointer(
                run_id, record, now["run_id"]), now["generation"])
        except Exception:
            if _forget_gcs(champion_uri, entry, run_id):
                return entry  # the swap happened; only its answer was lost
            raise
        except BaseException:  # stopped by a signal: leave no entry behind
            _forget_gcs(champion_uri, entry, run_id)
            raise
    return entry


def _forget_gcs(champion_uri: str, entry: str, run_id: str) -> bool:
    """After a failed upload or swap: True if the pointer names this run all the same; else
    remove this run's entry (if that fails too, the next promotion of the run removes it)."""
    from lungxray import storage

    try:
        if store.current(champion_uri)["run_id"] == run_id:
            return True
        storage.delete_prefix(entry)
    except (LungxrayError, OSError):
        pass
    return False
