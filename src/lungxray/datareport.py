"""Write the data report of a prepared dataset: ``data_report.html`` (self-contained, images
inlined as base64 PNG) and ``data_report.md`` (the same facts as text, for the KFP Markdown
viewer).

It shows counts per split and class (table and bar chart), sample images per class, the
intensity histogram per class, duplicates within and across splits, and skipped files.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from lungxray import pages, sites
from lungxray.artifacts import DATA_REPORT_HTML as HTML_FILE
from lungxray.artifacts import DATA_REPORT_MD as MARKDOWN_FILE

SAMPLES_PER_CLASS = 8
MAX_PAIRS = 5


# ---------------------------------------------------------------------------------------------
# Figures (object-oriented matplotlib: no pyplot state, safe in threads and components)
# ---------------------------------------------------------------------------------------------


def _png(fig: Figure) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def counts_chart(manifest: dict) -> str:
    """Grouped bars: images per class in each split (base64 PNG)."""
    classes, splits = manifest["class_names"], manifest["splits"]
    fig = Figure(figsize=(1.5 + 1.2 * len(splits) * max(1, len(classes)) / 2, 3.2))
    ax = fig.subplots()
    width = 0.8 / max(1, len(classes))
    for i, cls in enumerate(classes):
        x = np.arange(len(splits)) + i * width
        values = [split["counts"][cls] for split in splits.values()]
        bars = ax.bar(x, values, width, label=cls)
        ax.bar_label(bars, fontsize=8)
    ax.set_xticks(np.arange(len(splits)) + width * (len(classes) - 1) / 2, list(splits))
    ax.set_ylabel("images")
    ax.set_title("Images per split and class")
    ax.legend(fontsize=8)
    return _png(fig)


def _show(ax: Any, image: np.ndarray) -> None:
    if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])


def samples_grid(images: np.ndarray, labels: np.ndarray, class_names: list[str],
                 seed: int, split: str = "train") -> str:
    """A row of randomly chosen (seeded) images per class (base64 PNG)."""
    rng = np.random.default_rng(seed)
    columns = SAMPLES_PER_CLASS
    fig = Figure(figsize=(1.3 * columns, 1.4 * len(class_names)))
    axes = np.atleast_2d(fig.subplots(len(class_names), columns, squeeze=False))
    for row, cls in enumerate(class_names):
        members = np.flatnonzero(labels == row)
        chosen = np.sort(rng.choice(members, min(columns, len(members)), replace=False))
        for col in range(columns):
            ax = axes[row, col]
            if col < len(chosen):
                _show(ax, images[chosen[col]])
            else:
                ax.axis("off")
        axes[row, 0].set_ylabel(cls, rotation=0, ha="right", va="center")
    fig.suptitle(f"Sample images per class ({split})")
    return _png(fig)


def histogram_chart(histograms: np.ndarray, class_names: list[str]) -> str:
    """Pixel-intensity distribution per class, each normalised to sum 1 (base64 PNG)."""
    fig = Figure(figsize=(6, 3.2))
    ax = fig.subplots()
    for counts, cls in zip(histograms, class_names, strict=True):
        if counts.sum():
            ax.plot(np.arange(256), counts / counts.sum(), label=cls)
    ax.set_xlabel("pixel intensity (0-255)")
    ax.set_ylabel("share of pixels")
    ax.set_title("Intensity histogram per class (all splits)")
    ax.legend(fontsize=8)
    return _png(fig)


def pairs_chart(pairs: list[tuple[str, np.ndarray, str, np.ndarray]]) -> str:
    """Duplicate pairs side by side, each titled with where it sits (base64 PNG)."""
    fig = Figure(figsize=(3.2, 1.6 * len(pairs)))
    axes = fig.subplots(len(pairs), 2, squeeze=False)
    for row, (title_a, image_a, title_b, image_b) in enumerate(pairs):
        for col, (title, image) in enumerate(((title_a, image_a), (title_b, image_b))):
            _show(axes[row, col], image)
            axes[row, col].set_title(title, fontsize=6)
    fig.suptitle("Identical images in two splits")
    return _png(fig)


def add_histograms(histograms: np.ndarray, block: np.ndarray, labels: np.ndarray,
                   step: int = 1 << 22) -> None:
    """Add the pixel counts of a block of images to ``histograms[label]``; in slices, since
    bincount widens uint8 to 8-byte integers (a whole block would need 8 times its size)."""
    for label in np.unique(labels):
        pixels = block[labels == label].reshape(-1)
        for start in range(0, pixels.size, step):
            histograms[label] += np.bincount(pixels[start:start + step], minlength=256)


def histograms_of(splits: Mapping[str, Any], n_classes: int, rows: int = 1024) -> np.ndarray:
    """Per-class pixel histograms of prepared splits, read a chunk at a time."""
    histograms = np.zeros((n_classes, 256), dtype=np.int64)
    for split in splits.values():
        for start in range(0, len(split.labels), rows):
            add_histograms(histograms, np.asarray(split.images[start:start + rows]),
                           split.labels[start:start + rows])
    return histograms


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def _counts_rows(manifest: dict) -> list[tuple[str, int, list[int]]]:
    carved = manifest.get("carved", {})
    return [(f"{name} (carved from {carved[name]})" if name in carved else name, split["n"],
             [split["counts"][c] for c in manifest["class_names"]])
            for name, split in manifest["splits"].items()]


def _shift_lines(manifest: dict) -> tuple[str, list[list[Any]]]:
    """The shifted test split in words, and its per-feature shift rows (largest first)."""
    info = manifest.get("shift")
    if not info:
        return "", []
    text = (f"`test_shifted` ({info['n']} images) holds out {len(info['held_out_clusters'])} of "
            f"{info['n_clusters']} k-means clusters of image statistics, around a seeded anchor "
            f"cluster on the edge of that space: a proxy for images from another machine. It is "
            f"never tuned or thresholded on; candidates trained without it, only the refit of "
            f"the pick learns from it. Mean difference, held out minus kept, in "
            f"standard deviations:")
    rows = sorted(([name, f"{value:+.2f}"] for name, value in info["mean_shift_sd"].items()),
                  key=lambda row: -abs(float(row[1])))
    return text, rows


def markdown(manifest: dict) -> str:
    """The report as Markdown: the same facts as the HTML, without pictures."""
    classes = manifest["class_names"]
    lines = [f"# Dataset from `{manifest['source']}`", "",
             f"{manifest['image_size']}×{manifest['image_size']} px, "
             f"{manifest['channels']} channel(s), seed {manifest['seed']}, "
             f"source sha256 `{manifest['source_sha256'][:16]}…`", "",
             "| split | n | " + " | ".join(classes) + " |",
             "|---|---:|" + "---:|" * len(classes)]
    for name, n, counts in _counts_rows(manifest):
        lines.append(f"| {name} | {n} | " + " | ".join(map(str, counts)) + " |")
    if manifest.get("grouped_by") == "patient_id":
        lines += ["", "Splits are grouped by `patient_id`: one patient never spans a carved "
                      "split and another."]
    site_rows = sites.count_rows(manifest)
    if site_rows:
        lines += ["", sites.describe(manifest), "", "| site | split | n | " + " | ".join(classes)
                  + " |", "|---|---|---:|" + "---:|" * len(classes)]
        lines += ["| " + " | ".join(map(str, row)) + " |" for row in site_rows]
    shift_text, shift_rows = _shift_lines(manifest)
    if shift_text:
        lines += ["", shift_text, "", "| feature | shift (SD) |", "|---|---:|"]
        lines += [f"| {name} | {value} |" for name, value in shift_rows]
    lines += ["", "Images shared between splits (pixel-identical):", ""]
    for pair, info in manifest["cross_split_duplicates"].items():
        files = "; ".join(" = ".join(f"`{f}`" for f in pair_files)
                          for pair_files in info.get("files", []))
        lines.append(f"- {pair}: {info['count']}" + (f" (e.g. {files})" if files else ""))
    for pair, info in manifest.get("cross_split_patients", {}).items():
        lines.append(f"- patients in both {pair}: {info['count']}")
    within = manifest.get("within_split_duplicates", {})
    if within:
        lines += ["", "Duplicate images within a split (extra copies / groups / groups whose "
                      "copies disagree on the label):", ""]
        lines += [f"- {name}: {info['count']} / {info['groups']} / {info['label_conflicts']}"
                  for name, info in within.items()]
    skipped = manifest.get("skipped", [])
    lines += ["", f"Skipped files: {len(skipped)}"]
    if skipped:
        lines += ["", "| split | file | reason |", "|---|---|---|"]
        lines += [f"| {s['split']} | `{s['file']}` | {s['reason']} |" for s in skipped]
    if manifest.get("skipped_splits"):
        lines += ["", f"Splits dropped for having no usable images: "
                      f"{', '.join(manifest['skipped_splits'])}"]
    if manifest.get("ignored"):
        lines += ["", f"Files outside class folders, ignored: "
                      f"{', '.join(f'`{f}`' for f in manifest['ignored'])}"]
    lines += ["", f"Charts, sample images and intensity histograms: `{HTML_FILE}`."]
    return "\n".join(lines) + "\n"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="n">{v}</td>' if isinstance(v, int) else
                         f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>"
        for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _img(b64: str, alt: str) -> str:
    return f'<img src="data:image/png;base64,{b64}" alt="{html.escape(alt)}">'


def to_html(manifest: dict, figures: dict[str, str]) -> str:
    """The self-contained HTML report; ``figures`` maps names to base64 PNGs."""
    classes = manifest["class_names"]
    esc = html.escape
    fitting = ("padded to keep the aspect ratio" if manifest.get("keep_aspect")
               else "stretched to square")
    parts = [
        f"<h1>Data report: <code>{esc(manifest['source'])}</code></h1>",
        f"<p>{manifest['image_size']}×{manifest['image_size']} px, {manifest['channels']} "
        f"channel(s), {fitting}, seed {manifest['seed']}, splits grouped by "
        f"{esc(manifest.get('grouped_by', 'content'))}; source sha256 "
        f"<code>{esc(manifest['source_sha256'])}</code></p>",
        "<h2>Counts per split and class</h2>",
        _table(["split", "n", *classes],
               [[name, n, *counts] for name, n, counts in _counts_rows(manifest)]),
        _img(figures["counts"], "images per split and class"),
        *(["<h2>Counts per site</h2>", f"<p>{esc(sites.describe(manifest))}</p>",
           _table(["site", "split", "n", *classes], sites.count_rows(manifest))]
          if manifest.get("sites") else []),
        *(["<h2>Shifted test split</h2>", f"<p>{esc(_shift_lines(manifest)[0])}</p>",
           _table(["feature", "shift (SD)"], _shift_lines(manifest)[1])]
          if manifest.get("shift") else []),
        "<h2>Sample images per class</h2>", _img(figures["samples"], "sample images"),
        "<h2>Intensity histogram per class</h2>", _img(figures["histogram"], "histograms"),
        "<h2>Duplicates</h2><h3>Across splits</h3>",
        _table(["splits", "images with a copy in the other split", "examples"],
               [[pair, info["count"], "; ".join(" = ".join(p) for p in info.get("files", []))]
                for pair, info in manifest["cross_split_duplicates"].items()]),
    ]
    if "pairs" in figures:
        parts.append(_img(figures["pairs"], "duplicate pairs"))
    if manifest.get("cross_split_patients"):
        parts += ["<h3>Patients in two splits</h3>", _table(
            ["splits", "patients", "examples"],
            [[pair, info["count"], ", ".join(info["examples"])]
             for pair, info in manifest["cross_split_patients"].items()])]
    parts += ["<h3>Within a split</h3>", _table(
        ["split", "extra copies", "groups", "groups with conflicting labels", "examples"],
        [[name, info["count"], info["groups"], info["label_conflicts"],
          "; ".join(" = ".join(p) for p in info.get("files", []))]
         for name, info in manifest.get("within_split_duplicates", {}).items()])]
    skipped = manifest.get("skipped", [])
    parts.append(f"<h2>Skipped files ({len(skipped)})</h2>")
    if skipped:
        parts += ['<p class="warn">These files were left out (<code>skip_bad</code>).</p>',
                  _table(["split", "file", "reason"],
                         [[s["split"], s["file"], s["reason"]] for s in skipped])]
    if manifest.get("skipped_splits"):
        parts.append(f"<p class=\"warn\">Splits dropped for having no usable images: "
                     f"{esc(', '.join(manifest['skipped_splits']))}</p>")
    if manifest.get("ignored"):
        parts.append("<p>Files outside class folders, ignored: "
                     f"{esc(', '.join(manifest['ignored']))}</p>")
    return pages.page("lungxray data report", parts)


def write_report(directory: Path, manifest: dict, splits: Mapping[str, Any],
                 histograms: np.ndarray | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write ``data_report.html`` and ``data_report.md`` into ``directory``. ``splits`` maps
    names to objects with ``images`` and ``labels`` (memory-mapped is fine)."""
    classes = manifest["class_names"]
    if histograms is None:
        histograms = histograms_of(splits, len(classes))
    name = "train" if "train" in splits else next(iter(splits))
    figures = {"counts": counts_chart(manifest),
               "samples": samples_grid(splits[name].images, splits[name].labels, classes, seed,
                                       name),
               "histogram": histogram_chart(histograms, classes)}
    pairs = []
    for pair, info in manifest["cross_split_duplicates"].items():
        a, b = pair.split("/")
        for (i, j), files in zip(info["examples"], info.get("files", [[a, b]] * len(
                info["examples"])), strict=True):
            pairs.append((f"{a}: {files[0]}", splits[a].images[i],
                          f"{b}: {files[1]}", splits[b].images[j]))
    if pairs:
        figures["pairs"] = pairs_chart(pairs[:MAX_PAIRS])
    html_path, md_path = Path(directory) / HTML_FILE, Path(directory) / MARKDOWN_FILE
    html_path.write_text(to_html(manifest, figures), encoding="utf-8")
    md_path.write_text(markdown(manifest), encoding="utf-8")
    return html_path, md_path
