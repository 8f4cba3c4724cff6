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

from lungxray.errors import DataError, quote, safe_name
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

__all__ = ["CSV_COLUMNS", "CSV_OPTIONAL", "RowPaths", "csv_records", "list_paths", "row_path",
           "scan_csv"]


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


def csv_records(path: Path, limits: Limits) -> Iterator[tuple[int, list[str]]]:
    """(line number, stripped fields) of a CSV's header, then of each row, parsed by the csv
    module as the file is read (a row at a time in memory) with every size bounded: file bytes,
    line length, field length, fields per row, row count. Blank lines are skipped."""
    size = path.stat().st_size
    if size > limits.max_csv_bytes:
        raise DataError(f"{safe_name(str(path))}: {size:,} bytes, above the limit of "
                        f"{limits.max_csv_bytes:,} (max_csv_bytes)")
    reader = csv.reader([])
    if limits.max_csv_field >= csv.field_size_limit():
        # The csv module's own (process-wide) bound, 128 KiB, would cut a raised limit short;
        # it is only ever raised here, so other readers in the process lose nothing.
        csv.field_size_limit(limits.max_csv_field + 1)
    try:
        with open(path, encoding="utf-8-sig", newline="") as fh:
            reader = csv.reader(_bounded_lines(fh, safe_name(str(path)), limits.max_csv_line),
                                skipinitialspace=True, strict=True)
            header = [name.strip() for name in next(reader, [])]
            if not header:
                raise DataError(f"{safe_name(str(path))}: empty file; expected a header line")
            yield reader.line_num, header
            count = 0
            for record in reader:
                if not record or record == [""]:
                    continue  # blank line
                _check_record(path, reader.line_num, record, header, count, limits)
                count += 1
                yield reader.line_num, [value.strip() for value in record]
    except UnicodeDecodeError as err:
        raise DataError(f"{safe_name(str(path))}: not UTF-8 text (byte {err.start} of a line: "
                        f"{quote(err.reason)})") from err
    except csv.Error as err:
        if "field larger than field limit" in str(err):  # the csv module's own bound (128 KiB)
            raise DataError(f"{safe_name(str(path))}: line {reader.line_num} has a field longer "
                            f"than {csv.field_size_limit():,} characters, above the limit of "
                            f"{limits.max_csv_field} (max_csv_field)") from err
        raise DataError(f"{safe_name(str(path))}: not a readable CSV ({quote(err)})") from err


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


_MAX_FOLDERS = 65536  # resolved folders remembered while checking a CSV's rows


class RowPaths:
    """Checks CSV paths relative to a resolved folder ``root``: string checks first (length,
    absolute, '..'), then the file system's (a symlink out of the folder is structural, a FIFO
    or device the file's problem, a missing file's problem ``missing``; "" means it is named
    when read). Each row's folder is resolved once (a CSV of millions of rows names a few
    folders), then one ``lstat`` per row looks at the file; only a symlink is resolved whole."""

    def __init__(self, root: str, limits: Limits = DEFAULT, missing: str = "") -> None:
        self.root, self.limits, self.missing = root, limits, missing
        self._inside = root.rstrip(os.sep) + os.sep
        self._folders: dict[str, str] = {}

    def _folder(self, head: str) -> str:
        real = self._folders.get(head)
        if real is None:
            real = os.path.realpath(os.path.join(self.root, head)) if head else self.root
            if len(self._folders) >= _MAX_FOLDERS:
                self._folders.clear()  # memory stays bounded whatever the CSV names
            self._folders[head] = real
        return real

    def check(self, text: str) -> tuple[str, str | None, str]:
        """(resolved path, structural problem, file problem) of one row's path. os.path on
        strings: pathlib costs a few times more per row."""
        problem = _path_problem(text, self.limits)
        if problem is not None:
            return os.path.join(self.root, text), problem, ""
        head, _, name = text.rpartition("/")
        try:
            resolved = os.path.join(self._folder(head), name)
            try:
                mode: int | None = os.lstat(resolved).st_mode
            except OSError:
                mode = None  # missing (or a file where a folder should be)
            if mode is not None and stat.S_ISLNK(mode):
                resolved = os.path.realpath(resolved)
                mode = os.stat(resolved).st_mode if os.path.exists(resolved) else None
        except (OSError, ValueError) as err:
            return os.path.join(self.root, text), None, f"unresolvable path ({quote(err)})"
        if not resolved.startswith(self._inside):
            return resolved, f"path {quote(text)} leads outside the CSV's folder (symlink)", ""
        if mode is None:
            return resolved, None, self.missing
        if not stat.S_ISREG(mode):
            return resolved, None, f"not a regular file ({kind_of(mode)})"
        return resolved, None, ""


