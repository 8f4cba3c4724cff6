"""Compare trained trials and write the report that tells the user which model to trust.

A *trial dir* holds ``model/`` (train output), ``eval/<split>/`` (evaluate output) and optionally
``tune/``. :func:`compare` reads several trials, ranks them on a validation metric only, and writes
``results.csv``, ``results.md``, ``metrics_bars.png``, a self-contained ``report.html``,
``summary.json`` and ``best_model/`` (a copy of the winner's ``model/``).
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import shutil
import tempfile
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from lungxray.plots import plot_confusion_matrix, plot_history, plot_metric_bars, plot_roc

# Per-split metrics copied into the table, in display order (absent ones are skipped).
TABLE_METRICS = (
    "accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision", "sensitivity",
    "specificity", "npv", "f1", "mcc", "brier", "accuracy_at_0.5", "threshold", "n",
)
# Metrics a model may be selected on; threshold and n describe the split, they are not scores.
SELECTABLE = frozenset(TABLE_METRICS) - {"threshold", "n"}
LOWER_IS_BETTER = frozenset({"brier"})
BAR_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")
SELECT_SPLIT = "val"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# Files whose presence marks an existing directory as an earlier report we may replace.
REPORT_MARKERS = ("summary.json", "report.html")


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, trial_dir: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"missing {path.name} ({path}) in trial dir {trial_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON in {path} (trial dir {trial_dir}): {exc}") from exc


def _split_order(name: str) -> tuple[int, str]:
    """val first, then test, then any other split alphabetically."""
    return ({"val": 0, "test": 1}.get(name, 2), name)


def _load_split(split_dir: Path, trial_dir: Path, info: dict) -> dict[str, Any]:
    metrics = _read_json(split_dir / "metrics.json", trial_dir)
    name = info["model_name"]
    if metrics.get("model_name", name) != name:
        raise ValueError(
            f"{split_dir / 'metrics.json'} is for model {metrics.get('model_name')!r}, "
            f"but trial dir {trial_dir} holds {name!r}"
        )
    if metrics.get("split", split_dir.name) != split_dir.name:
        raise ValueError(
            f"{split_dir / 'metrics.json'} says split {metrics.get('split')!r} "
            f"but lives in {split_dir.name!r}"
        )
    if "confusion_matrix" not in metrics:
        raise ValueError(f"{split_dir / 'metrics.json'} lacks 'confusion_matrix'")
    if list(metrics.get("class_names", info["class_names"])) != list(info["class_names"]):
        raise ValueError(f"class_names in {split_dir / 'metrics.json'} differ from model_info.json")
    pred_path = split_dir / "predictions.csv"
    if not pred_path.is_file():
        raise FileNotFoundError(f"missing predictions.csv ({pred_path}) in trial dir {trial_dir}")
    preds = pd.read_csv(pred_path)
    wanted = ["y_true"] + [f"prob_{c}" for c in info["class_names"]]
    lacking = [c for c in wanted if c not in preds.columns]
    if lacking:
        raise ValueError(f"{pred_path} lacks columns {lacking} (trial dir {trial_dir})")
    if "n" in metrics and int(metrics["n"]) != len(preds):
        raise ValueError(
            f"{pred_path} has {len(preds)} rows but metrics.json says n={metrics['n']}"
        )
    return {"dir": split_dir, "metrics": metrics, "predictions": preds}


def load_trial(trial_dir: Path) -> dict[str, Any]:
    """Read one trial dir: model info, history and every evaluated split.

    Returns ``{"trial_dir", "model_dir", "eval_dir", "tune_dir" (or None), "model_info",
    "history", "phases", "splits": {split: {"dir", "metrics", "predictions" (DataFrame)}}}``
    with splits ordered val, test, then others. Raises FileNotFoundError naming the missing file.
    """
    trial_dir = Path(trial_dir)
    model_dir, eval_dir, tune_dir = trial_dir / "model", trial_dir / "eval", trial_dir / "tune"
    info = _read_json(model_dir / "model_info.json", trial_dir)
    for key in ("model_name", "class_names"):
        if key not in info:
            raise ValueError(f"model_info.json in trial dir {trial_dir} lacks {key!r}")
    if not (model_dir / "model.keras").exists():
        raise FileNotFoundError(f"missing model.keras ({model_dir / 'model.keras'}) "
                                f"in trial dir {trial_dir}")
    hist = _read_json(model_dir / "history.json", trial_dir)
    if not isinstance(hist, dict) or not isinstance(hist.get("history"), dict):
        raise ValueError(f"history.json in trial dir {trial_dir} lacks a 'history' mapping")
    if not eval_dir.is_dir():
        raise FileNotFoundError(f"missing eval/ directory ({eval_dir}) in trial dir {trial_dir}")
    split_dirs = sorted((d for d in eval_dir.iterdir() if d.is_dir()),
                        key=lambda d: _split_order(d.name))
    if not split_dirs:
        raise FileNotFoundError(f"no eval/<split>/ directory in trial dir {trial_dir}")
    return {
        "trial_dir": trial_dir,
        "model_dir": model_dir,
        "eval_dir": eval_dir,
        "tune_dir": tune_dir if tune_dir.is_dir() else None,
        "model_info": info,
        "history": hist["history"],
        "phases": list(hist.get("phases") or []),
        "splits": {d.name: _load_split(d, trial_dir, info) for d in split_dirs},
    }


# --------------------------------------------------------------------------- pairing


def _eval_model_name(eval_dir: Path) -> str:
    names = {
        json.loads(p.read_text()).get("model_name")
        for p in sorted(Path(eval_dir).glob("*/metrics.json"))
    }
    if not names:
        raise FileNotFoundError(f"no <split>/metrics.json in eval dir {eval_dir}")
    if len(names) != 1 or None in names:
        raise ValueError(
            f"eval dir {eval_dir} mixes or lacks model names: {sorted(map(str, names))}"
        )
    return names.pop()


def _tune_model_name(tune_dir: Path) -> str:
    # tune writes best_hparams.json with the model name; other top-level JSON files are a fallback
    # so that a renamed file still pairs.
    paths = sorted(Path(tune_dir).glob("*.json"), key=lambda p: (p.name != "best_hparams.json", p))
    for path in paths:
        data = json.loads(path.read_text())
        if isinstance(data, dict) and data.get("model_name"):
            return str(data["model_name"])
    raise ValueError(f"no top-level *.json with a 'model_name' in tune dir {tune_dir}")


def _by_name(dirs: list[Path], namer: Any, kind: str) -> dict[str, Path]:
    named: dict[str, list[Path]] = {}
    for d in dirs:
        named.setdefault(namer(Path(d)), []).append(Path(d))
    dupes = {n: [str(p) for p in ps] for n, ps in named.items() if len(ps) > 1}
    if dupes:
        raise ValueError(f"duplicate model names among {kind} dirs: {dupes}")
    return {n: ps[0] for n, ps in named.items()}


def _check_dir_name(name: str) -> None:
    if not name or name in {".", ".."} or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"model name {name!r} cannot be used as a directory name")


def pair_trials(
    model_dirs: list[Path],
    eval_dirs: list[Path],
    tune_dirs: list[Path] | None,
    workdir: Path,
) -> list[Path]:
    """Pair model/eval(/tune) outputs by ``model_name`` and lay them out as trial dirs.

    KFP's ``dsl.Collected`` gives separate lists whose order need not match; this links
    ``workdir/<model_name>/{model,eval,tune}`` to the matching inputs (symlinks, nothing copied) and
    returns the trial dirs sorted by model name. Duplicate or unmatched names raise ValueError.
    """
    models = _by_name(
        model_dirs, lambda d: _read_json(d / "model_info.json", d)["model_name"], "model"
    )
    evals = _by_name(eval_dirs, _eval_model_name, "eval")
    tunes = _by_name(tune_dirs or [], _tune_model_name, "tune")
    problems = []
    if set(models) - set(evals):
        problems.append(f"models without evaluation: {sorted(set(models) - set(evals))}")
    if set(evals) - set(models):
        problems.append(f"evaluations without model: {sorted(set(evals) - set(models))}")
    if set(tunes) - set(models):
        problems.append(f"tuning runs without model: {sorted(set(tunes) - set(models))}")
    if problems:
        raise ValueError("cannot pair trials: " + "; ".join(problems))
    for name in models:
        _check_dir_name(name)  # all names first, so a bad one leaves no partial layout
    workdir = Path(workdir)
    trials = []
    for name in sorted(models):
        trial = workdir / name
        trial.mkdir(parents=True, exist_ok=False)
        (trial / "model").symlink_to(models[name].resolve(), target_is_directory=True)
        (trial / "eval").symlink_to(evals[name].resolve(), target_is_directory=True)
        if name in tunes:
            (trial / "tune").symlink_to(tunes[name].resolve(), target_is_directory=True)
        trials.append(trial)
    return trials


# --------------------------------------------------------------------------- table & ranking


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _flatten(f"{prefix}_{key}", sub, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(value)  # keep one cell per hparam so the CSV stays rectangular
    else:
        out[prefix] = value


def _row(trial: dict[str, Any]) -> dict[str, Any]:
    info = trial["model_info"]
    row: dict[str, Any] = {
        "model_name": info["model_name"],
        "weights": info.get("weights"),
        "params": info.get("params"),
        "train_seconds": info.get("train_seconds"),
        "epochs": info.get("epochs"),
    }
    hp: dict[str, Any] = {}
    _flatten("hp", info.get("hparams") or {}, hp)
    row.update(hp)
    for split, data in trial["splits"].items():
        for metric in TABLE_METRICS:
            if metric in data["metrics"]:
                value = data["metrics"][metric]
                row[f"{split}_{metric}"] = np.nan if value is None else value
    return row


def build_table(trials: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per trial: identity, hparams (``hp_*``) and ``<split>_<metric>`` columns."""
    rows = [_row(t) for t in trials]
    fixed = ["model_name", "weights", "params", "train_seconds", "epochs"]
    hp_cols = sorted({k for r in rows for k in r if k.startswith("hp_")})
    splits = sorted({s for t in trials for s in t["splits"]}, key=_split_order)
    metric_cols = [f"{s}_{m}" for s in splits for m in TABLE_METRICS
                   if any(f"{s}_{m}" in r for r in rows)]
    return pd.DataFrame(rows, columns=fixed + hp_cols + metric_cols)


