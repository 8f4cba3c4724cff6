"""The one skeleton and stylesheet of every self-contained HTML page lungxray writes.

The data report, the tuning summary, an evaluation and the model comparison all go through
:func:`page`, so they look alike and a style fix is made once. Images are embedded by their
callers (``plots.img_tag``): a page is a single file that opens anywhere, the KFP UI included.
"""

from __future__ import annotations

import html
from collections.abc import Iterable

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;font-size:13px;margin:.5em 0}
td,th{border:1px solid #ccc;padding:3px 6px}th{background:#f0f0f0}td.n{text-align:right}
img{max-width:100%;margin:4px}.scroll{overflow-x:auto}.splits{display:flex;flex-wrap:wrap}
.best{background:#e8f5e9;padding:1em;border-left:4px solid #2e7d32}
.note{color:#555;font-size:13px}.warn{background:#fff3e0;padding:.6em;border-left:4px solid #ef6c00}
"""


def page(title: str, body: str | Iterable[str]) -> str:
    """A whole HTML document: ``title`` (plain text, escaped here) and ``body`` (HTML, or HTML
    parts joined by newlines) with the shared stylesheet."""
    parts = [body] if isinstance(body, str) else list(body)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style></head><body>",
        *parts,
        "</body></html>",
    ]) + "\n"
