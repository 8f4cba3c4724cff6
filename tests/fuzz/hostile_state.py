"""Builders of hostile parameter files, JSON files and model folders (issue 26, part B): small
on disk, built in a second or less (the 2.7 GB config.json in a few), yet each expands to
gigabytes, nests past any stack or escapes its folder. Used by tests/test_schema.py,
tests/test_integrity.py and, at full size, by ``python -m tests.fuzz.hostile_state DIR``
(the corpus measured in the report)."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path


def alias_bomb_yaml(levels: int = 9, width: int = 9) -> str:
    """~400 bytes of YAML whose aliases expand to width**levels strings (9**9 = 387 M)."""
    lines = [f"a0: &a0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    lines.append(f"base_models: *a{levels - 1}")
    return "\n".join(lines) + "\n"


def deep_yaml(depth: int = 100_000) -> str:
    """``epochs: [[[...]]]`` nested ``depth`` deep."""
    return "epochs: " + "[" * depth + "]" * depth + "\n"


def deep_json(depth: int = 100_000, key: str = "epochs") -> str:
    """``{"key": [[[...]]]}`` nested ``depth`` deep."""
    return json.dumps({key: 0}).replace("0", "[" * depth + "]" * depth)


def keras_bomb(path: Path, config_bytes: int, chunk: int = 1 << 24) -> Path:
    """A .keras zip whose config.json inflates to ``config_bytes`` (spaces then ``{}``: valid
    JSON) from a small file; written in chunks, so building it takes little memory."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        archive.writestr("metadata.json", json.dumps({"keras_version": "3"}))
        with archive.open("config.json", "w", force_zip64=True) as fh:
            left = config_bytes - 2
            while left > 0:
                n = min(chunk, left)
                fh.write(b" " * n)
                left -= n
            fh.write(b"{}")
    return path


def model_folder_with_link(folder: Path, target: Path, name: str = "model.keras") -> Path:
    """A trained model folder where ``name`` is a link to ``target`` (outside, /dev/zero)."""
    link = folder / name
    if link.exists() or link.is_symlink():
        link.unlink()
    link.symlink_to(target)
    return folder


def build_corpus(root: Path) -> dict[str, Path]:
    """The full-size files of the table's rows that need no trained model."""
    root.mkdir(parents=True, exist_ok=True)
    files = {
        "alias_bomb.yaml": alias_bomb_yaml(),
        "deep.yaml": deep_yaml(),
        "deep.json": deep_json(),
        "negative.yaml": "epochs: -5\nbatch_size: 0\nimage_size: 100000\n",
        "deep_model_info.json": deep_json(100_000, "model_name"),
        "bad_hparams.json": json.dumps({"hparams": {"dropout": "x"}}),
        "junk.weights.h5": "this is not HDF5\n" * 100,
    }
    out = {}
    for name, text in files.items():
        (root / name).write_text(text)
        out[name] = root / name
    out["bomb.keras"] = keras_bomb(root / "bomb.keras", int(2.7e9))
    return out


if __name__ == "__main__":
    for name, path in build_corpus(Path(sys.argv[1])).items():
        print(f"{name}: {path.stat().st_size} bytes")