def _check_select_metric(select_metric: str) -> str:
    if not select_metric.startswith(f"{SELECT_SPLIT}_"):
        if select_metric.startswith("test_"):
            raise ValueError(
                f"select_metric={select_metric!r}: never select on the test split; "
                "use a val_* metric"
            )
        raise ValueError(f"select_metric={select_metric!r} must start with 'val_'")
    metric = select_metric[len(SELECT_SPLIT) + 1:]
    if metric not in SELECTABLE:
        raise ValueError(f"select_metric={select_metric!r}: {metric!r} is not one of "
                         f"{sorted(SELECTABLE)}")
    return metric


def rank_models(table: pd.DataFrame, select_metric: str) -> pd.DataFrame:
    """Sort best first on ``select_metric``; ties by model name, undefined values last."""
    metric = _check_select_metric(select_metric)
    if select_metric not in table.columns:
        raise ValueError(f"no trial reports {select_metric!r}; columns: {list(table.columns)}")
    values = pd.to_numeric(table[select_metric], errors="coerce").astype(float)
    if values.isna().all():
        raise ValueError(f"{select_metric!r} is undefined for every trial; cannot select")
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    key = pd.DataFrame({"missing": values.isna(), "score": sign * values.fillna(0.0),
                        "name": table["model_name"].astype(str)})
    order = key.sort_values(["missing", "score", "name"], kind="mergesort").index
    ranked = table.loc[order].reset_index(drop=True)
    ranked.insert(0, "rank", range(1, len(ranked) + 1))
    return ranked


