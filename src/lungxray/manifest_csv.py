"""Read a CSV manifest (``path,label[,split][,patient_id]``) into a source, every size bounded.

The file is parsed by the csv module with its bytes, line length, field length, fields per row
and row count all capped by :class:`Limits`; every path must stay inside the CSV's folder. Bad
rows are collected and raised together as one :class:`DataError`; problems with single files
are found later, when they are decoded.
"""

from __future__ import annotations

import csv
import os
import re
import stat
from collections.abc import Iterator
from pathlib import Path, PureWindowsPath
from typing import IO

from lungxray.errors import DataError, quote
from lungxray.limits import DEFAULT, Limits
from lungxray.sources import (
    SPLITS,
    ArraySet,
    FileSet,
    Item,
    Problems,
    Source,
    check_class_names,
    kind_of,
)

CSV_COLUMNS = ("path", "label")
CSV_OPTIONAL = ("split", "patient_id")

__all__ = ["CSV_COLUMNS", "CSV_OPTIONAL", "scan_csv"]


def _path_problem(text: str, limits: Limits = DEFAULT) -> str | None:
    """Why a CSV path may not be used, or None. Paths must stay inside the CSV's folder; their
    length is checked first, so resolving one can never take long. String checks only: this
    runs once per row of a manifest that may hold millions."""
    if not text:
        return "empty path"
    if len(text) > limits.max_path_chars:
        return (f"path {quote(text)} is longer than {limits.max_path_chars} characters "
                f"(max_path_chars)")
    if text[0] in "/\\" or _DRIVE.match(text):
        return f"absolute path {quote(text)} is not allowed; paths are relative to the CSV's folder"
    parts = _SEPARATORS.split(text)  # both '/' and '\\', as Windows tools write them
    if ".." in parts:
        return f"path {quote(text)} contains '..'; paths may not leave the CSV's folder"
    if max(map(len, parts)) > limits.max_path_component:
        return (f"path {quote(text)} has a component longer than {limits.max_path_component} "
                f"characters (max_path_component)")
    if "\0" in text:
        return f"path {quote(text)} holds a NUL character"
    return None


_DRIVE = re.compile(r"^[A-Za-z]:")
_SEPARATORS = re.compile(r"[\\/]")


def _bounded_lines(fh: IO[str], where: str, limit: int) -> Iterator[str]:
    """The lines of a text file, refusing one longer than ``limit`` characters as soon as it is
    seen: a 10-million-comma line is never parsed."""
    number = 0
    while line := fh.readline(limit + 2):  # room for "\r\n"
        number += 1
        if len(line.rstrip("\r\n")) > limit:
            raise DataError(f"{where}: line {number} is longer than {limit:,} characters "
                            f"(max_csv_line); starts {quote(line[:40])}")
        yield line


def _csv_records(path: Path, limits: Limits) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """Header and (line number, fields) rows of a CSV manifest, parsed by the csv module with
    every size bounded: file bytes, line length, field length, fields per row, row count."""
    size = path.stat().st_size
    if size > limits.max_csv_bytes:
        raise DataError(f"{path}: {size:,} bytes, above the limit of {limits.max_csv_bytes:,} "
                        f"(max_csv_bytes)")
    rows: list[tuple[int, list[str]]] = []
    reader = csv.reader([])
    if limits.max_csv_field >= csv.field_size_limit():
        # The csv module's own (process-wide) bound, 128 KiB, would cut a raised limit short;
        # it is only ever raised here, so other readers in the process lose nothing.
        csv.field_size_limit(limits.max_csv_field + 1)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(_bounded_lines(fh, str(path), limits.max_csv_line),
                                skipinitialspace=True, strict=True)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise DataError(f"{path}: empty file; expected a header path,label[,split]"
                                f"[,patient_id]")
            for record in reader:
                if not record or record == [""]:
                    continue  # blank line
                _check_record(path, reader.line_num, record, header, len(rows), limits)
                rows.append((reader.line_num, [value.strip() for value in record]))
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start} of a line: "
                        f"{quote(err.reason)})") from err
    except csv.Error as err:
        if "field larger than field limit" in str(err):  # the csv module's own bound (128 KiB)
            raise DataError(f"{path}: line {reader.line_num} has a field longer than "
                            f"{csv.field_size_limit():,} characters, above the limit of "
                            f"{limits.max_csv_field} (max_csv_field)") from err
        raise DataError(f"{path}: not a readable CSV ({quote(err)})") from err
    return header, rows


def _check_record(path: Path, line: int, record: list[str], header: list[str], count: int,
                  limits: Limits) -> None:
    """Stop at the first row over a limit, before reading on."""
    if len(record) > len(header):
        raise DataError(f"{path}: line {line} has {len(record):,} fields but the header has "
                        f"{len(header)}")
    longest = max(record, key=len)
    if len(longest) > limits.max_csv_field:
        raise DataError(f"{path}: line {line} has a field of {len(longest):,} characters, above "
                        f"the limit of {limits.max_csv_field} (max_csv_field): {quote(longest)}")
    if count >= limits.max_csv_rows:
        raise DataError(f"{path}: more than {limits.max_csv_rows:,} rows (max_csv_rows)")


