"""Measure on held-out shift, ship on everything: the pick trained again with the carved
clusters back in.

The shift proxy ``test_shifted`` holds whole clusters of atypical images out of training, so
that the choice of model, ensemble, threshold rule and hyperparameters is measured on images
unlike the ones learnt from. The shipped model needs those images most (on the official train
split the carve held 36% of the minority class; issue 33 measured 0.02 AUC and 0.06 accuracy lost
on the hidden official test). :func:`refit` trains the chosen model again — the same network,
hyperparameters, epochs plan, weights, batch size and seed, each ensemble member in turn — on
``train`` + ``test_shifted``; validation still stops early and sets the threshold by the pick's
own rule, the random ``test`` and any held-out site stay unseen. The pick (as measured) and the
refit are then both scored on the splits neither trained on, and :func:`section_markdown` says
so beside the report's proxy estimates: ``test_shifted`` numbers are the measured pick's, the
refit cannot be scored there.
"""

from __future__ import annotations

import html
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import (
    artifacts,
    evaluate,
    integrity,
    metrics,
    model_loader,
    prevalence,
    safeio,
    schema,
    shift,
    site_metrics,
    sites,
    staging,
    train,
)
from lungxray.errors import ConfigError, ModelError, quote
from lungxray.limits import DEFAULT

ADDED_SPLITS = (shift.SPLIT,)  # what a refit trains on beside train
REFIT_KEY = "refit"  # model_info.json: what the refit added, and the measured pick's numbers
# report.html, report.md and the model card, in that order.
ReportFiles = tuple[Path, Path, Path]
ROW_METRICS = ("roc_auc", "accuracy", "balanced_accuracy", "sensitivity", "specificity")


def _rule_of(info: dict) -> tuple[str, float | None]:
    """(threshold_rule, target_sensitivity) the way ``info``'s threshold was chosen."""
    target = artifacts.target_sensitivity_of(info)
    method = str(info.get("threshold_method") or artifacts.DEFAULT_THRESHOLD_RULE)
    rule = method if method in artifacts.THRESHOLD_RULES else artifacts.DEFAULT_THRESHOLD_RULE
    return rule, target


def _members(pick_dir: Path, info: dict) -> dict[str, dict]:
    """{name: model_info} of the pick's networks: itself, or each ensemble member."""
    if not info.get("ensemble"):
        return {str(info["model_name"]): info}
    found = {}
    for name in info.get("members") or []:
        safeio.check_dir_name(str(name))
        found[str(name)] = model_loader.read_model_info(pick_dir / artifacts.MEMBERS_DIR / name)
    if len(found) < 2:
        raise ModelError(f"{quote(str(pick_dir))}: an ensemble with fewer than 2 members")
    return found


REQUIRED = ("model_name", "batch_size", "seed", "data_sha256")  # what a refit repeats


def _check_same_data(pick_dir: Path, member_infos: dict[str, dict], manifest: dict) -> None:
    """Each network's info says how to train it again, on this very dataset (its train and
    val digests are the manifest's): else a one-line error before anything is written."""
    for name, info in member_infos.items():
        missing = [k for k in REQUIRED if info.get(k) is None]
        if missing:
            raise ModelError(f"{quote(str(pick_dir))}: {name}'s model_info.json lacks "
                             f"{', '.join(missing)}; it cannot be trained again")
        digests = info["data_sha256"] if isinstance(info["data_sha256"], dict) else {}
        for split in ("train", "val"):
            if digests.get(split) != manifest["splits"][split]["sha256"]:
                raise ConfigError(f"{quote(str(pick_dir))}: {name} was trained on another "
                                  f"dataset (its {split} split differs from this one's)")


def _ensemble_info(pick: dict, output: Path, data_dir: Path, manifest: dict,
                   member_infos: dict[str, dict]) -> dict:
    """The pick's ensemble info with the threshold, each site's and the calibration chosen
    again on the refit members' mean validation probabilities, by the ensemble's own rule
    (``worst_group`` on the groups train and evaluate use)."""
    val = integrity.load_checked_split(data_dir, "val", manifest)
    probs = np.mean([model_loader.load(output / artifacts.MEMBERS_DIR / name)
                     .predict(val.images)[0] for name in member_infos], axis=0)
    rule, target = _rule_of(pick)
    info = dict(pick)
    if probs.shape[1] == 2:
        val_sites = site_metrics.site_rows(manifest, "val", "data")
        groups = (shift.val_groups(val.images, val_sites)
                  if rule == "worst_group" and target is None else None)
        info["threshold"], info["threshold_method"] = metrics.operating_threshold(
            val.labels, probs[:, 1], rule, target, groups)
        info[site_metrics.SITE_THRESHOLDS] = site_metrics.site_thresholds(
            val.labels, probs[:, 1], val_sites, rule, target, groups)
        fitted = prevalence.calibration_or_none(val.labels, probs[:, 1], "refit ensemble's val")
        info["calibration"] = fitted.as_dict() if fitted else None
    info["train_seconds"] = round(sum(float(i.get("train_seconds") or 0)
                                      for i in member_infos.values()), 2)
    return info


