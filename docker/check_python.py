"""Fail the image build unless this interpreter satisfies pyproject.toml's requires-python.

    python3 check_python.py pyproject.toml [X.Y]

Runs in the base image before anything is installed (no third-party packages, Python >= 3.8:
no tomllib), so a base image with an unsupported Python fails the build at once.
"""

from __future__ import annotations

import re
import sys

_CLAUSE = re.compile(r"^(>=|<=|==|!=|>|<|~=)\s*(\d+(?:\.\d+)*)$")


def requires_python(pyproject_text: str) -> str:
    """The requires-python string of a pyproject.toml."""
    match = re.search(r'^requires-python\s*=\s*"([^"]+)"', pyproject_text, re.MULTILINE)
    if not match:
        raise ValueError("pyproject.toml has no requires-python")
    return match.group(1)


def _key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def satisfies(version: str, spec: str) -> bool:
    """Whether X.Y[.Z] meets every clause of a simple specifier such as '>=3.11,<3.13'."""
    have = _key(version)
    for clause in filter(None, (c.strip() for c in spec.split(","))):
        match = _CLAUSE.match(clause)
        if not match:
            raise ValueError(f"unsupported requires-python clause {clause!r}")
        op, want = match.group(1), _key(match.group(2))
        mine = have[: len(want)] if op in ("==", "!=", "~=") else have
        ok = {">=": mine >= want, "<=": mine <= want, ">": mine > want, "<": mine < want,
              "==": mine == want, "!=": mine != want,
              "~=": have >= want and have[: len(want) - 1] == want[:-1]}[op]
        if not ok:
            return False
    return True


def main(argv: list[str]) -> int:
    with open(argv[1], encoding="utf-8") as handle:
        spec = requires_python(handle.read())
    version = argv[2] if len(argv) > 2 else ".".join(map(str, sys.version_info[:3]))
    if not satisfies(version, spec):
        print(f"check_python: this base image has Python {version}; lungxray requires "
              f"{spec}", file=sys.stderr)
        return 1
    print(f"check_python: Python {version} satisfies {spec}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
