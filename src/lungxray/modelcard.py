"""Write the model card of the selected model (Mitchell et al. 2019), as Markdown.

Everything stated is read from the trial's own files (model_info.json, metrics.json,
predictions.csv); what those files cannot know (who the patients were) is said to be unknown
rather than guessed.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from lungxray import site_report
from lungxray.artifacts import AT_HALF, CI_METRICS, METRICS, Trial, target_sensitivity_of


def _num(value: Any, digits: int = 4) -> str:
    return "—" if value is None else f"{float(value):.{digits}f}"


def _ci(metrics: dict, name: str) -> str:
    ci = (metrics.get("ci") or {}).get(name)
    return f"{ci[0]:.4f} – {ci[1]:.4f}" if ci else "—"


def _counts(trial: Trial, split: str) -> str:
    counts = trial.splits[split].predictions["y_true"].value_counts()
    return ", ".join(f"{name} {int(counts.get(i, 0))}" for i, name in enumerate(trial.class_names))


# The threshold rules (lungxray.artifacts.THRESHOLD_RULES) in words.
RULE_WORDS = {
    "youden": "Youden's J (sensitivity + specificity - 1) maximised on validation",
    "balanced": "the class-balanced rule: 0.5, the balanced-prior operating point of the "
                "class-weighted training, not fitted to validation",
    "platt": "Platt scaling fitted on validation: the score where the calibrated P(positive) "
             "is 0.5",
    "worst_group": "the worst-group rule: the threshold with the highest lowest balanced "
                   "accuracy over validation's groups (site x image-statistics cluster)",
}


def _threshold_text(info: dict) -> str:
    if info.get("threshold") is None:
        return "none: the class with the highest probability is predicted (more than two classes)"
    method = str(info.get("threshold_method") or "unknown method")
    target = target_sensitivity_of(info)
    how = (f"the highest threshold reaching sensitivity {target} on validation" if target
           else RULE_WORDS.get(method, f"{method}, on validation"))
    positive = info["class_names"][1]
    return f"P({positive}) >= {float(info['threshold']):.4f}, chosen by {how}"


def _robustness_section(best: Trial, splits: list[str]) -> list[str]:
    """ "Robustness to acquisition shift": clean vs corrupted AUC per split and per corruption."""
    measured = {s: best.splits[s].metrics.get("robustness") for s in splits}
    measured = {s: r for s, r in measured.items() if r}
    lines = ["", "## Robustness to acquisition shift", ""]
    if not measured:
        return lines + ["Not measured: the evaluation ran without the corruption suite "
                        "(`--no-robustness`)."]
    first = next(iter(measured.values()))
    lines += [
        f"Simulated acquisition shifts in MedMNIST-C's categories (Di Salvo et al., 2024): "
        f"{len(first['auc'])} corruptions at {len(first['severities'])} severities, on a "
        "seeded stratified subset of each split. They show how fragile the model is to "
        "exposure, noise, resolution and positioning changes; they do not replace images from "
        "another hospital, which differ in ways no simulation covers.",
        "",
        "| split | images | clean AUC | mean corrupted AUC | drop | worst (corruption) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for split, rob in measured.items():
        lines.append(f"| {split} | {rob['n']} | {_num(rob['clean_auc'])} | "
                     f"{_num(rob['mean_corrupted_auc'])} | {_num(rob['drop'])} | "
                     f"{_num(rob['worst_corrupted_auc'])} ({rob['worst_corruption']}) |")
    shown = "val" if "val" in measured else next(iter(measured))
    rob = measured[shown]
    levels = [str(s) for s in rob["severities"]]
    lines += ["", f"AUC on `{shown}` per corruption and severity (inverted polarity is a reader "
                  "bug, reported but not in the mean):", "",
              "| corruption | " + " | ".join(f"severity {s}" for s in levels) + " |",
              "|---|" + "---:|" * len(levels)]
    for name, by_level in rob["auc"].items():
        lines.append(f"| {name} | " + " | ".join(_num(by_level.get(s)) for s in levels) + " |")
    return lines


def _prevalence_section(best: Trial, splits: list[str]) -> list[str]:
    """The operating point at the deployment prevalence and label-free prevalence estimates."""
    metrics = {s: best.splits[s].metrics for s in splits}
    points = {s: m["operating_point"] for s, m in metrics.items() if m.get("operating_point")}
    estimates = {s: m["prevalence_estimate"] for s, m in metrics.items()
                 if m.get("prevalence_estimate")}
    if not points and not estimates:
        return []
    lines = ["", "## Prevalence and operating point", ""]
    if points:
        point = next(iter(points.values()))
        lines += [
            f"For a deployment prevalence of {point['deployment_prevalence']:.3f} (validation: "
            f"{point['validation_prevalence']:.3f}) the scores are calibrated on validation "
            "(Platt scaling), the posterior odds shifted by the prior ratio (Bayes' rule), and "
            "a case called positive when that posterior is at least 0.5 (fewest errors for "
            f"equal costs): score threshold {_num(point['threshold'])}. PPV and NPV below are "
            "at the deployment prevalence, from each split's sensitivity and specificity.",
            "",
            "| split | sensitivity | specificity | PPV | NPV | PPV / NPV at the model's own "
            "threshold |", "|---|---:|---:|---:|---:|---|"]
        for split, pt in points.items():
            own = pt.get("at_model_threshold") or {}
            lines.append(f"| {split} | {_num(pt['sensitivity'])} | {_num(pt['specificity'])} | "
                         f"{_num(pt['ppv'])} | {_num(pt['npv'])} | {_num(own.get('ppv'))} / "
                         f"{_num(own.get('npv'))} |")
        lines.append("")
    if estimates:
        lines += ["Prevalence of each held-out split estimated from the model's scores alone "
                  "(EM of Saerens, Latinne & Decaestecker 2002, on validation-calibrated "
                  "posteriors; 95% bootstrap interval); the true prevalence is shown only to "
                  "check the estimate. A large gap between the estimate and validation's "
                  "prevalence warns that the operating point needs revisiting.", "",
                  "| split | EM estimate | 95% CI | true | validation |",
                  "|---|---:|---|---:|---:|"]
        for split, est in estimates.items():
            ci = est.get("ci") or [None, None]
            lines.append(f"| {split} | {_num(est['estimate'])} | {_num(ci[0])} – "
                         f"{_num(ci[1])} | {_num(est.get('true_prevalence'))} | "
                         f"{_num(est['validation_prevalence'])} |")
    return lines


# What each tie-break score is (lungxray.selection.TIE_BREAKS), by its name without "val_".
TIE_BREAK_WORDS = {
    "shift_folds_roc_auc": "out-of-fold AUC over image-statistics folds, every training image "
                           "held out once by a model trained on the others",
    "shift_folds_worst_site_auc": "the lowest per-site out-of-fold AUC over image-statistics "
                                  "folds",
    "test_shifted_roc_auc": "AUC on the shift proxy, whole clusters of atypical images held out "
                            "of training; the shipped model is refit with them",
    "test_shifted_worst_site_auc": "the lowest per-site AUC on the shift proxy, whole clusters "
                                   "of atypical images held out of training",
    "robust_auc": "mean AUC under simulated acquisition shifts",
}


def tie_text(summary: dict[str, Any]) -> str:
    """What the tie test found: "tied" and how it was broken, or that the pick stands alone."""
    ties = summary.get("ties") or {}
    if not ties.get("tested"):
        return ""
    tied = ties["tied"]
    if len(tied) < 2:
        return (f"Not tied: every other candidate's validation AUC is below {ties['leader']}'s "
                "(paired bootstrap 95% CI of the difference excludes 0).")
    text = (f"Tied on validation AUC: {', '.join(tied)} (paired bootstrap 95% CI of each "
            f"difference to {ties['leader']} covers 0)")
    if ties.get("winner"):
        meaning = (TIE_BREAK_WORDS.get(ties["break"].removeprefix("val_"))
                   or "a score under shift")
        return f"{text}; the tie is broken on {ties['break']} ({meaning}): {ties['winner']}."
    return f"{text}; {ties['break']}, so the validation order stands."


def model_card(best: Trial, summary: dict[str, Any]) -> str:
    """Markdown model card for the best trial (a loaded trial, or the ensemble)."""
    info = best.model_info
    name = str(info["model_name"])
    classes = list(info["class_names"])
    splits = list(best.splits)
    # Validation chose the model and its threshold: only test or external data is held out.
    unbiased = [s for s in splits if s not in ("train", "val")]
    held_out = "test" if "test" in unbiased else unbiased[0] if unbiased else None
    shown = held_out or splits[-1]  # the split the per-class table, latency etc. come from
    m_held = best.splits[shown].metrics
    members = info.get("members")
    hparams = info.get("hparams") or {}
    dense = int(hparams.get("dense_units") or 0)
    arch = (f"an ensemble averaging the class probabilities of {', '.join(members)} (the top "
            f"{len(members)} single models on {summary['select_metric']})" if members else
            f"Keras Applications {name} backbone, global average pooling, "
            + (f"a {dense}-unit ReLU dense layer, " if dense else "")
            + f"dropout and a softmax layer over {len(classes)} classes; resizing, grey-to-RGB "
            "and the backbone's preprocessing live inside the model, which takes raw 0–255 "
            "pixels" + ("; random augmentation layers act during training only"
                        if float(hparams.get("augment") or 0) > 0 else ""))
    training = ("- Members: each trained and tuned on its own (see its row in the comparison "
                "report); the ensemble itself has no weights and its threshold is chosen on "
                "validation." if members else
                f"- Weights: initialised from `{info.get('weights')}`; "
                f"{info.get('epochs') or '—'} training epochs; hyperparameters "
                f"`{json.dumps(hparams, sort_keys=True)}`.")
    today = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d")  # noqa: UP017 (3.10)
    lines = [
        f"# Model card: {name}",
        "",
        f"Generated by `lungxray compare` on {today}.",
        "",
        "> **Not a medical device.** This model is research software. It has not been cleared or "
        "approved by any regulator, has not been validated prospectively, and must not be used "
        "to diagnose, triage or treat patients.",
        "",
        "## Model details",
        "",
        f"- Architecture: {arch}.",
        training,
        f"- Size: {info.get('params', '—')} parameters.",
        f"- Input: {info.get('image_size')}×{info.get('image_size')} px, "
        f"{info.get('channels')} channel(s).",
        f"- Decision rule: {_threshold_text(info)}.",
        f"- Inference: {_num(m_held.get('latency_ms'), 2)} ms per image (batch "
        f"{m_held.get('latency_batch_size', '—')}, {m_held.get('latency_device', 'unknown')}).",
        f"- Selection: best of {summary['n_models']} candidates on "
        f"`{summary['select_metric']}` = {_num(summary['select_value'])} (validation only; the "
        "test split played no part in any choice)." + (f" {tie_text(summary)}"
                                                         if tie_text(summary) else ""),
        "",
        "## Intended use",
        "",
        f"- Research and teaching: comparing architectures for classifying chest X-rays as "
        f"{', '.join(classes)}, and retrospective studies of such classifiers.",
        "- Not intended for: clinical decisions, screening or triage of real patients, or any "
        "population, scanner or image size the training data does not represent.",
        "- Users: machine-learning researchers and engineers, with clinical experts reviewing "
        "any conclusion.",
        "",
        "## Data",
        "",
        f"- Classes: {', '.join(classes)}" + (f" (positive class: {classes[1]})."
                                              if len(classes) == 2 else "."),
    ]
    for split in splits:
        lines.append(f"- {split}: {best.splits[split].metrics['n']} images "
                     f"({_counts(best, split)}).")
    sha = info.get("data_sha256") or {}
    if sha:
        lines.append("- Dataset fingerprints (sha256 per split, from the prepare step): "
                     + ", ".join(f"{k} `{v[:16]}…`" for k, v in sorted(sha.items())) + ".")
    lines += [
        "- Who the patients were (age, sex, site, scanner) is not recorded in these files; read "
        "the dataset's own documentation. PneumoniaMNIST, for instance, is paediatric (1–5 "
        "years) from a single centre in Guangzhou, downsampled to 28 px.",
        "",
        "## Performance",
        "",
        (f"`{held_out}` is the held-out estimate." if held_out else
         "**No held-out split was evaluated**: validation chose this model and its threshold, "
         "so its figures are optimistic and there is no unbiased estimate.")
        + " At the decision rule above; 95% "
        f"{m_held.get('ci_method', 'bootstrap')} confidence "
        f"intervals ({m_held.get('n_bootstrap', '—')} resamples, seed "
        f"{m_held.get('bootstrap_seed', '—')}).",
        "",
        "| metric | " + " | ".join(f"{s} value | {s} 95% CI" for s in splits) + " |",
        "|---|" + "---:|---:|" * len(splits),
    ]
    for metric in CI_METRICS:
        if any(best.splits[s].metrics.get(metric) is not None for s in splits):
            cells = [f"{_num(best.splits[s].metrics.get(metric))} | "
                     f"{_ci(best.splits[s].metrics, metric)}" for s in splits]
            lines.append(f"| {METRICS[metric].card} | " + " | ".join(cells) + " |")
    at_half = m_held.get("at_0.5")
    if at_half:
        lines += ["", f"At threshold 0.5 on `{shown}` (comparable with published MedMNIST "
                      "numbers): " + ", ".join(f"{METRICS[k].card} {_num(at_half[k])}"
                                               for k in AT_HALF) + "."]
    per_class = m_held.get("per_class")
    if per_class:
        lines += ["", "| class | support | sensitivity | specificity | PPV | NPV | ROC AUC |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for cls, v in per_class.items():
            lines.append(f"| {cls} | {v['support']} | {_num(v['recall'])} | "
                         f"{_num(v['specificity'])} | {_num(v['precision'])} | "
                         f"{_num(v['npv'])} | {_num(v.get('roc_auc'))} |")
    lines += site_report.card_section(best, splits)
    lines += _robustness_section(best, splits)
    lines += _prevalence_section(best, splits)
    external = [s for s in splits if s not in ("train", "val", "test")]
    n_held = m_held["n"]
    lines += [
        "",
        "## Limitations",
        "",
        f"- The `{shown}` estimate rests on {n_held} images; the confidence intervals above "
        "show how far the true figures may lie from it.",
        "- " + (f"Evaluated on data from elsewhere: {', '.join(external)} (see the table)."
                if external else site_report.SEVERAL_SITES if site_report.has_sites(best)
                else "Not externally validated: every split comes from the same "
                "source, so performance on another hospital's images, scanners or patients is "
                "unknown and usually lower."),
        "- PPV and NPV depend on prevalence; they hold only where disease is as common as in "
        "this data (see the operating point at a deployment prevalence, when one was given).",
        "- Probabilities are not recalibrated: see the Brier score, the calibration error and "
        "the reliability diagram before reading them as risks.",
        "- Grad-CAM heatmaps show where the network's evidence lies at the resolution of the "
        "feature map named on each grid (a few cells at small image sizes); they are not proof "
        "that it looks at the right anatomy.",
        "- The model was chosen among several on the validation split, so validation figures "
        "are optimistic; only the test (and external) figures are unbiased.",
        "- Labels are taken as given; label noise in the source data is not corrected.",
        "",
        "## Ethical considerations",
        "",
        "- A false negative can delay treatment; a false positive can lead to unnecessary "
        "treatment. Choose the decision rule with clinicians for the intended setting.",
        "- Performance across patient subgroups (age, sex, ethnicity, device) was not assessed.",
        "",
        "**Not a medical device.**",
        "",
    ]
    return "\n".join(lines)