def refit(data_dir: Path, pick_dir: Path, output: Path, enabled: bool = True,
          epochs: int = schema.DEFAULTS.epochs, cache_dir: Path | None = None,
          external: str | None = None, external_class_map: str | None = None) -> dict:
    """Write the shipped model into ``output``: the pick in ``pick_dir`` trained again on train +
    the carved splits (:data:`ADDED_SPLITS`) with its own settings and ``epochs``, or a copy of
    the pick when ``enabled`` is off or nothing was carved. Returns what the model info's
    ``refit`` block records: the splits added, and each of the pick and the refit scored on the
    splits they did not train on (plus ``external``, another labelled source)."""
    data_dir, pick_dir, output = Path(data_dir), Path(pick_dir), Path(output)
    pick = model_loader.read_model_info(pick_dir)
    member_infos = _members(pick_dir, pick)
    manifest = integrity.read_manifest(data_dir)
    _check_same_data(pick_dir, member_infos, manifest)
    added = {s: int(manifest["splits"][s]["n"]) for s in ADDED_SPLITS if s in manifest["splits"]}
    reason = ("refit is off" if not enabled else
              None if added else f"the dataset has no {', '.join(ADDED_SPLITS)} split to add")
    if reason:
        safeio.copy_model_folder(pick_dir, output)
        return {"refit": False, "reason": reason}
    ensemble = bool(pick.get("ensemble"))
    refit_infos = {}
    for name, info in member_infos.items():
        rule, target = _rule_of(info)
        dest = output / artifacts.MEMBERS_DIR / name if ensemble else output
        refit_infos[name] = train.train(
            data_dir, str(info["model_name"]), dest, hparams=info.get("hparams") or None,
            epochs=epochs, weights=str(info.get("weights") or "none"),
            batch_size=int(info["batch_size"]),
            seed=int(info["seed"]), target_sensitivity=target, threshold_rule=rule,
            cache_dir=cache_dir, train_splits=("train", *added))
    held = [s for s in evaluate.dataset_splits(data_dir) if s not in {"train", *added}]
    record: dict[str, Any] = {
        "refit": True, "added_splits": added, "epochs": epochs,
        "train_images": next(iter(refit_infos.values()))["train_images"],
        "measured": {"model_name": pick["model_name"], "threshold": pick.get("threshold"),
                     "threshold_method": pick.get("threshold_method")},
    }
    if ensemble:
        shipped = _ensemble_info(pick, output, data_dir, manifest, refit_infos)
        _write_info(output, shipped, record, ensemble)  # loadable, so it can be scored
    else:
        shipped = model_loader.read_model_info(output)
    record["threshold"] = shipped.get("threshold")
    with tempfile.TemporaryDirectory() as work:
        record["scores"] = {
            "measured": _score(pick_dir, data_dir, [*held, *added], Path(work) / "pick",
                               external, external_class_map, cache_dir),
            "refit": _score(output, data_dir, held, Path(work) / "refit", external,
                            external_class_map, cache_dir)}
    _write_info(output, shipped, record, ensemble)
    return record


def _score(model_dir: Path, data_dir: Path, splits: list[str], work: Path,
           external: str | None, external_class_map: str | None,
           cache_dir: Path | None) -> dict[str, dict]:
    """{split: {metric: value}} of ``model_dir`` at its own threshold, per site too."""
    results = evaluate.evaluate(model_dir, str(data_dir), work, splits=splits, explain=False,
                                cache_dir=cache_dir, external=external or None,
                                external_class_map=external_class_map or None)
    scored = {}
    for split, result in results.items():
        scored[split] = {k: result.get(k) for k in ROW_METRICS}
        for site, block in (result.get(site_metrics.PER_SITE) or {}).items():
            row = {k: block.get(k) for k in ROW_METRICS}
            if row["sensitivity"] is not None and row["specificity"] is not None:
                row["balanced_accuracy"] = (row["sensitivity"] + row["specificity"]) / 2
            scored[f"{split} ({site})"] = row
    return scored


def _write_info(output: Path, info: dict, record: dict, ensemble: bool) -> None:
    """model_info.json (and an ensemble's ensemble.json) with the refit block, written last."""
    text = json.dumps({**info, REFIT_KEY: record}, indent=2) + "\n"
    if ensemble:
        safeio.write_text_atomic(output / artifacts.ENSEMBLE_FILE, text)
    safeio.write_text_atomic(output / artifacts.INFO_FILE, text)


