"""Render the model comparison: ``report.html``, ``report.md``, ``results.csv``/``.md`` and the
model card, around the choice :mod:`lungxray.selection` makes.

:func:`compare` reads the trial dirs, lets :func:`lungxray.selection.select` rank them (an
ensemble of the top k included) on a validation metric, and writes into one folder:
``results.csv``, ``results.md`` (full table), ``report.md`` and a self-contained ``report.html``
(headline metrics with 95% CIs, charts, per-model plots), ``model_card.md``, ``summary.json``,
``ensemble/<split>/`` (the ensemble candidate's evaluation) and ``best_model/`` (the winner as a
model folder). The folder is built aside and published whole (:mod:`lungxray.staging`).
"""

from __future__ import annotations

import html
import json
import math
import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray import fold_report, pages, shift, site_report, staging
from lungxray.artifacts import (
    BAR_METRICS,
    BEST_MODEL_DIR,
    CURVES_FILE,
    DEFAULT_ENSEMBLE_K,
    DEFAULT_SELECT_METRIC,
    DEFAULT_THRESHOLD_RULE,
    ENSEMBLE_EVAL_DIR,
    HEADLINE_METRICS,
    LOWER_IS_BETTER,
    METRICS,
    MODEL_CARD_FILE,
    REPORT_HTML,
    REPORT_MARKERS,
    REPORT_MD,
    RESULTS_CSV,
    RESULTS_MD,
    SPLIT_PLOTS,
    SUMMARY_FILE,
    Ensemble,
    Trial,
    split_order,
)
from lungxray.ensemble import write_ensemble_eval
from lungxray.modelcard import model_card, tie_text
from lungxray.plots import (
    img_tag,
    plot_confusion_matrix,
    plot_history,
    plot_history_grid,
    plot_metric_bars,
    plot_pr,
    plot_reliability,
    plot_robustness_overlay,
    plot_roc,
    plot_roc_overlay,
    png_base64,
)
from lungxray.selection import (
    SELECT_SPLIT,
    Selection,
    check_options,
    load_trial,
    save_best_model,
    select,
)

TITLE = "lungxray model comparison"


# --------------------------------------------------------------------------- orchestration


def compare(trial_dirs: list[Path], output: Path, select_metric: str = DEFAULT_SELECT_METRIC,
            ensemble_k: int = DEFAULT_ENSEMBLE_K, target_sensitivity: float | None = None,
            threshold_rule: str = DEFAULT_THRESHOLD_RULE) -> dict:
    """Compare trials (plus an ensemble of the top ``ensemble_k``), pick the best on a
    validation metric, write the report; return the summary.

    ``target_sensitivity`` sets how the ensemble's threshold is chosen on validation (default:
    as its members' were, else ``threshold_rule``). Everything is loaded and validated before
    anything is written, and the report is assembled in a sibling temp dir that replaces
    ``output`` only when complete, so a failure never leaves a half-written report behind.
    """
    check_options(select_metric, trial_dirs, target_sensitivity, threshold_rule)
    output = Path(output)
    staging.check_replaceable(output, REPORT_MARKERS)
    chosen = select([load_trial(Path(d)) for d in trial_dirs], select_metric, ensemble_k,
                    target_sensitivity, threshold_rule)
    # Built in a locked sibling folder, removed on errors, SIGTERM and SIGINT; one left by a
    # SIGKILLed run is swept here by the next run on the same output.
    with staging.staging_dir(output.parent, f".{output.name[:100]}.build-",
                             "lungxray compare") as build:
        _write_report(build, chosen)
        staging.publish(build, output, REPORT_MARKERS)
    return chosen.summary


