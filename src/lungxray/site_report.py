"""Per-site tables for the evaluation page, the comparison report and the model card.

Renders what :mod:`lungxray.site_metrics` put into each split's ``metrics.json``
(``per_site``); computes nothing new. A split of one site has no per-site table: its pooled
numbers are that site's.
"""

from __future__ import annotations

import html
from typing import Any

from lungxray import sites as siting
from lungxray.site_metrics import AT_SITE_THRESHOLD, PER_SITE

HEADER = ["site", "n", "prevalence", "ROC AUC [95% CI]", "accuracy", "sensitivity [95% CI]",
          "specificity [95% CI]", "site's own threshold: balanced accuracy"]
NOTE = ("Per site: the same model at the same threshold on each site's images alone; the "
        "pooled numbers can hide a site where the model is no better than chance. The last "
        "column: the threshold chosen on that site's own validation rows (`lungxray predict "
        "--site`) and the balanced accuracy there.")


def _f(value: Any) -> str:
    return "—" if value is None else f"{float(value):.4f}"


def _with_ci(values: dict, name: str) -> str:
    ci = (values.get("ci") or {}).get(name)
    text = _f(values.get(name))
    return f"{text} [{ci[0]:.4f}, {ci[1]:.4f}]" if ci and values.get(name) is not None else text


def _own(values: dict) -> str:
    """'threshold: balanced accuracy' at a site's own threshold, or '—' without one."""
    own = values.get(AT_SITE_THRESHOLD)
    if not isinstance(own, dict):
        return "—"
    return f"{_f(own.get('threshold'))}: {_f(own.get('balanced_accuracy'))}"


def rows(metrics: dict) -> list[list[str]]:
    """One row per site of a split's metrics (none for a split of one site)."""
    return [[site, str(v.get("n")), _f(v.get("prevalence")), _with_ci(v, "roc_auc"),
             _f(v.get("accuracy")), _with_ci(v, "sensitivity"), _with_ci(v, "specificity"),
             _own(v)]
            for site, v in (metrics.get(PER_SITE) or {}).items()]


def markdown(header: list[str], body: list[list[str]]) -> list[str]:
    """A Markdown table (cells escaped for '|')."""
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return [cells(header), "|" + "---|" * len(header), *(cells(r) for r in body)]


def html_table(header: list[str], body: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    rows_html = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r)
                        + "</tr>" for r in body)
    return f"<table><tr>{head}</tr>{rows_html}</table>"


def split_role(split: str) -> str | None:
    """What a held-out site's split is, in words (None for any other split)."""
    site = siting.holdout_of(split)
    if site is None:
        return None
    return (f"held-out site {site}: never trained, tuned, thresholded or selected on, the "
            f"off-site estimate")


# --------------------------------------------------------------------------- evaluate's page


def evaluation_markdown(results: dict[str, dict]) -> list[str]:
    """Per-site tables of every split that has them, for evaluate's Markdown summary."""
    lines: list[str] = []
    for split, values in results.items():
        body = rows(values)
        if body:
            lines += ["", f"Per site on **{split}** (worst-site ROC AUC "
                          f"{_f(values.get('worst_site_auc'))}):", "", *markdown(HEADER, body)]
    return lines


def evaluation_html(results: dict[str, dict]) -> list[str]:
    """The same tables as HTML parts."""
    parts = []
    for split, values in results.items():
        body = rows(values)
        if body:
            parts += [f"<h3>Per site on {html.escape(split)}</h3>",
                      f"<p>{html.escape(NOTE)} Worst-site ROC AUC "
                      f"{_f(values.get('worst_site_auc'))}.</p>", html_table(HEADER, body)]
    return parts


# --------------------------------------------------------------------------- comparison


def comparison_rows(candidates: list[Any], split: str, order: list[str]) -> list[list[str]]:
    """Per model (in ``order``, the ranking) and site: the per-site numbers on ``split``."""
    by_name = {t.model_name: t for t in candidates}
    body = []
    for name in order:
        trial = by_name.get(name)
        if trial is None or split not in trial.splits:
            continue
        body += [[name, *row] for row in rows(trial.splits[split].metrics)]
    return body


def comparison_markdown(candidates: list[Any], splits: list[str], order: list[str]) -> list[str]:
    """The report's per-site section (empty when no split holds several sites)."""
    lines: list[str] = []
    for split in splits:
        body = comparison_rows(candidates, split, order)
        if body:
            lines += [f"### Per site on {split}", "", *markdown(["model", *HEADER], body), ""]
    return ["## Per site", "", NOTE, "", *lines] if lines else []


def comparison_html(candidates: list[Any], splits: list[str], order: list[str]) -> list[str]:
    parts = []
    for split in splits:
        body = comparison_rows(candidates, split, order)
        if body:
            parts += [f"<h3>Per site on {html.escape(split)}</h3>",
                      f'<div class="scroll">{html_table(["model", *HEADER], body)}</div>']
    return ["<h2>Per site</h2>", f'<p class="note">{html.escape(NOTE)}</p>', *parts] \
        if parts else []


# --------------------------------------------------------------------------- model card

SEVERAL_SITES = ("Trained and evaluated on several sites, scored per site above; no site was "
                 "held out, so a hospital unlike all of them may do worse still (hold one out "
                 "with holdout_site for that estimate).")


def has_sites(trial: Any) -> bool:
    """True when any split of ``trial`` was scored per site."""
    return any(data.metrics.get(PER_SITE) for data in trial.splits.values())



def card_section(best: Any, splits: list[str]) -> list[str]:
    """The model card's per-site section, and the held-out sites' estimates."""
    lines: list[str] = []
    for split in splits:
        body = rows(best.splits[split].metrics)
        if body:
            lines += ["", f"On `{split}`:", "", *markdown(HEADER, body)]
    held = [s for s in splits if siting.holdout_of(s)]
    for split in held:
        m = best.splits[split].metrics
        lines += ["", f"Held-out site **{siting.holdout_of(split)}** (`{split}`, {m.get('n')} "
                      f"images, never trained, tuned, thresholded or selected on): ROC AUC "
                      f"{_with_ci(m, 'roc_auc')}, sensitivity {_with_ci(m, 'sensitivity')}, "
                      f"specificity {_with_ci(m, 'specificity')}: the honest estimate for a "
                      f"hospital the model has not seen."]
    return ["", "## Performance per site", "", NOTE, *lines] if lines else []


# --------------------------------------------------------------------------- the pick


PICK_PREFIX = "Per site, the pick:"
HELD_PREFIX = "Held-out site"


def pick_lines(best: Any) -> list[str]:
    """One line with the pick's ROC AUC per site on each split of several sites, and one per
    held-out site: what the report's summary and ``make local`` print."""
    shown = [f"{split} " + ", ".join(f"{site} {_f(v.get('roc_auc'))}"
                                      for site, v in best.splits[split].metrics[PER_SITE].items())
             for split in best.splits if best.splits[split].metrics.get(PER_SITE)]
    lines = [f"{PICK_PREFIX} ROC AUC on {'; '.join(shown)}."] if shown else []
    for split, data in best.splits.items():
        site = siting.holdout_of(split)
        if site is not None:
            m = data.metrics
            lines.append(f"{HELD_PREFIX} {site} ({split}, {m.get('n')} images, never trained, "
                         f"tuned or selected on): ROC AUC {_with_ci(m, 'roc_auc')}, "
                         f"sensitivity {_f(m.get('sensitivity'))}, specificity "
                         f"{_f(m.get('specificity'))}.")
    return lines