def score_table(record: dict) -> pd.DataFrame:
    """One row per split: the measured pick's and the refit's AUC, balanced accuracy and
    accuracy at their own thresholds, as text ("—" where not scored)."""
    rows = []
    for split, measured in record.get("scores", {}).get("measured", {}).items():
        refitted = record["scores"]["refit"].get(split, {})
        row = {"split": split}
        for key, label in (("roc_auc", "AUC"), ("balanced_accuracy", "bal. acc"),
                           ("accuracy", "acc")):
            row[f"measured {label}"] = _num(measured.get(key))
            row[f"refit {label}"] = _num(refitted.get(key))
        rows.append(row)
    return pd.DataFrame(rows)


def _explanation(record: dict) -> str:
    """One paragraph: what was refit on what, or why nothing was."""
    if not record.get("refit"):
        return (f"No refit ({record.get('reason')}): the shipped model is the pick as "
                f"measured above.")
    added = ", ".join(f"`{s}` ({n} images)" for s, n in record["added_splits"].items())
    return (f"The numbers above are the pick as measured: its `{shift.SPLIT}` scores are the "
            f"proxy estimate of how the choice holds off the training distribution. The "
            f"shipped model is that pick trained again on train + {added} "
            f"({record['train_images']} images, {record['epochs']} epochs planned, the same "
            f"settings and seed; validation still stops early and sets the threshold: "
            f"{_num(record['threshold'])} against the measured "
            f"{_num(record['measured']['threshold'])}). Both are scored below on the splits "
            f"neither trained on (a held-out site is `{sites.HOLDOUT_PREFIX}<name>`); the "
            f"refit has no `{shift.SPLIT}` score: it learnt those images.")


def _num(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def section_markdown(record: dict) -> str:
    """The report's and model card's section on the refit (or on why there was none)."""
    text = f"\n## {artifacts.REFIT_SECTION_TITLE}\n\n{_explanation(record)}\n"
    if record.get("refit"):
        text += "\n" + score_table(record).to_markdown(index=False) + "\n"
    return text


def section_html(record: dict) -> str:
    """:func:`section_markdown` as an HTML fragment for report.html."""
    parts = [f"<h2>{html.escape(artifacts.REFIT_SECTION_TITLE)}</h2>",
             f"<p>{html.escape(_explanation(record))}</p>"]
    if record.get("refit"):
        parts.append(score_table(record).to_html(index=False, border=0))
    return "\n".join(parts) + "\n"


def run(data_dir: Path, pick_dir: Path, reports_in: ReportFiles, model_out: Path,
        reports_out: ReportFiles, **options: Any) -> dict:
    """compare's outputs in, the shipped model and the reports with its section out: the
    reports are read (bounded) before any training, then :func:`refit` (``options``), then
    each report written whole with :func:`section_markdown` / :func:`section_html` added."""
    texts = [safeio.read_bounded(Path(p), what, DEFAULT.max_csv_bytes, error=ModelError)
             .decode("utf-8", errors="replace")
             for p, what in zip(reports_in, ("report", "summary", "model card"), strict=True)]
    record = refit(data_dir, pick_dir, model_out, **options)
    html_text, summary, card = texts
    at = html_text.rfind("</body>")
    at = len(html_text) if at < 0 else at
    html_text = html_text[:at] + section_html(record) + html_text[at:]
    section = section_markdown(record)
    for path, text in zip(reports_out, (html_text, summary + section, card + section),
                          strict=True):
        safeio.write_text_atomic(Path(path), text)
    return record


def refit_compare_output(data_dir: Path, compare_dir: Path, output: Path,
                         **options: Any) -> dict:
    """``lungxray refit``: a `lungxray compare` output in, the same layout out (best_model/,
    report.html, report.md, model_card.md), built in a staging folder and published whole."""
    compare_dir, output = Path(compare_dir), Path(output)
    names = (artifacts.REPORT_HTML, artifacts.REPORT_MD, artifacts.MODEL_CARD_FILE)
    staging.check_replaceable(output, names)
    model_loader.open_folder(compare_dir / artifacts.BEST_MODEL_DIR)  # checked before training
    with staging.staging_dir(output.parent, f".{output.name[:100]}.build-",
                             "lungxray refit") as build:
        record = run(data_dir, compare_dir / artifacts.BEST_MODEL_DIR,
                     tuple(compare_dir / n for n in names), build / artifacts.BEST_MODEL_DIR,
                     tuple(build / n for n in names), **options)
        staging.publish(build, output, names)
    return record


def scalar_metrics(record: dict) -> dict[str, float]:
    """For the Kubeflow UI: ``refit`` (1/0), ``refit_added_images`` and, per scored split,
    ``measured_<split>_roc_auc`` and ``refit_<split>_roc_auc`` (pooled splits only)."""
    out = {"refit": float(bool(record.get("refit"))),
           "refit_added_images": float(sum((record.get("added_splits") or {}).values()))}
    for who, scores in (record.get("scores") or {}).items():
        for split, values in scores.items():
            if " " not in split and values.get("roc_auc") is not None:
                out[f"{who}_{split}_roc_auc"] = float(values["roc_auc"])
    return out