def _write_report(build: Path, chosen: Selection) -> None:
    if chosen.ensemble is not None:
        write_ensemble_eval(chosen.ensemble, build / ENSEMBLE_EVAL_DIR)
    ranked, summary = chosen.ranked, chosen.summary
    ranked.to_csv(build / RESULTS_CSV, index=False)
    (build / RESULTS_MD).write_text(to_markdown(ranked))
    charts = _charts(build, chosen)
    save_best_model(chosen, build / BEST_MODEL_DIR)
    with tempfile.TemporaryDirectory(dir=build) as scratch:
        images = {t.model_name: _trial_images(t, Path(scratch)) for t in chosen.candidates}
    page = _report_html(summary, ranked, chosen.candidates, images, charts, chosen.best)
    (build / REPORT_MD).write_text(report_markdown(summary, ranked, chosen.candidates,
                                                   chosen.best))
    (build / MODEL_CARD_FILE).write_text(model_card(chosen.best, summary))
    (build / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n")
    (build / REPORT_HTML).write_text(page, encoding="utf-8")


# --------------------------------------------------------------------------- charts and images


def _bar_columns(table: pd.DataFrame, select_metric: str) -> list[str]:
    """The selection score next to the held-out test scores (validation ones if no test)."""
    for split in ("test", SELECT_SPLIT):
        cols = [f"{split}_{m}" for m in BAR_METRICS
                if f"{split}_{m}" in table.columns and table[f"{split}_{m}"].notna().any()]
        if cols:
            return list(dict.fromkeys([select_metric, *cols]))
    return [select_metric]


def _charts(build: Path, chosen: Selection) -> dict[str, str]:
    """The cross-model figures, written into the report dir; returns them as base64."""
    ranked, metric = chosen.ranked, chosen.summary["select_metric"]
    paths = {"bars": plot_metric_bars(
        ranked, _bar_columns(ranked, metric), build / "metrics_bars.png",
        title=f"Model comparison with 95% CIs (selection on {metric})")}
    classes = chosen.trials[0].class_names
    for split in chosen.splits:
        having = [t for t in chosen.candidates if split in t.splits]
        curves = {t.model_name: _split_arrays(t, split) for t in having}
        thresholds = {t.model_name: t.model_info.get("threshold") for t in having}
        paths[f"roc_{split}"] = plot_roc_overlay(curves, classes, build / f"roc_{split}.png",
                                                 thresholds, title=f"ROC on {split}")
    for split in chosen.splits:
        robust = {t.model_name: t.splits[split].metrics["robustness"]
                  for t in chosen.candidates if split in t.splits
                  and t.splits[split].metrics.get("robustness")}
        if robust:
            paths[f"robust_{split}"] = plot_robustness_overlay(
                robust, build / f"robustness_{split}.png",
                title=f"ROC AUC under acquisition shift on {split} (mean over severities)")
    histories = {t.model_name: (t.history, t.phases) for t in chosen.trials
                 if t.history is not None}
    if histories:
        paths["curves"] = plot_history_grid(histories, build / "training_curves.png")
    return {k: png_base64(Path(p)) for k, p in paths.items()}


def _image(path: Path | None, redraw: Any, scratch: Path) -> str:
    """The trial's own PNG if valid, else redraw it from the raw data into scratch."""
    found = png_base64(path)
    if found is not None:
        return found
    out = redraw(scratch / f"{uuid.uuid4().hex}.png")
    return png_base64(Path(out))


def _split_arrays(trial: Trial, split: str) -> tuple[np.ndarray, np.ndarray]:
    preds = trial.splits[split].predictions
    return preds["y_true"].to_numpy(), preds[[f"prob_{c}" for c in trial.class_names]].to_numpy()


def _trial_images(trial: Trial, scratch: Path) -> dict[str, Any]:
    """Base64 PNGs of one candidate: its training curves and each split's plots. Missing or
    broken plots are redrawn from metrics.json/predictions.csv, except Grad-CAM (it needs the
    model), which is shown only when evaluate drew it."""
    name, classes = trial.model_name, trial.class_names
    images: dict[str, Any] = {"curves": None, "splits": {}}
    if trial.history is not None:
        curves = partial(plot_history, trial.history, trial.phases, title=f"{name} training")
        saved = Path(trial.model_dir) / CURVES_FILE if trial.model_dir is not None else None
        images["curves"] = _image(saved, curves, scratch)
    for split, data in trial.splits.items():
        m = data.metrics
        y, probs = _split_arrays(trial, split)
        title = f"{name} — {split}"
        redraw = {
            "confusion_matrix": partial(_redraw_cm, m, classes, title=title),
            "roc": partial(plot_roc, y, probs, classes, threshold=m.get("threshold"),
                           title=f"{title} ROC"),
            "pr": partial(plot_pr, y, probs, classes, threshold=m.get("threshold"), title=title),
            "reliability": partial(plot_reliability, y, probs, classes, title=title),
        }
        directory = Path(data.dir) if data.dir is not None else None
        shown = {}
        for key in SPLIT_PLOTS:
            path = directory / f"{key}.png" if directory is not None else None
            if key in redraw:
                shown[key] = _image(path, redraw[key], scratch)
            elif (found := png_base64(path)) is not None:
                shown[key] = found
        images["splits"][split] = shown
    return images


def _redraw_cm(metrics: dict, classes: list[str], path: Path, title: str) -> Path:
    return plot_confusion_matrix(metrics["confusion_matrix"], classes, path, title)


# --------------------------------------------------------------------------- tables


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float | np.floating):
        return format(float(value), spec)
    return str(value)