def _row_file_problem(root: str, text: str) -> tuple[Path, str | None, str]:
    """(resolved path, structural problem, file problem) of a CSV path that passed
    _path_problem: a symlink out of the folder is structural, a FIFO or device the file's.
    os.path on strings: pathlib costs a few times more per row."""
    try:
        resolved = os.path.realpath(os.path.join(root, text))
    except (OSError, ValueError) as err:
        return Path(root, text), None, f"unresolvable path ({quote(err)})"
    if not resolved.startswith(root.rstrip(os.sep) + os.sep):
        return Path(resolved), f"path {quote(text)} leads outside the CSV's folder (symlink)", ""
    try:
        mode = os.stat(resolved).st_mode
    except (OSError, ValueError):
        return Path(resolved), None, ""  # missing: named when it is read
    if not stat.S_ISREG(mode):
        return Path(resolved), None, f"not a regular file ({kind_of(mode)})"
    return Path(resolved), None, ""


def scan_csv(path: Path, class_names: list[str] | None = None,
             limits: Limits = DEFAULT) -> Source:
    """A CSV with columns ``path,label`` and optionally ``split`` and ``patient_id``; paths
    are relative to the CSV's folder and may not leave it."""
    header, records = _csv_records(path, limits)
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected path,label[,split]"
                        f"[,patient_id], found {quote(header)}")
    if len(set(header)) < len(header):
        raise DataError(f"{path}: repeated column names in {quote(header)}")
    if not records:
        raise DataError(f"{path}: has a header but no rows")
    column = {name: header.index(name) for name in (*CSV_COLUMNS, *CSV_OPTIONAL) if name in header}
    root = path.parent.resolve()
    problems = Problems(limits.max_problems_shown)
    seen: dict[str, int] = {}
    labels: dict[str, set[str]] = {}
    rows: list[tuple[str, Path, str, str, str, str]] = []
    for line, record in records:
        record += [""] * (len(header) - len(record))
        fields = {name: record[i] for name, i in column.items()}
        # Backslashes are separators (exports from Windows tools); the file name is POSIX below.
        # An over-long path stays as it is: _path_problem refuses it before any parsing.
        raw = fields["path"]
        text = PureWindowsPath(raw).as_posix() if 0 < len(raw) <= limits.max_path_chars else raw
        row = _csv_row(root, line, text, fields, problems, seen, limits)
        if row is not None:
            rows.append(row)
            labels.setdefault(row[3], set()).add(row[2])
            if len(labels.get(row[3], ())) > limits.max_classes:
                raise DataError(f"{path}: more than {limits.max_classes} distinct labels "
                                f"(max_classes); is the label column right?")
    if problems:
        raise problems.error(str(path), "bad row(s)")
    every = set().union(*labels.values())
    if len(every) > limits.max_classes:
        raise DataError(f"{path}: {len(every)} distinct labels, above the limit of "
                        f"{limits.max_classes} (max_classes)")
    for split, have in labels.items():
        if have != every:
            problems.add(f"split '{split}' lacks classes {quote(sorted(every - have))}")
    if problems:
        raise problems.error(str(path), "class mismatch(es) between splits")
    names = check_class_names(str(path), "labels", sorted(every), class_names)
    index = {name: i for i, name in enumerate(names)}  # a dict: 150 000 labels stay linear
    splits: dict[str, FileSet | ArraySet] = {
        split: FileSet([Item(resolved, text, index[label], group, problem)
                        for text, resolved, label, split_of, group, problem in rows
                        if split_of == split])
        for split in SPLITS if split in labels}
    return Source("csv", path.parent, names, splits, flat="split" not in column,
                  extra_hashed=[path])


def _csv_row(root: Path, line: int, text: str, fields: dict[str, str], problems: Problems,
             seen: dict[str, int], limits: Limits) -> tuple[str, Path, str, str, str, str] | None:
    """(path, resolved path, label, split, patient, file problem) of one row, or None with its
    problems added."""
    before = problems.total
    where = f"line {line}"
    problem = _path_problem(text, limits)
    resolved, file_problem = root / text, ""
    if problem is None:
        resolved, problem, file_problem = _row_file_problem(str(root), text)
    if problem:
        problems.add(f"{where}: {problem}")
    if not fields["label"]:
        problems.add(f"{where}: empty label")
    split = fields.get("split", "train")
    if split not in SPLITS:
        problems.add(f"{where}: split {quote(split)} is not one of {list(SPLITS)}")
    if "patient_id" in fields and not fields["patient_id"]:
        problems.add(f"{where}: empty patient_id")
    if text and text in seen:
        problems.add(f"{where}: path {quote(text)} is listed more than once (first on line "
                     f"{seen[text]})")
    seen.setdefault(text, line)
    if problems.total > before:
        return None
    return text, resolved, fields["label"], split, fields.get("patient_id", ""), file_problem
