"""Champion/challenger: compare the model in use with a new one on the same images, decide, promote.

The comparison is paired: both models' probabilities for the *same* images are resampled
together (a stratified bootstrap, as :func:`lungxray.metrics.bootstrap_indices` draws for the
evaluation CIs), and each resample's ROC AUC difference is computed with scikit-learn's
``roc_auc_score`` (through :func:`lungxray.metrics.roc_auc`). Pairing removes the variation the
two AUCs share, so a CI of the difference is far narrower than two separate CIs would suggest.

The challenger is promoted only when the lower end of the CI of ``AUC(challenger) -
AUC(champion)`` lies above ``margin``: better by more than the margin with (default) 95%
confidence. Otherwise the champion is kept, and ``decision.json`` says why.

A champion folder (local) holds the current ``model/``, ``model_card.md`` and ``decision.json``,
and ``history/<run id>/`` with the same three for every promotion. :func:`promote` writes the
history entry complete under a temporary name and renames it; then swaps the current files by
renames and records the swap last in ``champion.json``, so a reader checks
:func:`read_champion` and never uses a half-promoted champion.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from lungxray import metrics, safeio, storage
from lungxray.artifacts import CHAMPION_FILE as RECORD_FILE  # written last: the current run
from lungxray.artifacts import CHAMPION_HISTORY_DIR as HISTORY_DIR
from lungxray.artifacts import CHAMPION_MODEL_DIR as MODEL_DIR
from lungxray.artifacts import DECISION_FILE
from lungxray.artifacts import MODEL_CARD_FILE as CARD_FILE
from lungxray.errors import ConfigError, DataError, ModelError, quote

SWAPPED = (MODEL_DIR, CARD_FILE, DECISION_FILE)  # replaced in this order, decision.json last
DEFAULT_N_BOOTSTRAP = 1000
CI_LEVEL = 0.95
COMPATIBLE_KEYS = ("class_names", "image_size", "channels")
RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


# --------------------------------------------------------------------------- comparison


def check_compatible(champion: dict[str, Any], challenger: dict[str, Any],
                     where: str = "champion") -> None:
    """Both models must name the same classes in the same order and take the same input, or
    their probabilities do not mean the same thing."""
    for key in COMPATIBLE_KEYS:
        if champion.get(key) != challenger.get(key):
            raise ModelError(f"{where}: {key} {quote(champion.get(key))} differs from the "
                             f"challenger's {quote(challenger.get(key))}; the champion "
                             f"cannot be compared on this run's images")


def _probs(name: str, probs: np.ndarray, n: int) -> np.ndarray:
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] != n or p.shape[1] < 2:
        raise DataError(f"{name} probabilities must be ({n}, K>=2), got shape {p.shape}")
    return p


def _auc(y: np.ndarray, probs: np.ndarray) -> float:
    """ROC AUC of one resample; binary straight through sklearn (the bootstrap's hot loop),
    more classes as evaluation computes it (macro one-vs-rest)."""
    if probs.shape[1] == 2:
        return float(roc_auc_score(y, probs[:, 1]))
    return metrics.roc_auc(y, probs)


def paired_bootstrap(y_true: np.ndarray, champion_probs: np.ndarray,
                     challenger_probs: np.ndarray, n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
                     seed: int = 0, level: float = CI_LEVEL) -> dict[str, Any]:
    """The AUC of each model on the same images, their difference (challenger - champion) with
    a paired, stratified percentile bootstrap CI, and the share of resamples in which the
    challenger is not better (a one-sided bootstrap p-value). Seeded: same inputs, same CI."""
    y = np.asarray(y_true).astype(int).reshape(-1)
    champion = _probs("champion", champion_probs, len(y))
    challenger = _probs("challenger", challenger_probs, len(y))
    if champion.shape != challenger.shape:
        raise DataError(f"champion and challenger give {champion.shape[1]} and "
                        f"{challenger.shape[1]} class probabilities")
    if n_bootstrap < 2 or not 0.5 <= level < 1.0:
        raise ConfigError(f"n_bootstrap must be >= 2 and level in [0.5, 1), got {n_bootstrap} "
                          f"and {level}")
    auc_champion = metrics.roc_auc(y, champion)
    auc_challenger = metrics.roc_auc(y, challenger)
    if auc_champion is None or auc_challenger is None:
        raise DataError(f"ROC AUC is undefined: the {len(y)} images do not hold every one of the "
                        f"{champion.shape[1]} classes")
    # The same resampled rows for both models: that is what makes the test paired.
    diffs = np.array([_auc(y[idx], challenger[idx]) - _auc(y[idx], champion[idx])
                      for idx in metrics.bootstrap_indices(y, n_bootstrap, seed)])
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return {"metric": "roc_auc", "n": int(len(y)), "champion": auc_champion,
            "challenger": auc_challenger, "difference": auc_challenger - auc_champion,
            "ci": [float(lo), float(hi)], "ci_level": level,
            "p_not_better": float(np.mean(diffs <= 0.0)), "n_bootstrap": n_bootstrap,
            "seed": seed, "method": "paired stratified bootstrap of the ROC AUC difference"}


def decide(comparison: dict[str, Any] | None, margin: float = 0.0) -> dict[str, str]:
    """{"decision": "promote" | "keep", "reason": ...}. Without a champion (None) the
    challenger is promoted; otherwise only when the CI's lower end exceeds ``margin``."""
    if margin < 0 or margin >= 1:
        raise ConfigError(f"promotion margin must be in [0, 1), got {margin}")
    if comparison is None:
        return {"decision": "promote", "reason": "no champion yet"}
    lo, hi = comparison["ci"]
    diff = comparison["difference"]
    level = f"{comparison['ci_level']:.0%}"
    summary = (f"AUC: challenger {comparison['challenger']:.4f} vs champion "
               f"{comparison['champion']:.4f}, "
               f"difference {diff:+.4f}, {level} CI [{lo:+.4f}, {hi:+.4f}] on "
               f"{comparison['n']} paired images")
    if lo > margin:
        return {"decision": "promote",
                "reason": f"the challenger is better by more than the margin {margin:g} with "
                          f"{level} confidence: {summary}"}
    why = ("the challenger is worse" if hi < 0 else "the challenger is not better by more than "
           "the margin "
           f"{margin:g} with {level} confidence")
    return {"decision": "keep", "reason": f"the champion stays: {why} ({summary})"}


def decision_record(run_id: str, challenger: dict[str, Any], champion: dict[str, Any] | None,
                    comparison: dict[str, Any] | None, margin: float,
                    split: str = "", champion_state: dict[str, Any] | None = None,
                    evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """The content of ``decision.json``: the decision, its reason and the evidence.
    ``champion_state`` (:func:`current`) is who was compared with; ``evidence`` the
    comparisons on other splits, reported but not decided on."""
    check_run_id(run_id)
    verdict = decide(comparison, margin)

    def who(info: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if info is None else {k: info.get(k) for k in (
            "model_name", "threshold", "class_names", "image_size", "channels", "members")}

    return {**verdict, "run_id": run_id, "split": split or None, "margin": margin,
            "challenger": who(challenger), "champion": who(champion), "comparison": comparison,
            "evidence": evidence or {}, "champion_state": champion_state,
            "decided_at": datetime.now(UTC).isoformat(timespec="seconds")}


DECISION_SPLIT = "val"  # the split the decision is made on; test splits are only reported


def challenge(challenger_dir: Path | str, data_dir: Path | str, champion_uri: str,
              run_id: str, margin: float = 0.0, seed: int = 0,
              n_bootstrap: int = DEFAULT_N_BOOTSTRAP,
              cache_dir: Path | None = None) -> dict[str, Any]:
    """Compare this run's pick with the champion at ``champion_uri`` on this run's images and
    return the decision record. Decided on validation (like every selection here); every
    other split of the dataset (test, a shifted test) is compared and reported beside it.
    Without ``champion_uri`` the decision is ``skip``; with an empty one, ``promote``."""
    from lungxray import integrity, predictor
    from lungxray.train import read_model_info

    check_run_id(run_id)
    challenger_info = read_model_info(Path(challenger_dir))
    if not champion_uri:
        return {"decision": "skip", "reason": "no champion_uri given", "run_id": run_id,
                "margin": margin, "comparison": None, "evidence": {}}
    state = current(champion_uri)
    champion_dir = read_champion(champion_uri, cache_dir)
    if champion_dir is None:
        return decision_record(run_id, challenger_info, None, None, margin,
                               champion_state=state)
    champion_info = read_model_info(champion_dir)
    check_compatible(champion_info, challenger_info, where=f"champion {champion_uri}")
    manifest = integrity.read_manifest(Path(data_dir))
    if DECISION_SPLIT not in manifest["splits"]:
        raise DataError(f"{data_dir}: has no {DECISION_SPLIT} split to decide on")
    predictors = [predictor.load_predictor(d) for d in (champion_dir, challenger_dir)]
    compared: dict[str, Any] = {}
    for split in [DECISION_SPLIT, *(s for s in manifest["splits"] if s != DECISION_SPLIT)]:
        if split == "train":
            continue
        images = integrity.load_checked_split(Path(data_dir), split, manifest)
        old, new = (p.predict(images.images)[0] for p in predictors)
        compared[split] = paired_bootstrap(images.labels, old, new, n_bootstrap, seed)
    return decision_record(run_id, challenger_info, champion_info, compared.pop(DECISION_SPLIT),
                           margin, split=DECISION_SPLIT, champion_state=state,
                           evidence=compared)


def markdown(record: dict[str, Any]) -> str:
    """The "Champion vs challenger" section of the report and the model card."""
    lines = ["## Champion vs challenger", "",
             f"**Decision: {record['decision']}** — {record['reason']}.", ""]
    rows = {**({record.get("split") or DECISION_SPLIT: record["comparison"]}
               if record.get("comparison") else {}), **record.get("evidence", {})}
    if rows:
        lines += ["| split | champion AUC | challenger AUC | difference | 95% CI | "
                  "P(not better) | images |", "|---|---:|---:|---:|---|---:|---:|"]
        for split, c in rows.items():
            lo, hi = c["ci"]
            lines.append(f"| {split} | {c['champion']:.4f} | {c['challenger']:.4f} | "
                         f"{c['difference']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | "
                         f"{c['p_not_better']:.3f} | {c['n']} |")
        champ = (record.get("champion") or {}).get("model_name")
        new = (record.get("challenger") or {}).get("model_name")
        champ_run = (record.get("champion_state") or {}).get("run_id")
        lines += ["", f"Champion: {champ} (run {champ_run}); challenger: {new} (run "
                      f"{record['run_id']}). Paired stratified "
                      f"bootstrap of the ROC AUC difference on the same images, decided on "
                      f"{DECISION_SPLIT} with margin {record['margin']:g}; the other splits are "
                      f"evidence only. Validation chose the challenger among this run's models, "
                      f"which favours it slightly: the margin is the guard."]
    return "\n".join(lines) + "\n"


def write_decision(record: dict[str, Any], path: Path | str) -> Path:
    """``decision.json`` written to a temporary name and renamed: never half-written. ``path``
    is a folder (``<path>/decision.json``) or a ``.json`` file."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / DECISION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_text_atomic(path, json.dumps(record, indent=2) + "\n", fsync=True)
    return path


# --------------------------------------------------------------------------- champion folder


def check_run_id(run_id: str) -> None:
    """A run id becomes a folder name under history/: no separators, no '..'."""
    if not RUN_ID.fullmatch(str(run_id)) or ".." in str(run_id):
        raise ConfigError(f"run id {quote(str(run_id))} must be 1-128 letters, digits, '.', "
                          f"'_' or '-', starting with a letter or digit")


def _is_gcs(champion_uri: str | Path) -> bool:
    return str(champion_uri).startswith("gs://")


def _gcs_name(champion_uri: str, *parts: str) -> str:
    return "/".join([str(champion_uri).rstrip("/"), *parts])


def current(champion_uri: str | Path) -> dict[str, Any]:
    """Who the champion is now: ``{"run_id": ... or None, "generation": ...}``. A decision
    records it, and :func:`promote` refuses to replace any other champion than the one the
    challenger was compared with. ``generation`` is the GCS generation of champion.json (0:
    none yet); locally always 0."""
    if _is_gcs(champion_uri):
        found = storage.read_generation(_gcs_name(str(champion_uri), RECORD_FILE))
        if found is None:
            return {"run_id": None, "generation": 0}
        record = safeio.loads_json(found[0], f"{champion_uri}/{RECORD_FILE}", error=ModelError)
        return {"run_id": _record_run_id(record, str(champion_uri)), "generation": found[1]}
    record_path = Path(champion_uri) / RECORD_FILE
    if not record_path.is_file():
        return {"run_id": None, "generation": 0}
    record = safeio.load_json_object(record_path, "champion record", error=ModelError)
    return {"run_id": _record_run_id(record, str(champion_uri)), "generation": 0}


def _record_run_id(record: Any, where: str) -> str:
    run_id = record.get("run_id") if isinstance(record, dict) else None
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise ModelError(f"{where}: {RECORD_FILE} names no valid run id")
    return run_id


def read_champion(champion_uri: str | Path, cache_dir: Path | None = None) -> Path | None:
    """The current champion's ``model/`` folder (on ``gs://``: fetched into the cache), or None
    when ``champion_uri`` holds none yet (missing or empty). A folder that holds something else,
    or a half-promoted champion, is a ModelError naming it."""
    from lungxray.train import read_model_info

    if _is_gcs(champion_uri):
        run_id = current(champion_uri)["run_id"]
        if run_id is None:
            if storage.exists(str(champion_uri)):
                raise ModelError(f"{champion_uri}: not a champion folder (no {RECORD_FILE}); "
                                 f"expected one written by promote, or an empty prefix")
            return None
        model = storage.fetch(_gcs_name(str(champion_uri), HISTORY_DIR, run_id, MODEL_DIR) + "/",
                              cache_dir, progress=False)
        try:
            read_model_info(model)
        except (OSError, ValueError) as err:
            raise ModelError(f"{champion_uri}: champion of run {run_id} is incomplete "
                             f"({quote(str(err))})") from err
        return model
    root = Path(champion_uri)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    record_path = root / RECORD_FILE
    if not record_path.is_file():
        raise ModelError(f"{root}: not a champion folder (no {RECORD_FILE}); expected one "
                         f"written by promote, or an empty folder")
    try:
        record = safeio.load_json_object(record_path, "champion record", error=ModelError)
        decision = safeio.load_json_object(root / DECISION_FILE, "decision", error=ModelError)
        read_model_info(root / MODEL_DIR)
    except (OSError, ValueError) as err:
        raise ModelError(f"{root}: champion is incomplete ({quote(str(err))}); the last "
                         f"complete one is under {HISTORY_DIR}/") from err
    if decision.get("run_id") != record.get("run_id"):
        raise ModelError(f"{root}: champion is half-promoted ({DECISION_FILE} of run "
                         f"{quote(str(decision.get('run_id')))}, {RECORD_FILE} of run "
                         f"{quote(str(record.get('run_id')))}); the complete copies are under "
                         f"{HISTORY_DIR}/")
    return root / MODEL_DIR


def _check_promotable(model_dir: Path, record: dict[str, Any]) -> str:
    """The run id of a record that says promote, for a folder that holds a model."""
    from lungxray.train import read_model_info

    run_id = str(record.get("run_id", ""))
    check_run_id(run_id)
    if record.get("decision") != "promote":
        raise ConfigError(f"decision of run {run_id} is {quote(str(record.get('decision')))}, "
                          f"not 'promote'")
    try:
        read_model_info(model_dir)
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: not a model folder ({quote(str(err))})") from err
    return run_id


def _check_unchanged(champion_uri: str | Path, record: dict[str, Any], now: dict[str, Any]) -> None:
    """The champion must still be the one the decision compared with (two runs that finish
    together both beat the old champion; only the first may replace it). A record that names
    no compared champion (written by hand, to force a promotion) is not checked."""
    compared = record.get("champion_state")
    if not isinstance(compared, dict):
        return
    if compared.get("run_id") != now["run_id"] or (
            _is_gcs(champion_uri) and compared.get("generation") != now["generation"]):
        raise ConfigError(f"{champion_uri}: the champion changed since run {record['run_id']} "
                          f"was compared with it (then {compared.get('run_id')}, now "
                          f"{now['run_id']}); not promoted, run the comparison again")


def promote(model_dir: Path | str, champion_uri: str | Path, record: dict[str, Any],
            model_card: Path | str | None = None) -> str:
    """Copy ``model_dir``, its model card and ``record`` (decision.json) into
    ``champion_uri/history/<run id>/`` and make it the champion. Refuses a run id already in the
    history, a model folder without a model, and a champion that changed since ``record`` was
    decided. Returns the history entry (a path or a gs:// URI)."""
    model_dir = Path(model_dir)
    run_id = _check_promotable(model_dir, record)
    if _is_gcs(champion_uri):
        return _promote_gcs(model_dir, str(champion_uri), record, model_card, run_id)
    return str(_promote_local(model_dir, Path(champion_uri), record, model_card, run_id))


def _promote_gcs(model_dir: Path, champion_uri: str, record: dict[str, Any],
                 model_card: Path | str | None, run_id: str) -> str:
    """History entry uploaded with create-only preconditions, then champion.json swapped by a
    compare-and-swap on its generation: the champion is the old one or the new one, never a mix,
    and of two runs promoting at once exactly one wins."""
    now = current(champion_uri)
    read_champion(champion_uri)  # refuses a prefix that is not a champion's before writing
    entry = _gcs_name(champion_uri, HISTORY_DIR, run_id)
    if storage.exists(entry + "/"):
        raise ConfigError(f"{entry}: run {run_id} was already promoted")
    _check_unchanged(champion_uri, record, now)
    with tempfile.TemporaryDirectory(prefix="lungxray-promote-") as work:
        _stage(Path(work) / "entry", model_dir, record, model_card)
        try:
            storage.upload(Path(work) / "entry", entry, no_overwrite=True)
            storage.write_if_generation(_gcs_name(champion_uri, RECORD_FILE), _pointer(
                run_id, record), now["generation"])
        except BaseException:
            storage.delete_prefix(entry)  # this run did not become the champion: forget it
            raise
    return entry


def _pointer(run_id: str, record: dict[str, Any]) -> bytes:
    return (json.dumps({"run_id": run_id, "history": f"{HISTORY_DIR}/{run_id}",
                        "model_name": (record.get("challenger") or {}).get("model_name"),
                        "promoted_at": datetime.now(UTC).isoformat(timespec="seconds")},
                       indent=2) + "\n").encode()


def _promote_local(model_dir: Path, root: Path, record: dict[str, Any],
                   model_card: Path | str | None, run_id: str) -> Path:
    """History entry written complete under a temporary name and renamed; current files
    swapped by renames and sealed by champion.json, under a lock on the champion folder."""
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root):
        read_champion(root)  # refuses a folder that is not a champion's before touching it
        entry = root / HISTORY_DIR / run_id
        if entry.exists():
            raise ConfigError(f"{entry}: run {run_id} was already promoted")
        _check_unchanged(root, record, current(root))
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".promote-{run_id}-", dir=root))
        moves: list[tuple[str, str]] = []  # what the swap did so far, to undo it on failure
        created = done = False
        try:
            _stage(staging / "entry", model_dir, record, model_card)
            os.replace(staging / "entry", entry)  # complete or absent
            created = True
            # Hard links: history and current files are never modified in place, only
            # replaced, so they may share their bytes (a model is hundreds of MB).
            shutil.copytree(entry, staging / "current", symlinks=False, copy_function=_link)
            _swap(root, staging / "current", staging / "retired", moves)
            safeio.write_text_atomic(root / RECORD_FILE, _pointer(run_id, record).decode(),
                                     fsync=True)
            done = True
        finally:
            if not done:  # put the previous champion back and forget this run, so it may retry
                _undo(root, staging / "retired", moves)
                if created:
                    shutil.rmtree(entry, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
    return entry


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    """An exclusive lock on the champion folder: two local promotions run one after the other."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _link(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _stage(folder: Path, model_dir: Path, record: dict[str, Any],
           model_card: Path | str | None) -> None:
    folder.mkdir()
    # Bounded, regular files only, no link followed out of the folder (a model is user input).
    safeio.copy_model_folder(model_dir, folder / MODEL_DIR)
    if model_card is not None:
        shutil.copyfile(model_card, folder / CARD_FILE)
    (folder / DECISION_FILE).write_text(json.dumps(record, indent=2) + "\n")


def _undo(root: Path, retired: Path, moves: list[tuple[str, str]]) -> None:
    """Undo a partial :func:`_swap`, last move first."""
    for direction, name in reversed(moves):
        if direction == "in":
            if (root / name).is_dir():
                shutil.rmtree(root / name)
            else:
                (root / name).unlink(missing_ok=True)
        else:
            os.replace(retired / name, root / name)


def _swap(root: Path, new: Path, retired: Path, moves: list[tuple[str, str]]) -> None:
    """Move the current files aside and the new ones in, by renames on one file system, noting
    each move in ``moves``; decision.json last. champion.json, written after, seals it."""
    retired.mkdir()
    for name in SWAPPED:
        if (root / name).exists():
            os.replace(root / name, retired / name)
            moves.append(("out", name))
    for name in SWAPPED:
        if (new / name).exists():
            os.replace(new / name, root / name)
            moves.append(("in", name))