def _spec(col: str) -> str:
    if col.startswith("hp_"):
        return "g"
    return {"train_seconds": ".1f", "size_mb": ".1f", "latency_ms": ".2f"}.get(col, ".4f")


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for humans: scores to 4 decimals, hparams in general format (1e-05 stays
    readable instead of rounding to 0.0000), missing values as a dash."""
    shown = pd.DataFrame(index=df.index)
    for col in df.columns:
        spec = _spec(col)
        shown[col] = [_fmt(v, spec) for v in df[col].astype(object)]
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table of ``display_table(df)`` (pandas through tabulate)."""
    shown = display_table(df).map(lambda v: v.replace("|", "\\|"))  # a | would split a cell
    # disable_numparse keeps our formatting instead of tabulate re-formatting numeric strings.
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def _with_ci(row: pd.Series, col: str) -> str:
    """``0.9123 [0.8801, 0.9402]`` from a table row's value and CI columns."""
    value = row.get(col)
    text = _fmt(None if value is None or pd.isna(value) else float(value))
    lo, hi = row.get(f"{col}_ci_lo"), row.get(f"{col}_ci_hi")
    if text != "—" and lo is not None and hi is not None and not (pd.isna(lo) or pd.isna(hi)):
        text += f" [{float(lo):.4f}, {float(hi):.4f}]"
    return text


def headline_table(ranked: pd.DataFrame, split: str) -> pd.DataFrame:
    """Rank, model and the headline metrics of ``split`` with their 95% CIs, as strings."""
    cols = [m for m in HEADLINE_METRICS if f"{split}_{m}" in ranked.columns]
    rows = []
    for _, row in ranked.iterrows():
        if pd.isna(row.get(f"{split}_n", np.nan)):
            continue  # this candidate was not evaluated on the split
        out = {"rank": str(row["rank"]), "model": str(row["model_name"]),
               "threshold": _fmt(row.get(f"{split}_threshold"))}
        out.update({METRICS[m].short: _with_ci(row, f"{split}_{m}") for m in cols})
        rows.append(out)
    return pd.DataFrame(rows)


def facts_table(ranked: pd.DataFrame) -> pd.DataFrame:
    """Size, speed and training cost per candidate, as strings."""
    rows = []
    for _, row in ranked.iterrows():
        device = row.get("latency_device")
        latency = _fmt(row.get("latency_ms"), ".2f")
        rows.append({
            "rank": str(row["rank"]), "model": str(row["model_name"]),
            "members": str(row.get("members") or "—"), "weights": _fmt(row.get("weights")),
            "parameters": _fmt(None if pd.isna(row.get("params")) else int(row["params"])),
            "size MB": _fmt(row.get("size_mb"), ".1f"),
            "training s": _fmt(row.get("train_seconds"), ".1f"),
            "latency ms/image": latency + (f" ({device})" if isinstance(device, str) else ""),
        })
    return pd.DataFrame(rows)



# --------------------------------------------------------------------------- pages

ROBUSTNESS_NOTE = (
    "robust AUC: the mean ROC AUC over 11 simulated acquisition shifts (exposure, contrast, "
    "gamma, noise, blur, JPEG, pixelation, lower resolution, zoom-out, crop, rotation) at 3 "
    "severities each, in MedMNIST-C's categories (Di Salvo et al., 2024), on a seeded "
    "stratified subset of each split; AUC drop: clean minus robust AUC on that subset. "
    "Simulated shifts are evidence of fragility, not a substitute for data from another site.")
NOT_A_DEVICE = ("Research software, not a medical device: not for diagnosis, triage or any "
                "clinical decision.")


def _ensemble_text(summary: dict[str, Any]) -> str:
    ens = summary.get("ensemble") or {}
    if ens.get("model_name"):
        how = {"balanced": "threshold 0.5 (the balanced rule)",
               "platt": "threshold where its posterior, Platt-calibrated on its own validation "
                        "predictions, is 0.5",
               "worst_group": "threshold with the highest lowest balanced accuracy over its "
                              "own validation predictions' groups (the worst-group rule)"}.get(
            ens.get("threshold_method"), "threshold chosen on its own validation predictions")
        return (f"Ensemble candidate {ens['model_name']}: mean probability of "
                f"{', '.join(ens['members'])} (top {len(ens['members'])} on "
                f"{summary['select_metric']}), {how}. Its members were picked on validation, "
                "so its validation score is slightly optimistic.")
    return f"No ensemble candidate: {ens.get('skipped', 'not requested')}."