# --------------------------------------------------------------------------- validation


def _validate_trials(trials: list[dict[str, Any]], select_metric: str) -> None:
    names = [t["model_info"]["model_name"] for t in trials]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"duplicate model names across trial dirs: {dupes}")
    classes = {json.dumps(list(t["model_info"]["class_names"])) for t in trials}
    if len(classes) > 1:
        raise ValueError(f"trials disagree on class_names: {sorted(classes)}; not comparable")
    lacking = [t["model_info"]["model_name"] for t in trials if SELECT_SPLIT not in t["splits"]]
    if lacking:
        raise ValueError(f"{select_metric!r} needs a {SELECT_SPLIT!r} split; missing for {lacking}")
    # Scores are only comparable on the same data: every split must have the same label counts.
    splits = {s for t in trials for s in t["splits"]}
    for split in sorted(splits):
        counts = {
            t["model_info"]["model_name"]: json.dumps(
                t["splits"][split]["predictions"]["y_true"].value_counts().sort_index()
                .astype(int).to_dict()
            )
            for t in trials if split in t["splits"]
        }
        if len(set(counts.values())) > 1:
            raise ValueError(f"split {split!r} has different labels per model {counts}; "
                             "models were not evaluated on the same data")


# --------------------------------------------------------------------------- images


