"""Assertions shared by the submit and schedule tests."""

from __future__ import annotations

import subprocess


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The CLI failed with exit code 2 and exactly one `error: ...` line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def task_caching(body: dict) -> list[bool]:
    """enableCache of every root DAG task in a sent run/recurring-run body."""
    sent = body["pipeline_spec"]
    spec = sent.get("pipeline_spec", sent)
    tasks = spec["root"]["dag"]["tasks"].values()
    return [t.get("cachingOptions", {}).get("enableCache", False) for t in tasks]
