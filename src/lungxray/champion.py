"""Champion/challenger: compare the model in use with a new one on the same images, decide, promote.

The comparison is paired: both models' probabilities for the *same* images are resampled
together (a stratified bootstrap, as :func:`lungxray.metrics.bootstrap_indices` draws for the
evaluation CIs), and each resample's ROC AUC difference is computed: for two classes as
SciPy's Mann-Whitney U over the number of pairs (the area ``roc_auc_score`` computes, for a
batch of resamples per call), for more as :func:`lungxray.metrics.roc_auc`. Pairing removes
the variation the two AUCs share, so a CI of the difference is far narrower than two separate
CIs would suggest.

The challenger is promoted only when the lower end of the CI of ``AUC(challenger) -
AUC(champion)`` lies above ``margin``: better by more than the margin with (default) 95%
confidence. Otherwise the champion is kept, and ``decision.json`` says why.

The champion folder (its pointer champion.json and one history entry per promotion) is read
through :mod:`lungxray.champion_store`; :mod:`lungxray.promotion` verifies a decision and
carries it out. A decision records who it belongs to: a SHA-256 of the challenger's model files,
the champion location and the champion it was compared with.
"""

from __future__ import annotations

import itertools
import json
import os
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import mannwhitneyu

from lungxray import champion_store as store
from lungxray import metrics, safeio, staging
from lungxray.artifacts import CHALLENGE_SECTION_FILE, trained_splits
from lungxray.champion_store import (  # noqa: F401 - the champion API, as before #34
    CARD_FILE,
    DECISION_FILE,
    RECORD_FILE,
    check_run_id,
    current,
    read_champion,
)
from lungxray.errors import ConfigError, DataError, ModelError, quote
from lungxray.limits import DEFAULT
from lungxray.schema import DEFAULTS

DEFAULT_N_BOOTSTRAP = 1000
CI_LEVEL = 0.95
_BATCH_CELLS = 4_000_000  # resampled scores held at once (32 MB of float64)
COMPATIBLE_KEYS = ("class_names", "image_size", "channels")


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


