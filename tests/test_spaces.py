"""The search spaces as documented (describe): every name once, every default inside its own
range, the scratch space's learning rates below the pretrained head's."""

from __future__ import annotations

import pytest

from lungxray import spaces


def _numbers(values: str) -> tuple[float, float]:
    low, _, rest = values.partition(" – ")
    return float(low), float(rest.split(" step ")[0])


@pytest.mark.parametrize("space", sorted(spaces.SPACES))
def test_every_default_lies_inside_its_range(space):
    rows = spaces.describe(space)
    names = [row["name"] for row in rows]
    assert len(names) == len(set(names)) and all(row["space"] == space for row in rows)
    for row in rows:
        if row["type"] == "Float":
            low, high = _numbers(row["values"])
            assert low <= row["default"] <= high, row
        elif row["type"] == "Choice":
            assert str(row["default"]) in row["values"].split(", "), row
        else:
            assert row["type"] == "Boolean" and isinstance(row["default"], bool), row


def test_scratch_learning_rates_are_below_the_pretrained_heads():
    head = {r["name"]: r for r in spaces.describe("head")}
    scratch = {r["name"]: r for r in spaces.describe("scratch")}
    assert _numbers(scratch["learning_rate"]["values"])[1] < _numbers(
        head["learning_rate"]["values"])[1]
    assert head["learning_rate"]["sampling"] == scratch["learning_rate"]["sampling"] == "log"
    assert "standardize" in scratch and "standardize" not in head  # features cached without it
