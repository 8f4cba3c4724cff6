"""One budget for every reader, checked before anything is allocated (docs/limits.md).

A value a real user may need to raise is a field here, settable per run; the defaults keep a
worker's peak memory bounded by one image at the limit, whatever a hostile file declares.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

MiB = 1 << 20


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what a reader will accept; every field is checked before allocating."""

    # A chest radiograph is at most ~4300² (18.5 MP); a mammogram ~23 MP.
    max_image_pixels: int = 40_000_000
    max_image_size: int = 1024  # --image-size: the prepared side, in pixels
    max_classes: int = 1000
    max_npz_member_bytes: int = 1024 * MiB  # decoded bytes of one .npz member
    max_csv_bytes: int = 256 * MiB
    max_csv_field: int = 4096  # characters in one CSV field (a path is at most this)
    max_csv_rows: int = 5_000_000
    max_path_chars: int = 4096
    max_path_component: int = 255
    max_json_bytes: int = 16 * MiB  # manifest.json, model_info.json, metrics.json, params files
    max_json_depth: int = 64
    max_model_config_bytes: int = 64 * MiB  # config.json inside a .keras archive
    max_model_folder_bytes: int = 8192 * MiB  # what compare or promotion copies
    # Readers (preprocess): added for issue 26's reader half.
    max_csv_line: int = 16384  # characters in one CSV line (a 10-million-comma line stops here)
    max_file_bytes: int = 256 * MiB  # one image file read into memory
    max_image_bytes: int = 256 * MiB  # decoded bytes of one image, and of an inflated DICOM
    max_decode_bytes: int = 1024 * MiB  # estimated decode memory of all workers at once
    max_problems_shown: int = 20  # problems named in one error line; the rest are counted


DEFAULT = Limits()


ENV_PREFIX = "LUNGXRAY_"  # e.g. LUNGXRAY_MAX_IMAGE_PIXELS=100000000 on a cluster pod


def names() -> list[str]:
    """Every limit's name, as ``--limit NAME=VALUE`` and the environment spell it."""
    return [f.name for f in fields(Limits)]


def with_overrides(base: Limits, pairs: Mapping[str, object] | Iterable[str]) -> Limits:
    """``base`` with some fields replaced, from a mapping or ``NAME=VALUE`` strings; a value is
    a positive integer (``_`` separators allowed). Raises ConfigError naming a bad one."""
    from lungxray.errors import ConfigError, quote

    items = pairs.items() if isinstance(pairs, Mapping) else (
        str(p).partition("=")[::2] for p in pairs)
    known = set(names())
    changes: dict[str, int] = {}
    for name, value in items:
        key = str(name).strip().lower().replace("-", "_")
        if key not in known:
            raise ConfigError(f"unknown limit {quote(str(name))}; known: "
                              f"{', '.join(sorted(known))}")
        try:
            number = int(str(value).strip().replace("_", ""))
        except ValueError:
            number = 0
        if number <= 0:
            raise ConfigError(f"limit {key} must be a positive integer, got {quote(str(value))}")
        changes[key] = number
    return replace(base, **changes)


def from_env(environ: Mapping[str, str] | None = None, base: Limits = DEFAULT) -> Limits:
    """``base`` with every ``LUNGXRAY_<LIMIT>`` environment variable applied: how a cluster
    raises a limit without a new pipeline parameter."""
    environ = os.environ if environ is None else environ
    found = {name: environ[ENV_PREFIX + name.upper()] for name in names()
             if ENV_PREFIX + name.upper() in environ}
    return with_overrides(base, found) if found else base
