"""Draw the tuning plot (objective per trial, and the explored values against it) and write the
self-contained HTML summary of a search."""

from __future__ import annotations

import html
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: components and CI have no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.ticker import NullFormatter  # noqa: E402

from lungxray import pages, plots, spaces  # noqa: E402
from lungxray.hparams import DEFAULT_HPARAMS  # noqa: E402

PHASE_COLOURS = {"head": "tab:blue", "fine_tune": "tab:orange", "scratch": "tab:green"}
LOG_SCALE = {"learning_rate", "fine_tune_learning_rate"}
BOOLEAN = {"class_weighting"}


def hparam_columns(table: pd.DataFrame) -> list[str]:
    """The searched hyperparameters present in a trials table, in train's order."""
    return [name for name in DEFAULT_HPARAMS if name in table and table[name].notna().any()]


def plot_trials(table: pd.DataFrame, path: Path, title: str = "") -> None:
    """Top: objective per trial in run order (per phase) with the best so far. Below: one panel
    per hyperparameter, objective against the value tried."""
    params = hparam_columns(table)
    ncols = 4
    nrows = 1 + math.ceil(len(params) / ncols)
    fig = plt.figure(figsize=(4 * ncols, 3.2 * nrows))
    grid = fig.add_gridspec(nrows, ncols)
    ax = fig.add_subplot(grid[0, :])
    order = range(1, len(table) + 1)
    scores = table["score"].astype(float)
    for phase, rows in table.groupby("phase", sort=False):
        idx = [order[i] for i in rows.index]
        ax.scatter(idx, rows["score"].astype(float), label=phase,
                   color=PHASE_COLOURS.get(phase, "tab:gray"), zorder=3)
    ax.step(list(order), scores.cummax(), where="post", color="black", linewidth=1,
            label="best so far")
    ax.set_xlabel("trial (run order)")
    ax.set_ylabel("val_auc")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    for i, name in enumerate(params):
        ax = fig.add_subplot(grid[1 + i // ncols, i % ncols])
        for phase, rows in table.groupby("phase", sort=False):
            values = rows[name]
            if values.isna().all():
                continue
            ax.scatter(values.astype(float), rows["score"].astype(float), s=18,
                       color=PHASE_COLOURS.get(phase, "tab:gray"))
        if name in LOG_SCALE:
            ax.set_xscale("log")
            # Minor-tick labels of a narrow log range overlap into an unreadable smear.
            ax.xaxis.set_minor_formatter(NullFormatter())
            # Whole decades, so there are always labelled major ticks.
            tried = table[name].dropna().astype(float)
            ax.set_xlim(10 ** math.floor(math.log10(tried.min())),
                        10 ** math.ceil(math.log10(tried.max()) + 1e-9))
        elif name in BOOLEAN:
            ax.set_xticks([0, 1], ["False", "True"])
            ax.set_xlim(-0.5, 1.5)
        ax.set_xlabel(name)
        ax.set_ylabel("val_auc")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _table(rows: list[dict] | pd.DataFrame) -> str:
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
    return frame.to_html(index=False, escape=True, border=0, na_rep="",
                         float_format=lambda v: f"{v:.4g}")


def summary_html(best: dict, table: pd.DataFrame, plot: Path,
                 spaces_used: list[str]) -> str:
    """One self-contained page (the plot is embedded): the choice, the budget, each phase, the
    feature cache, every trial and the search spaces."""
    esc = html.escape
    png = plots.png_base64(Path(plot)) or ""
    chosen = [{"hyperparameter": k, "value": v} for k, v in best["hparams"].items()]
    setup = {k: best.get(k) for k in ("algorithm", "hyperband_factor", "max_trials", "epochs",
                                      "fine_tune_trials", "weights", "train_samples",
                                      "search_seconds", "trial_seconds")}
    phases = [{"phase": name, **info} for name, info in best["phases"].items()]
    space_rows = [row for name in spaces_used for row in spaces.describe(name)]
    parts = [
        f"<h1>Tuning {esc(best['model_name'])}</h1>",
        f"<p>Best {esc(best['objective'])} of the {esc(list(best['phases'])[-1])} phase, "
        f"whose trial gives the chosen hyperparameters: <b>{best['best_score']:.4f}</b> "
        f"({best['trials']} trials in all; each phase's best is in <i>Phases</i>).</p>",
        "<h2>Chosen hyperparameters</h2>", _table(chosen),
        "<h2>Search</h2>", _table([setup]),
        "<h2>Phases</h2>", _table(phases),
    ]
    if best.get("feature_cache"):
        cache = best["feature_cache"]
        rows = [{"split": s, "key": cache[s]["key"], "computed": cache[s]["computed"],
                 "seconds": cache[s]["seconds"]} for s in ("train", "val") if s in cache]
        parts += ["<h2>Feature cache</h2>",
                  f"<p>{cache['dim']}-dimensional pooled features in "
                  f"<code>{esc(cache['dir'])}</code>.</p>", _table(rows)]
    parts += [
        "<h2>Trials</h2>", plots.img_tag(png, "tuning plot"),
        _table(table),
        "<h2>Search spaces</h2>", _table(space_rows),
    ]
    return pages.page(f"Tuning {best['model_name']}", parts)
