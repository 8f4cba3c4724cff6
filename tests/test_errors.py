"""The project's error kinds and how a user's value is shown in a one-line message: quoted, cut
to its limit with its full length stated, control and undecodable characters escaped."""

from __future__ import annotations

import os

import pytest

from lungxray import errors


@pytest.mark.parametrize("kind, name", [(errors.DataError, "data"),
                                        (errors.ConfigError, "config"),
                                        (errors.ModelError, "model"),
                                        (errors.OutputError, "output")])
def test_every_kind_is_a_lungxray_error_and_a_value_error(kind, name):
    assert issubclass(kind, errors.LungxrayError) and issubclass(kind, ValueError)
    assert kind.kind == name
    with pytest.raises(ValueError, match="bad"):  # older callers catching ValueError still do
        raise kind("bad")


def test_a_users_value_is_quoted_and_cut_with_its_length():
    assert errors.quote("a b") == "'a b'"
    assert errors.quote(42) == "42"  # not a string: shown as is, unquoted
    long = errors.quote("x" * 10_000)
    assert long == "'" + "x" * errors.QUOTE_LIMIT + "'... (10000 characters)"
    assert errors.quote("abcdef", limit=3) == "'abc'... (6 characters)"
    assert errors.quote_repr(["a", 1]) == "['a', 1]"
    cut = errors.quote_repr(list(range(1000)), limit=10)
    assert cut == "[0, 1, 2, ... (4890 characters)"


def test_a_name_is_made_printable_on_one_line_keeping_every_character():
    assert errors.safe_name("scan 01.png") == "scan 01.png"
    assert errors.safe_name("two\nlines\t.png") == "two\\nlines\\t.png"
    undecodable = os.fsdecode(b"x\xff.png")  # the file system keeps it as a surrogate
    assert errors.safe_name(undecodable) == "x\\xff.png"
    assert errors.safe_name("é.png") == "é.png"
    assert "\n" not in errors.quote("a\nb")  # repr escapes a newline in a quoted value