def _header(path: Path, header: list[str], required: tuple[str, ...], expected: str) -> list[str]:
    """The header, with every ``required`` column, each column once."""
    missing = [c for c in required if c not in header]
    if missing:
        raise DataError(f"{safe_name(str(path))}: missing column(s) {missing}; expected "
                        f"{expected}, found {quote(header)}")
    if len(set(header)) < len(header):
        raise DataError(f"{safe_name(str(path))}: repeated column names in {quote(header)}")
    return header


def row_path(raw: str, limits: Limits = DEFAULT) -> str:
    """A CSV path as POSIX text: backslashes are separators too (exports from Windows tools).
    An over-long path stays as it is: :class:`RowPaths` refuses it before any parsing."""
    if not 0 < len(raw) <= limits.max_path_chars:
        return raw
    parts = raw.split("/")
    if "\\" not in raw and ":" not in raw and "" not in parts and "." not in parts:
        return raw  # already POSIX and normal: the common case, without pathlib's parsing
    return PureWindowsPath(raw).as_posix()


def list_paths(path: Path, limits: Limits = DEFAULT,
               missing: str = "") -> Iterator[tuple[int, str, str, str | None, str]]:
    """(line, path as written in POSIX form, resolved path, structural problem, file problem)
    of each row of a CSV with a ``path`` column (other columns ignored), streamed: rows are
    checked as they are read, within the limits. The header is checked at the first ``next``.
    What predict reads; :func:`scan_csv` checks a labelled manifest's rows the same way."""
    records = csv_records(path, limits)
    column = _header(path, next(records)[1], ("path",), "a 'path' column").index("path")
    paths = RowPaths(str(path.parent.resolve()), limits, missing)
    for line, record in records:
        text = row_path(record[column] if column < len(record) else "", limits)
        yield line, text, *paths.check(text)


def scan_csv(path: Path, class_names: list[str] | None = None,
             limits: Limits = DEFAULT) -> Source:
    """A CSV with columns ``path,label`` and optionally ``split`` and ``patient_id``; paths
    are relative to the CSV's folder and may not leave it."""
    records = csv_records(path, limits)
    header = _header(path, next(records)[1], CSV_COLUMNS, "path,label[,split][,patient_id]")
    column = {name: header.index(name) for name in (*CSV_COLUMNS, *CSV_OPTIONAL) if name in header}
    paths = RowPaths(str(path.parent.resolve()), limits)
    problems = Problems(limits.max_problems_shown)
    seen: dict[str, int] = {}
    labels: dict[str, set[str]] = {}
    rows: list[tuple[str, Path, str, str, str, str]] = []
    for line, record in records:
        record += [""] * (len(header) - len(record))
        fields = {name: record[i] for name, i in column.items()}
        row = _csv_row(paths, line, row_path(fields["path"], limits), fields, problems, seen)
        if row is not None:
            rows.append(row)
            labels.setdefault(row[3], set()).add(row[2])
            if len(labels.get(row[3], ())) > limits.max_classes:
                raise DataError(f"{path}: more than {limits.max_classes} distinct labels "
                                f"(max_classes); is the label column right?")
    if problems:
        raise problems.error(str(path), "bad row(s)")
    if not rows:
        raise DataError(f"{safe_name(str(path))}: has a header but no rows")
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


def _csv_row(paths: RowPaths, line: int, text: str, fields: dict[str, str], problems: Problems,
             seen: dict[str, int]) -> tuple[str, Path, str, str, str, str] | None:
    """(path, resolved path, label, split, patient, file problem) of one row, or None with its
    problems added."""
    before = problems.total
    where = f"line {line}"
    resolved, problem, file_problem = paths.check(text)
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
    return text, Path(resolved), fields["label"], split, fields.get("patient_id", ""), file_problem