def _auc_rows(scores: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC AUC of each row of ``scores`` (one resample each, the same number of positives in
    every row): the Mann-Whitney U of the positives' scores over the negatives' divided by the
    number of pairs, ties counting one half, which is the area ``roc_auc_score`` computes."""
    rows, n_pos = len(scores), int(positive[0].sum())
    n_neg = scores.shape[1] - n_pos
    u = mannwhitneyu(scores[positive].reshape(rows, n_pos), scores[~positive].reshape(
        rows, n_neg), axis=1, method="asymptotic").statistic
    return u / (n_pos * n_neg)


def _resampled_differences(y: np.ndarray, champion: np.ndarray, challenger: np.ndarray,
                           n_bootstrap: int, seed: int) -> np.ndarray:
    """Challenger AUC - champion AUC on each stratified resample (the same rows for both).
    Binary: many resamples per scipy call (sklearn's per-call checks made 2000 resamples take
    seconds); more classes: evaluation's macro one-vs-rest AUC, one resample at a time."""
    resamples = metrics.bootstrap_indices(y, n_bootstrap, seed)
    if champion.shape[1] != 2:
        return np.array([metrics.roc_auc(y[idx], challenger[idx]) -
                         metrics.roc_auc(y[idx], champion[idx]) for idx in resamples])
    rows = max(1, _BATCH_CELLS // len(y))  # bounded memory for any number of images
    diffs = []
    while batch := list(itertools.islice(resamples, rows)):
        idx = np.stack(batch)
        positive = y[idx] == 1  # stratified: every row holds the same number of positives
        diffs.append(_auc_rows(challenger[:, 1][idx], positive) -
                     _auc_rows(champion[:, 1][idx], positive))
    return np.concatenate(diffs)


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
    diffs = _resampled_differences(y, champion, challenger, n_bootstrap, seed)
    tail = (1.0 - level) / 2 * 100
    lo, hi = np.percentile(diffs, [tail, 100 - tail])
    return {"metric": "roc_auc", "n": int(len(y)), "champion": auc_champion,
            "challenger": auc_challenger, "difference": auc_challenger - auc_champion,
            "ci": [float(lo), float(hi)], "ci_level": level,
            "p_not_better": float(np.mean(diffs <= 0.0)), "n_bootstrap": n_bootstrap,
            "seed": seed, "method": "paired stratified bootstrap of the ROC AUC difference"}


def check_margin(margin: float) -> None:
    """A promotion margin is an AUC difference in [0, 1) (NaN is refused too)."""
    if not 0.0 <= margin < 1.0:
        raise ConfigError(f"promotion margin must be in [0, 1), got {margin}")


def decide(comparison: dict[str, Any] | None, margin: float = 0.0) -> dict[str, str]:
    """{"decision": "promote" | "keep", "reason": ...}. Without a champion (None) the
    challenger is promoted; otherwise only when the CI's lower end exceeds ``margin``."""
    check_margin(margin)
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
                    evidence: dict[str, Any] | None = None, challenger_sha256: str | None = None,
                    champion_uri: str | Path | None = None) -> dict[str, Any]:
    """The content of ``decision.json``: the decision, its reason and the evidence.
    ``champion_state`` (:func:`current`) is who was compared with; ``evidence`` the
    comparisons on other splits, reported but not decided on. ``challenger_sha256``
    (:func:`lungxray.champion_store.model_sha256`) and ``champion_uri`` tie the decision to
    one model and one champion location: a promotion checks both."""
    check_run_id(run_id)
    verdict = decide(comparison, margin)

    def who(info: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if info is None else {k: info.get(k) for k in (
            "model_name", "threshold", "class_names", "image_size", "channels", "members")}

    return {**verdict, "run_id": run_id, "split": split or None, "margin": margin,
            "challenger": {**who(challenger), "sha256": challenger_sha256},
            "champion": who(champion), "comparison": comparison,
            "evidence": evidence or {}, "champion_state": champion_state,
            "champion_uri": store.identity(champion_uri) if champion_uri else None,
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
    from lungxray import integrity, model_loader
    from lungxray.model_loader import read_model_info

    check_run_id(run_id)
    check_margin(margin)
    challenger_info = read_model_info(Path(challenger_dir))
    # The data is checked even when there is nothing to compare on it yet: a wrong --data
    # must fail now, not at the first challenge that has a champion.
    manifest = integrity.read_manifest(Path(data_dir))
    if DECISION_SPLIT not in manifest["splits"]:
        raise DataError(f"{data_dir}: has no {DECISION_SPLIT} split to decide on")
    if not champion_uri:
        return {"decision": "skip", "reason": "no champion_uri given", "run_id": run_id,
                "margin": margin, "comparison": None, "evidence": {}}
    champion_uri = store.check_uri(str(champion_uri))
    owner = {"challenger_sha256": store.model_sha256(Path(challenger_dir)),
             "champion_uri": champion_uri}
    state = current(champion_uri)
    champion_dir = store.champion_model(champion_uri, state, cache_dir)
    if champion_dir is None:
        return decision_record(run_id, challenger_info, None, None, margin,
                               champion_state=state, **owner)
    champion_info = read_model_info(champion_dir)
    check_compatible(champion_info, challenger_info, where=f"champion {champion_uri}")
    predictors = [model_loader.load(d) for d in (champion_dir, challenger_dir)]
    compared: dict[str, Any] = {}
    # A split either model learnt from (a refit's test_shifted) is no evidence.
    learnt = trained_splits(challenger_info) | trained_splits(champion_info)
    for split in [DECISION_SPLIT, *(s for s in manifest["splits"] if s != DECISION_SPLIT)]:
        if split in learnt:
            continue
        images = integrity.load_checked_split(Path(data_dir), split, manifest)
        old, new = (p.predict(images.images)[0] for p in predictors)
        compared[split] = paired_bootstrap(images.labels, old, new, n_bootstrap, seed)
    return decision_record(run_id, challenger_info, champion_info, compared.pop(DECISION_SPLIT),
                           margin, split=DECISION_SPLIT, champion_state=state,
                           evidence=compared, **owner)


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


def run_challenge(challenger_dir: Path | str, data_dir: Path | str, champion_uri: str,
                  run_id: str, output: Path | str,
                  margin: float = DEFAULTS.promotion_margin, seed: int = DEFAULTS.seed,
                  cache_dir: Path | None = None,
                  model_card: Path | str | None = None) -> dict[str, Any]:
    """:func:`challenge`, then its outputs in ``output``: the section (champion.md), ``model_card``
    with the section appended (model_card.md, when a card is given) and decision.json. Built in
    a staging folder inside ``output`` and moved in file by file, the decision last: a stopped
    or failed run leaves the previous decision, never a part of one. Returns the record."""
    output = Path(output)
    # Read first (bounded, a regular file): a bad card fails before the bootstrap, not after.
    card = None if model_card is None else safeio.read_bounded(
        Path(model_card), "model card", DEFAULT.max_json_bytes, error=ConfigError).decode(
            "utf-8", errors="replace")
    with staging.staging_dir(output, ".challenge-", "lungxray challenge") as work:
        record = challenge(challenger_dir, data_dir, champion_uri, run_id, margin=margin,
                           seed=seed, cache_dir=cache_dir)
        section = markdown(record)
        names = [CHALLENGE_SECTION_FILE]
        (work / CHALLENGE_SECTION_FILE).write_text(section)
        if card is not None:
            (work / CARD_FILE).write_text(card.rstrip() + "\n\n" + section)
            names.append(CARD_FILE)
        write_decision(record, work)
        with staging.signals_blocked():  # never a new section beside an old decision
            for name in [*names, DECISION_FILE]:
                os.replace(work / name, output / name)
    return record


def scalar_metrics(record: dict[str, Any]) -> dict[str, float]:
    """``champion_<split>_roc_auc``, ``challenger_<split>_roc_auc`` and
    ``<split>_roc_auc_difference`` for every split compared, and ``promoted`` (1 or 0)."""
    out: dict[str, float] = {}
    for split, compared in {DECISION_SPLIT: record["comparison"], **record["evidence"]}.items():
        if compared:
            out[f"champion_{split}_roc_auc"] = compared["champion"]
            out[f"challenger_{split}_roc_auc"] = compared["challenger"]
            out[f"{split}_roc_auc_difference"] = compared["difference"]
    out["promoted"] = float(record["decision"] == "promote")
    return out


def write_decision(record: dict[str, Any], path: Path | str) -> Path:
    """``decision.json`` written to a temporary name and renamed: never half-written. ``path``
    is a folder (``<path>/decision.json``) or a ``.json`` file."""
    path = Path(path)
    if path.suffix != ".json":
        path = path / DECISION_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_text_atomic(path, json.dumps(record, indent=2) + "\n", fsync=True)
    return path
