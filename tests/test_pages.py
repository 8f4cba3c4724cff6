"""lungxray.pages: one skeleton and stylesheet for every HTML page."""

from __future__ import annotations

from pathlib import Path

import pytest

from lungxray import pages

SRC = Path(__file__).resolve().parents[1] / "src" / "lungxray"


def test_page_is_one_whole_document():
    page = pages.page("a <b> & c", ["<h1>x</h1>", "<p>y</p>"])
    assert page.startswith("<!DOCTYPE html>\n") and page.endswith("</body></html>\n")
    assert "<title>a &lt;b&gt; &amp; c</title>" in page
    assert page.count("<style>") == 1 and pages.CSS in page
    assert "<h1>x</h1>\n<p>y</p>" in page
    assert pages.page("t", "<p>one</p>") == pages.page("t", ["<p>one</p>"])


@pytest.mark.parametrize("module", ["report", "evaluation_report", "datareport", "tune_report"])
def test_every_html_writer_uses_the_shared_skeleton(module):
    source = (SRC / f"{module}.py").read_text()
    assert "pages.page(" in source
    assert "<!DOCTYPE" not in source and "<style" not in source
