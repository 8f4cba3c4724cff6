"""Print the pinned runtime requirements of pyproject.toml, one per line, for `pip install -r`.

The Dockerfiles install these in their own layer before the project wheel: the layer is rebuilt
only when the pins change, not on every commit, and the pre-baked weights layer after it stays
cached too.

Usage: python requirements.py PYPROJECT [EXTRA ...]
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path


def requirements(pyproject: Path, extras: list[str]) -> list[str]:
    """Return `project.dependencies` plus the requested optional-dependency groups, in order."""
    project = tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
    optional = project.get("optional-dependencies", {})
    unknown = [e for e in extras if e not in optional]
    if unknown:
        raise SystemExit(
            f"requirements.py: unknown extra(s) {', '.join(unknown)}; "
            f"pyproject defines: {', '.join(sorted(optional))}"
        )
    lines = list(project.get("dependencies", []))
    for extra in extras:
        lines.extend(optional[extra])
    return lines


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(requirements(Path(argv[0]), argv[1:])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
