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

import json
import os
import re
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import roc_auc_score

from lungxray import metrics, safeio
from lungxray.errors import ConfigError, DataError, ModelError, quote

DECISION_FILE = "decision.json"
RECORD_FILE = "champion.json"  # written last: which run's files are the current champion
MODEL_DIR = "model"
CARD_FILE = "model_card.md"
HISTORY_DIR = "history"
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
    summary = (f"AUC {comparison['challenger']:.4f} vs {comparison['champion']:.4f}, "
               f"difference {diff:+.4f}, {level} CI [{lo:+.4f}, {hi:+.4f}] on "
               f"{comparison['n']} paired images")
    if lo > margin:
        return {"decision": "promote",
                "reason": f"the challenger is better by more than the margin {margin:g} with "
                          f"{level} confidence: {summary}"}
    why = ("it is worse" if hi < 0 else "it is not better by more than the margin "
           f"{margin:g} with {level} confidence")
    return {"decision": "keep", "reason": f"the champion stays: {why} ({summary})"}


def decision_record(run_id: str, challenger: dict[str, Any], champion: dict[str, Any] | None,
                    comparison: dict[str, Any] | None, margin: float,
                    split: str = "") -> dict[str, Any]:
    """The content of ``decision.json``: the decision, its reason and the evidence."""
    check_run_id(run_id)
    verdict = decide(comparison, margin)

    def who(info: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if info is None else {k: info.get(k) for k in (
            "model_name", "threshold", "class_names", "image_size", "channels", "members")}

    return {**verdict, "run_id": run_id, "split": split or None, "margin": margin,
            "challenger": who(challenger), "champion": who(champion), "comparison": comparison,
            "decided_at": datetime.now(UTC).isoformat(timespec="seconds")}


def write_decision(record: dict[str, Any], path: Path | str) -> Path:
    """``decision.json`` written to a temporary name and renamed: never half-written. ``path``
    is a folder (``<path>/decision.json``) or a ``.json`` file."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / DECISION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, json.dumps(record, indent=2) + "\n")
    return path


def _write_atomic(path: Path, text: str) -> None:
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------- champion folder


def check_run_id(run_id: str) -> None:
    """A run id becomes a folder name under history/: no separators, no '..'."""
    if not RUN_ID.fullmatch(str(run_id)) or ".." in str(run_id):
        raise ConfigError(f"run id {quote(str(run_id))} must be 1-128 letters, digits, '.', "
                          f"'_' or '-', starting with a letter or digit")


def _local(champion_uri: str | Path) -> Path:
    if str(champion_uri).startswith("gs://"):
        raise ConfigError(f"{quote(str(champion_uri))}: promotion to gs:// is not implemented "
                          f"here yet (it needs object generation preconditions); use a local "
                          f"or mounted path")
    return Path(champion_uri)


def read_champion(champion_uri: str | Path) -> Path | None:
    """The current champion's ``model/`` folder, or None when ``champion_uri`` holds none yet
    (missing or empty). A folder that holds something else, or a half-promoted champion, is a
    ModelError naming it."""
    from lungxray.train import read_model_info

    root = _local(champion_uri)
    if not root.exists() or (root.is_dir() and not any(root.iterdir())):
        return None
    record_path = root / RECORD_FILE
    if not record_path.is_file():
        raise ModelError(f"{root}: not a champion folder (no {RECORD_FILE}); expected one "
                         f"written by promote, or an empty folder")
    try:
        record = json.loads(record_path.read_text())
        decision = json.loads((root / DECISION_FILE).read_text())
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


def promote(model_dir: Path | str, champion_uri: str | Path, record: dict[str, Any],
            model_card: Path | str | None = None) -> Path:
    """Copy ``model_dir``, its model card and ``record`` (decision.json) into ``champion_uri``
    and into ``champion_uri/history/<run id>/``. Refuses a run id already in the history and a
    model folder without a model. Returns the history entry."""
    from lungxray.train import read_model_info

    run_id = str(record.get("run_id", ""))
    check_run_id(run_id)
    if record.get("decision") != "promote":
        raise ConfigError(f"decision of run {run_id} is {quote(str(record.get('decision')))}, "
                          f"not 'promote'")
    model_dir, root = Path(model_dir), _local(champion_uri)
    try:
        read_model_info(model_dir)
    except (OSError, ValueError) as err:
        raise ModelError(f"{model_dir}: not a model folder ({quote(str(err))})") from err
    read_champion(root)  # refuses a folder that is not a champion's before touching it
    entry = root / HISTORY_DIR / run_id
    if entry.exists():
        raise ConfigError(f"{entry}: run {run_id} was already promoted")
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".promote-{run_id}-", dir=root))
    moves: list[tuple[str, str]] = []  # what the swap did so far, to undo it on failure
    created = done = False
    try:
        _stage(staging / "entry", model_dir, record, model_card)
        os.replace(staging / "entry", entry)  # complete or absent
        created = True
        # Hard links: history and current files are never modified in place, only replaced,
        # so they may share their bytes (a model is hundreds of MB).
        shutil.copytree(entry, staging / "current", symlinks=False, copy_function=_link)
        _swap(root, staging / "current", staging / "retired", moves)
        _write_atomic(root / RECORD_FILE, json.dumps(
            {"run_id": run_id, "history": f"{HISTORY_DIR}/{run_id}",
             "model_name": (record.get("challenger") or {}).get("model_name"),
             "promoted_at": datetime.now(UTC).isoformat(timespec="seconds")}, indent=2) + "\n")
        done = True
    finally:
        if not done:  # put the previous champion back and forget this run, so it may retry
            _undo(root, staging / "retired", moves)
            if created:
                shutil.rmtree(entry, ignore_errors=True)
        shutil.rmtree(staging, ignore_errors=True)
    return entry


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
