"""Render an evaluation: its scalar metrics, a Markdown summary and a self-contained HTML page.

Reads the results :func:`lungxray.evaluate.evaluate` returns (and the plots it wrote); computes
nothing new.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

from lungxray import pages, plots, safeio, site_metrics, site_report
from lungxray.artifacts import AT_HALF, EVAL_CI_METRICS, EVAL_METRICS, PLOT_FILES, label
from lungxray.artifacts import EVAL_REPORT_FILE as REPORT_FILE


def scalar_metrics(results: dict[str, dict]) -> dict[str, float]:
    """``<split>_<metric>`` (and ``_ci_lo``/``_ci_hi`` for a few) for a fixed list of metrics,
    so every trial logs the same names; undefined values are left out."""
    out = {}
    for split, values in results.items():
        for name in EVAL_METRICS:
            if values.get(name) is not None:
                out[f"{split}_{name}"] = float(values[name])
        for name in EVAL_CI_METRICS:
            ci = (values.get("ci") or {}).get(name)
            if ci:
                out[f"{split}_{name}_ci_lo"], out[f"{split}_{name}_ci_hi"] = map(float, ci)
        out.update(site_metrics.scalar_metrics(split, values))
    return out


def format_value(values: dict, name: str) -> str:
    """``0.9123 [0.8901, 0.9302]``: the value with its 95% CI when there is one."""
    value = values.get(name)
    if value is None:
        return "—"
    ci = (values.get("ci") or {}).get(name)
    text = f"{value:.4f}" if name != "latency_ms" else f"{value:.2f}"
    return f"{text} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else text


def describe(results: dict[str, dict]) -> str:
    """A Markdown table of the headline metrics (with 95% CIs) per split."""
    model_name = next(iter(results.values()))["model_name"]
    names = list(results)
    lines = [f"# {model_name}", "",
             "Metrics at the threshold chosen on validation; 95% stratified bootstrap CIs.", "",
             "| metric | " + " | ".join(f"{s} (n={results[s]['n']})" for s in names) + " |",
             "|---|" + "---:|" * len(names)]
    for name in EVAL_METRICS:
        if any(results[s].get(name) is not None for s in names):
            cells = [format_value(results[s], name) for s in names]
            lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    at_half = [s for s in names if results[s].get("at_0.5")]
    if at_half:
        lines += ["", "At threshold 0.5 (for comparison with published MedMNIST numbers):", "",
                  "| metric | " + " | ".join(at_half) + " |", "|---|" + "---:|" * len(at_half)]
        for name in AT_HALF:
            cells = [f"{results[s]['at_0.5'][name]:.4f}" for s in at_half]
            lines.append(f"| {label(name)} | " + " | ".join(cells) + " |")
    lines += site_report.evaluation_markdown(results)
    for split in names:
        lines += ["", *(f"- **{split}**: {text}" for text in evidence_lines(results[split]))]
    return "\n".join(lines) + "\n"


def _f(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def evidence_lines(values: dict) -> list[str]:
    """Plain sentences on one split's robustness, TTA and prevalence evidence (those present)."""
    lines = []
    rob = values.get("robustness")
    if rob:
        lines.append(
            f"Robustness to acquisition shift ({len(rob['auc'])} corruptions x "
            f"{len(rob['severities'])} severities, MedMNIST-C categories, on {rob['n']} "
            f"images): clean ROC AUC {_f(rob['clean_auc'])}, mean corrupted "
            f"{_f(rob['mean_corrupted_auc'])} (drop {_f(rob['drop'])}), worst "
            f"{_f(rob['worst_corrupted_auc'])} ({rob['worst_corruption']}); inverted polarity "
            f"(a reader bug, not in the mean): "
            f"{_f((rob['auc'].get('invert') or {}).get('1'))}. Took {rob.get('seconds')} s.")
    tta = values.get("tta")
    if tta:
        lines.append(f"Test-time augmentation ({len(tta['views'])} views, no flips): ROC AUC "
                     f"{_f(tta['roc_auc'])} vs {_f(tta['roc_auc_plain'])} without "
                     f"(gain {_f(tta['gain'])}); headline metrics use the plain predictions.")
    point = values.get("operating_point")
    if point:
        lines.append(
            f"At a deployment prevalence of {point['deployment_prevalence']:.3f} (validation: "
            f"{point['validation_prevalence']:.3f}) the Bayes rule (calibrated posterior >= "
            f"0.5) puts the threshold at {_f(point['threshold'])}: sensitivity "
            f"{_f(point['sensitivity'])}, specificity {_f(point['specificity'])}, PPV "
            f"{_f(point['ppv'])}, NPV {_f(point['npv'])} at that prevalence.")
    est = values.get("prevalence_estimate")
    if est:
        ci = est.get("ci") or [None, None]
        lines.append(
            f"Prevalence estimated without labels (EM on validation-calibrated scores): "
            f"{_f(est['estimate'])} [95% CI {_f(ci[0])}, {_f(ci[1])}]; true "
            f"{_f(est.get('true_prevalence'))}; validation {_f(est['validation_prevalence'])}.")
    return lines


def _png_tag(path: Path, alt: str) -> str:
    b64 = plots.png_base64(path)
    return plots.img_tag(b64, alt) if b64 else ""


def report_html(results: dict[str, dict], output: Path) -> str:
    """A self-contained HTML page (images embedded) of one model's evaluation."""
    model_name = str(next(iter(results.values()))["model_name"])
    rows = "".join(
        f"<tr><td>{html.escape(label(m))}</td>"
        + "".join(f"<td>{html.escape(format_value(results[s], m))}</td>" for s in results)
        + "</tr>"
        for m in EVAL_METRICS if any(results[s].get(m) is not None for s in results))
    head = "".join(f"<th>{html.escape(s)} (n={results[s]['n']})</th>" for s in results)
    parts = [
        f"<h1>{html.escape(model_name)}</h1>",
        "<p>Metrics at the decision threshold chosen on validation (never on the split shown), "
        "with 95% stratified bootstrap confidence intervals.</p>",
        f"<table><tr><th>metric</th>{head}</tr>{rows}</table>",
        *site_report.evaluation_html(results),
    ]
    for split, values in results.items():
        parts.append(f"<h2>{html.escape(split)}</h2>")
        parts += [f"<p>{html.escape(line)}</p>" for line in evidence_lines(values)]
        for name in PLOT_FILES:
            parts.append(_png_tag(output / split / name, f"{model_name} {split} {name[:-4]}"))
        if values.get("gradcam") is None:
            parts.append("<p>No Grad-CAM grid: not drawn for ensembles (no single feature map) "
                         "or when explanations are switched off.</p>")
    parts.append("<p>Research software, not a medical device.</p>")
    return pages.page(f"{model_name} evaluation", parts)


def write_report(results: dict[str, dict], output: Path) -> Path:
    """``<output>/report.html`` for the splits just evaluated, replaced whole."""
    path = Path(output) / REPORT_FILE
    safeio.write_text_atomic(path, report_html(results, Path(output)))
    return path