def _png_b64(path: Path) -> str | None:
    """Base64 of a PNG file, or None if it is missing or not a PNG (so it gets redrawn)."""
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.startswith(PNG_MAGIC):
        return None
    return base64.b64encode(data).decode("ascii")


def _image(path: Path, redraw: Any, scratch: Path) -> str:
    """The trial's own PNG if valid, else redraw it from the raw data into scratch."""
    found = _png_b64(path)
    if found is not None:
        return found
    out = redraw(scratch / f"{uuid.uuid4().hex}.png")
    return base64.b64encode(Path(out).read_bytes()).decode("ascii")


def _trial_images(trial: dict[str, Any], scratch: Path) -> dict[str, Any]:
    info = trial["model_info"]
    name, classes = info["model_name"], list(info["class_names"])
    curves = partial(plot_history, trial["history"], trial["phases"], title=f"{name} training")
    images: dict[str, Any] = {
        "curves": _image(trial["model_dir"] / "curves.png", curves, scratch),
        "splits": {},
    }
    for split, data in trial["splits"].items():
        m, preds = data["metrics"], data["predictions"]
        y = preds["y_true"].to_numpy()
        probs = preds[[f"prob_{c}" for c in classes]].to_numpy()
        draw_cm = partial(_redraw_cm, m, classes, title=f"{name} — {split}")
        draw_roc = partial(_redraw_roc, y, probs, classes, threshold=m.get("threshold"),
                           title=f"{name} — {split} ROC")
        images["splits"][split] = {
            "confusion_matrix": _image(data["dir"] / "confusion_matrix.png", draw_cm, scratch),
            "roc": _image(data["dir"] / "roc.png", draw_roc, scratch),
        }
    return images


def _redraw_cm(metrics: dict, classes: list[str], path: Path, title: str) -> Path:
    return plot_confusion_matrix(metrics["confusion_matrix"], classes, path, title)


def _redraw_roc(
    y: np.ndarray, probs: np.ndarray, classes: list[str], path: Path,
    threshold: float | None, title: str,
) -> Path:
    return plot_roc(y, probs, classes, path, threshold=threshold, title=title)


# --------------------------------------------------------------------------- writers


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float | np.floating):
        return format(float(value), spec)
    return str(value)


def display_table(df: pd.DataFrame) -> pd.DataFrame:
    """Strings for humans: scores to 4 decimals, hparams in general format (1e-05 stays
    readable instead of rounding to 0.0000), missing values as a dash."""
    shown = pd.DataFrame(index=df.index)
    for col in df.columns:
        spec = "g" if col.startswith("hp_") else ".1f" if col == "train_seconds" else ".4f"
        shown[col] = [_fmt(v, spec) for v in df[col].astype(object)]
    return shown