def _chosen_on(select_metric: str) -> str:
    where = ("the shift folds' out-of-fold predictions"
             if select_metric.startswith(f"{fold_report.SPLIT}_") else "validation")
    return f"chosen on {where}, never on test"


def _summary_html(summary: dict[str, Any], ranked: pd.DataFrame) -> str:
    best, metric = summary["best_model"], summary["select_metric"]
    direction = "lowest" if metric.split("_", 1)[1] in LOWER_IS_BETTER else "highest"
    held_out = [
        f"{html.escape(col)} = {_fmt(summary['best_model_scores'][col])}"
        for col in summary["best_model_scores"] if col != metric
    ]
    ranking = "".join(
        f"<li>{html.escape(str(r['model_name']))}: {_fmt(r['value'])}</li>"
        for r in summary["ranking"]
    )
    parts = [
        '<section class="best"><h2>Summary</h2>',
        f"<p><b>Best model: {html.escape(best)}</b>, selected by the {direction} "
        f"<code>{html.escape(metric)}</code> = {_fmt(summary['select_value'])} "
        f"({html.escape(_chosen_on(metric))}).</p>",
        "<p>The test split plays no part in the choice; its numbers are the unbiased estimate of "
        "how the chosen model performs on unseen data.</p>",
    ]
    if tie_text(summary):
        parts.append(f"<p>{html.escape(tie_text(summary))}</p>")
    if held_out:
        parts.append(f"<p>Best model on the other splits: {'; '.join(held_out)}.</p>")
    parts.append(f"<p>Ranking on <code>{html.escape(metric)}</code>:</p><ol>{ranking}</ol>")
    parts.append(f"<p>{len(ranked)} models compared. {html.escape(_ensemble_text(summary))}"
                 "</p></section>")
    return "\n".join(parts)


def _model_html(trial: Trial, images: dict[str, Any]) -> str:
    info = trial.model_info
    name = str(info["model_name"])
    facts = ", ".join(
        f"{html.escape(k)}: {html.escape(_fmt(info.get(k)))}"
        for k in ("weights", "params", "epochs", "train_seconds", "threshold", "threshold_method",
                  "image_size", "input_size", "channels")
        if k in info
    )
    hps = html.escape(json.dumps(info.get("hparams") or {}, sort_keys=True))
    parts = [f'<section><h3 id="model-{html.escape(name)}">{html.escape(name)}</h3>',
             f"<p>{facts}</p>"]
    if isinstance(trial, Ensemble):
        parts.append(f"<p>members: {html.escape(', '.join(trial.members))}</p>")
    else:
        parts.append(f"<p>hparams: <code>{hps}</code></p>")
    if images["curves"]:
        parts.append(img_tag(images["curves"], f"{name} training curves"))
    parts.append('<div class="splits">')
    for split, imgs in images["splits"].items():
        tags = "".join(img_tag(imgs[k], f"{name} {split} {k.replace('_', ' ')}")
                       for k in SPLIT_PLOTS if k in imgs)
        parts.append(f"<div><h4>{html.escape(split)}</h4>{tags}</div>")
    parts.append("</div></section>")
    return "\n".join(parts)


def _splits(trials: list[Trial]) -> list[str]:
    return sorted({s for t in trials for s in t.splits}, key=split_order)


def _split_n(trials: list[Trial], split: str) -> int | None:
    for t in trials:
        if split in t.splits:
            return int(t.splits[split].metrics["n"])
    return None


def _split_title(split: str, trials: list[Trial]) -> str:
    role = {"val": "validation: selection happens here",
            "test": "test: held out, the unbiased estimate",
            shift.SPLIT: "shift proxy: whole clusters of atypical images held out of training; "
                         "breaks ties on validation, then the pick's refit learns from it",
            fold_report.SPLIT: "shift folds: every image of train + test_shifted predicted by the "
                         "model's recipe trained on the other image-statistics folds; breaks "
                         "ties first"}.get(
        split, site_report.split_role(split) or "external / other data")
    return f"{split} (n={_split_n(trials, split)}; {role})"


def _ci_note(trials: list[Trial]) -> str:
    m = next(iter(trials[0].splits.values())).metrics
    return (f"Values at each model's decision threshold (chosen on validation) with 95% "
            f"{m.get('ci_method', 'bootstrap')} confidence intervals "
            f"({m.get('n_bootstrap', '?')} resamples, seed {m.get('bootstrap_seed', '?')}). "
            "Brier and ECE: lower is better.")


