"""The project's error kinds: every input problem is a :class:`LungxrayError`, one line long.

The CLI and the components print such an error as one line and exit 2; any other exception is a
bug and keeps its traceback. Each kind subclasses ``ValueError`` so older callers that catch
``ValueError`` keep working.
"""

from __future__ import annotations

QUOTE_LIMIT = 120  # characters of a user's value shown in a message


class LungxrayError(ValueError):
    """An input, setting or stored file that cannot be used; the message names what and where."""

    kind = "error"


class DataError(LungxrayError):
    """Input data (a source, an image, a prepared dataset) that cannot be used."""

    kind = "data"


class ConfigError(LungxrayError):
    """A parameter, a parameter file or a command-line setting that cannot be used."""

    kind = "config"


class ModelError(LungxrayError):
    """A model folder or model file that cannot be used."""

    kind = "model"


class OutputError(LungxrayError):
    """An output that cannot be written (a full disk or quota, an I/O error); the message names
    the path and, for a full disk, the bytes it needs; nothing half-written is left behind."""

    kind = "output"


def safe_name(text: str) -> str:
    """``text`` printable on one UTF-8 line, every character kept: bytes that are not UTF-8
    (which the file system's decoding keeps as surrogates, e.g. ``b'\\xff'``) become ``\\xNN``,
    control characters (a newline in a file name) their escapes. Names are data: any name the
    file system allows can be written this way into a CSV, JSON or a log line."""
    if text.isprintable():  # the usual case, at C speed: a CSV may hold millions of names
        return text
    return "".join(c if c.isprintable() else
                   f"\\x{ord(c) - 0xDC00:02x}" if "\udc80" <= c <= "\udcff" else
                   repr(c)[1:-1] for c in text)


def quote(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr`` of a user's value cut to ``limit`` characters, stating its full length when cut,
    so that a 10 MB field never ends up in an error line."""
    text = value if isinstance(value, str) else str(value)
    if len(text) <= limit:
        return repr(text) if isinstance(value, str) else text
    head = text[:limit]
    shown = repr(head) if isinstance(value, str) else head
    return f"{shown}... ({len(text)} characters)"


def quote_repr(value: object, limit: int = QUOTE_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, stating its full length when cut (for any
    value, e.g. a list or mapping from a parameter file)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