def to_markdown(df: pd.DataFrame) -> str:
    """Markdown table of ``display_table(df)``; tabulate through pandas when available, else a
    minimal writer (tabulate is only a transitive dependency)."""
    shown = display_table(df).map(lambda v: v.replace("|", "\\|"))  # a | would split a cell
    try:
        import tabulate  # noqa: F401  (only to know whether pandas can use it)
    except ImportError:
        header = "| " + " | ".join(map(str, shown.columns)) + " |"
        rule = "|" + "|".join("---" for _ in shown.columns) + "|"
        body = ["| " + " | ".join(row) + " |"
                for row in shown.itertuples(index=False)]
        return "\n".join([header, rule, *body]) + "\n"
    # disable_numparse keeps our formatting instead of tabulate re-formatting numeric strings.
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def _img_tag(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:12px}td,th{border:1px solid #ccc;padding:3px 6px}
th{background:#f0f0f0}.best{background:#e8f5e9;padding:1em;border-left:4px solid #2e7d32}
.scroll{overflow-x:auto}img{max-width:100%;margin:4px}.splits{display:flex;flex-wrap:wrap}
"""


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
        "(chosen on validation, never on test).</p>",
        "<p>The test split plays no part in the choice; its numbers are the unbiased estimate of "
        "how the chosen model performs on unseen data.</p>",
    ]
    if held_out:
        parts.append(f"<p>Best model on the other splits: {'; '.join(held_out)}.</p>")
    parts.append(f"<p>Ranking on <code>{html.escape(metric)}</code>:</p><ol>{ranking}</ol>")
    parts.append(f"<p>{len(ranked)} models compared.</p></section>")
    return "\n".join(parts)


def _model_html(trial: dict[str, Any], images: dict[str, Any]) -> str:
    info = trial["model_info"]
    name = str(info["model_name"])
    facts = ", ".join(
        f"{html.escape(k)}: {html.escape(_fmt(info.get(k)))}"
        for k in ("weights", "params", "epochs", "train_seconds", "threshold", "threshold_method",
                  "image_size", "input_size", "channels")
        if k in info
    )
    hps = html.escape(json.dumps(info.get("hparams") or {}, sort_keys=True))
    parts = [
        f'<section><h3 id="model-{html.escape(name)}">{html.escape(name)}</h3>',
        f"<p>{facts}</p><p>hparams: <code>{hps}</code></p>",
        _img_tag(images["curves"], f"{name} training curves"),
        '<div class="splits">',
    ]
    for split, imgs in images["splits"].items():
        parts.append(f"<div><h4>{html.escape(split)}</h4>"
                     f"{_img_tag(imgs['confusion_matrix'], f'{name} {split} confusion matrix')}"
                     f"{_img_tag(imgs['roc'], f'{name} {split} ROC')}</div>")
    parts.append("</div></section>")
    return "\n".join(parts)


def _report_html(
    summary: dict[str, Any], ranked: pd.DataFrame, trials: list[dict[str, Any]],
    images: dict[str, dict[str, Any]], bars_b64: str,
) -> str:
    table = display_table(ranked).to_html(index=False, escape=True)
    order = {str(n): i for i, n in enumerate(ranked["model_name"])}
    models = "\n".join(
        _model_html(t, images[t["model_info"]["model_name"]])
        for t in sorted(trials, key=lambda t: order[str(t["model_info"]["model_name"])])
    )
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>lungxray model comparison</title>',
        f"<style>{CSS}</style></head><body>",
        "<h1>lungxray model comparison</h1>",
        _summary_html(summary, ranked),
        f'<h2>Results</h2><div class="scroll">{table}</div>',
        "<h2>Models</h2>",
        models,
        "<h2>Metric comparison</h2>",
        _img_tag(bars_b64, "metric comparison bar chart"),
        "</body></html>",
    ]) + "\n"


def _json_value(value: Any) -> Any:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _summary(ranked: pd.DataFrame, select_metric: str, splits: list[str]) -> dict[str, Any]:
    best = ranked.iloc[0]
    metric = select_metric[len(SELECT_SPLIT) + 1:]
    # The winner's score on every split, so the held-out estimate sits next to the choice.
    score_cols = [f"{s}_{metric}" for s in splits if f"{s}_{metric}" in ranked.columns]
    return {
        "best_model": str(best["model_name"]),
        "select_metric": select_metric,
        "select_value": _json_value(best[select_metric]),
        "ranking": [
            {"rank": int(r["rank"]), "model_name": str(r["model_name"]),
             "value": _json_value(r[select_metric])}
            for _, r in ranked.iterrows()
        ],
        "best_model_scores": {c: _json_value(best[c]) for c in score_cols},
        "n_models": len(ranked),
    }


def _bar_columns(table: pd.DataFrame, select_metric: str) -> list[str]:
    """The selection score next to the held-out test scores (validation ones if no test)."""
    for split in ("test", SELECT_SPLIT):
        cols = [f"{split}_{m}" for m in BAR_METRICS
                if f"{split}_{m}" in table.columns and table[f"{split}_{m}"].notna().any()]
        if cols:
            return list(dict.fromkeys([select_metric, *cols]))
    return [select_metric]


# --------------------------------------------------------------------------- publishing


def _check_output(output: Path) -> None:
    """Refuse to replace a non-empty directory that is not an earlier report."""
    if output.is_symlink() or (output.exists() and not output.is_dir()):
        raise FileExistsError(f"output {output} exists and is not a directory")
    if output.is_dir() and any(output.iterdir()) and not all(
        (output / m).exists() for m in REPORT_MARKERS
    ):
        raise FileExistsError(f"output {output} is a non-empty directory that is not a report")


def _move_or_copy(build: Path, output: Path) -> None:
    try:
        os.replace(build, output)
    except OSError:
        # Some mounts (e.g. object-store FUSE) cannot rename directories: copy instead, with the
        # files that make the report look complete copied last.
        output.mkdir(parents=True, exist_ok=True)
        for item in sorted(build.iterdir(), key=lambda p: p.name in REPORT_MARKERS):
            dest = output / item.name
            if item.is_dir():
                shutil.copytree(item, dest)
            else:
                shutil.copy2(item, dest)
        shutil.rmtree(build, ignore_errors=True)


def _publish(build: Path, output: Path) -> None:
    """Move the finished build dir to output in one rename (copy fallback writes markers last)."""
    old = None
    if output.is_dir():
        if any(output.iterdir()):
            old = output.with_name(f".{output.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(output, old)
        else:
            output.rmdir()
    try:
        _move_or_copy(build, output)
    except BaseException:
        if old is not None and not output.exists():
            os.replace(old, output)  # put the previous report back rather than lose it
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def compare(trial_dirs: list[Path], output: Path, select_metric: str = "val_roc_auc") -> dict:
    """Compare trials, pick the best on a validation metric, write the report; return summary.

    Everything is loaded and validated before anything is written, and the report is assembled in
    a sibling temp dir that replaces ``output`` only when complete, so a failure never leaves a
    half-written report behind.
    """
    _check_select_metric(select_metric)
    if not trial_dirs:
        raise ValueError("compare needs at least one trial dir")
    output = Path(output)
    _check_output(output)
    trials = [load_trial(Path(d)) for d in trial_dirs]
    _validate_trials(trials, select_metric)
    ranked = rank_models(build_table(trials), select_metric)
    splits = sorted({s for t in trials for s in t["splits"]}, key=_split_order)
    summary = _summary(ranked, select_metric, splits)
    best_trial = next(t for t in trials if t["model_info"]["model_name"] == summary["best_model"])

    output.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{output.name}.build-", dir=output.parent))
    try:
        _write_report(build, trials, ranked, summary, best_trial)
        _publish(build, output)
    except BaseException:
        shutil.rmtree(build, ignore_errors=True)
        raise
    return summary


def _write_report(
    build: Path, trials: list[dict[str, Any]], ranked: pd.DataFrame, summary: dict[str, Any],
    best_trial: dict[str, Any],
) -> None:
    ranked.to_csv(build / "results.csv", index=False)
    (build / "results.md").write_text(to_markdown(ranked))
    bars = plot_metric_bars(
        ranked, _bar_columns(ranked, summary["select_metric"]), build / "metrics_bars.png",
        title=f"Model comparison (selection on {summary['select_metric']})",
    )
    # copytree follows the top-level link and, with symlinks=False, copies linked files' content.
    shutil.copytree(best_trial["model_dir"], build / "best_model", symlinks=False)
    with tempfile.TemporaryDirectory(dir=build) as scratch:
        images = {t["model_info"]["model_name"]: _trial_images(t, Path(scratch)) for t in trials}
    bars_b64 = base64.b64encode(bars.read_bytes()).decode("ascii")
    page = _report_html(summary, ranked, trials, images, bars_b64)
    (build / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (build / "report.html").write_text(page, encoding="utf-8")