def _report_html(
    summary: dict[str, Any], ranked: pd.DataFrame, trials: list[Trial],
    images: dict[str, dict[str, Any]], charts: dict[str, str], best: Trial | None = None,
) -> str:
    order = {str(n): i for i, n in enumerate(ranked["model_name"])}
    models = "\n".join(
        _model_html(t, images[t.model_name])
        for t in sorted(trials, key=lambda t: order[t.model_name])
    )
    splits = _splits(trials)
    headline = [f"<h3>{html.escape(_split_title(s, trials))}</h3>"
                f'<div class="scroll">{headline_table(ranked, s).to_html(index=False)}</div>'
                for s in splits]
    rocs = [img_tag(charts[f"roc_{s}"], f"ROC curves of all models on {s}") for s in splits
            if f"roc_{s}" in charts]
    full = display_table(ranked).to_html(index=False, escape=True)
    order = [str(n) for n in ranked["model_name"]]
    robust = [img_tag(charts[f"robust_{s}"], f"AUC under corruption of all models on {s}")
              for s in splits if f"robust_{s}" in charts] or [
        "<p>Not measured: the evaluations ran without the corruption suite.</p>"]
    return pages.page(TITLE, [
        f"<h1>{TITLE}</h1>",
        f'<p class="warn">{html.escape(NOT_A_DEVICE)}</p>',
        _summary_html(summary, ranked),
        *(f"<p>{html.escape(line)}</p>" for line in (site_report.pick_lines(best) if best
                                                      else [])),
        "<h2>Headline metrics</h2>",
        f'<p class="note">{html.escape(_ci_note(trials))}</p>',
        *headline,
        *site_report.comparison_html(trials, splits, order),
        *_folds_html(trials, order),
        "<h2>Size, speed and cost</h2>",
        f'<div class="scroll">{facts_table(ranked).to_html(index=False)}</div>',
        '<p class="note">Latency: wall-clock model.predict time per image after a warm-up, on '
        "the device shown; an ensemble's is the sum of its members'.</p>",
        "<h2>Metric comparison</h2>",
        img_tag(charts["bars"], "metric comparison bar chart"),
        "<h2>ROC curves</h2>",
        *rocs,
        "<h2>Robustness to acquisition shift</h2>",
        f'<p class="note">{html.escape(ROBUSTNESS_NOTE)}</p>',
        *robust,
        "<h2>Training curves</h2>",
        img_tag(charts["curves"], "training curves of all models") if "curves" in charts else "",
        "<h2>Models</h2>",
        models,
        "<h2>All columns</h2>",
        f'<details><summary>full table (also results.csv)</summary><div class="scroll">{full}'
        "</div></details>",
        f'<p class="note">{html.escape(NOT_A_DEVICE)}</p>',
    ])


def _folds_html(trials: list[Trial], order: list[str]) -> list[str]:
    header, body = fold_report.table(trials, order)
    if not body:
        return []
    return ["<h2>Shift folds</h2>", f'<p class="note">{html.escape(fold_report.FOLD_NOTE)}</p>',
            f'<div class="scroll">{site_report.html_table(header, body)}</div>']


def report_markdown(summary: dict[str, Any], ranked: pd.DataFrame, trials: list[Trial],
                    best: Trial | None = None) -> str:
    """The report's text: summary, headline tables with CIs, size and speed."""
    metric = summary["select_metric"]
    lines = [f"# {TITLE}", "", f"> {NOT_A_DEVICE}", "",
             f"**Best model: {summary['best_model']}**, selected on `{metric}` = "
             f"{_fmt(summary['select_value'])} ({_chosen_on(metric)}).", "",
             *(line for text in (site_report.pick_lines(best) if best else [])
               for line in (text, "")),
             *([tie_text(summary), ""] if tie_text(summary) else []),
             _ensemble_text(summary), "", "## Headline metrics", "", _ci_note(trials), ""]
    for split in _splits(trials):
        lines += [f"### {_split_title(split, trials)}", "",
                  to_markdown(headline_table(ranked, split))]
    order = [str(n) for n in ranked["model_name"]]
    lines += site_report.comparison_markdown(trials, _splits(trials), order)
    header, body = fold_report.table(trials, order)
    if body:
        lines += ["## Shift folds", "", fold_report.FOLD_NOTE, "",
                  *site_report.markdown(header, body), ""]
    lines += ["## Size, speed and cost", "", to_markdown(facts_table(ranked)),
              f"All columns: `{RESULTS_CSV}` / `{RESULTS_MD}`.", ""]
    return "\n".join(lines)
