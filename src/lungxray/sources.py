"""Find out what a raw source holds, without decoding any image yet.

A source is a MedMNIST-style ``.npz``, a folder tree ``<root>/[train|val|test/]<CLASS>/...``, a
CSV manifest ``path,label[,split][,patient_id]``, any of them on ``gs://``, or the name of a
published dataset. It is described as a :class:`Source`: class names and, per given
split, either a list of files (:class:`FileSet`) or an ``.npz`` member read in chunks
(:class:`ArraySet`). Structural problems (missing keys, classes that differ between splits,
paths escaping the CSV's folder, ...) are collected and raised together as one
:class:`DataError`; problems with single files are found later, when they are decoded.
Folders and ``.npz`` files are scanned here, CSV manifests by :mod:`lungxray.manifest_csv`;
:mod:`lungxray.raw_source` turns a source string into a :class:`Source` through them.
"""

from __future__ import annotations

import contextlib
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import numpy as np

from lungxray.errors import QUOTE_LIMIT, DataError, quote, safe_name
from lungxray.limits import DEFAULT, Limits
from lungxray.safeio import kind_of

SPLITS = ("train", "val", "test")
# MedMNIST .npz files carry no class names; these are the official ones from its INFO table.
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}
# Operating-system litter that is never data; hidden names (".DS_Store", "._x") are skipped too.
JUNK = {"__MACOSX", "Thumbs.db", "desktop.ini"}


__all__ = ["SPLITS", "ArraySet", "DataError", "FileSet", "Item", "Source", "image_members",
           "problems_error", "safe_name", "scan_folder", "scan_npz", "walk_files"]


def problems_error(where: str, what: str, problems: list[str], hint: str = "",
                   total: int | None = None,
                   shown: int = DEFAULT.max_problems_shown) -> DataError:
    """One error, on one line (the CLI's convention), naming the first ``shown`` problems and
    counting the rest: 100 000 bad rows must not make a 10 MB message."""
    total = len(problems) if total is None else total
    text = "; ".join(p.replace("\n", " ").replace("\r", " ") for p in problems[:shown])
    if total > min(shown, len(problems)):
        text += f"; ... and {total - min(shown, len(problems))} more"
    return DataError(f"{where}: {total} {what}{hint}: {text}")


class Problems:
    """Collects problem lines, keeping the first few and counting the rest (bounded memory)."""

    def __init__(self, keep: int = DEFAULT.max_problems_shown) -> None:
        self.kept: list[str] = []
        self.total = 0
        self.keep = keep

    def add(self, text: str) -> None:
        self.total += 1
        if len(self.kept) < self.keep:
            self.kept.append(text)

    def __bool__(self) -> bool:
        return self.total > 0

    def error(self, where: str, what: str, hint: str = "") -> DataError:
        return problems_error(where, what, self.kept, hint, self.total, self.keep)


def shown(text: str) -> str:
    """A user's name or path for a message: printable, cut to a readable length."""
    text = safe_name(text)
    return text if len(text) <= QUOTE_LIMIT else f"{text[:QUOTE_LIMIT]}... ({len(text)} characters)"


@dataclass(frozen=True)
class Item:
    """One image file: where it is, how reports name it, its label and its patient."""

    path: Path
    origin: str  # POSIX path relative to the source root: stable across machines and caches
    label: int
    group: str = ""  # patient id; "" when the source has none
    problem: str = ""  # known unusable before decoding (a FIFO, a non-UTF-8 name): skippable


@dataclass
class FileSet:
    """A split whose images are separate files."""

    items: list[Item]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> np.ndarray:
        return np.array([item.label for item in self.items], dtype=np.int64)


@dataclass
class ArraySet:
    """A split stored as ``<split>_images`` in an ``.npz``, read a chunk at a time."""

    npz: Path
    key: str
    shape: tuple[int, ...]  # (N, H, W, C), channel axis added for grey files
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # none: unlabeled

    def __len__(self) -> int:
        return self.shape[0]

    def rows_within(self, nbytes: int) -> int:
        """Images per chunk so that a chunk holds at most ``nbytes`` (at least one image)."""
        return max(1, nbytes // max(1, math.prod(self.shape[1:])))

    def origin(self, index: int) -> str:
        return f"{self.key}[{index}]"

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive ``(rows, H, W, C)`` blocks; a compressed member is inflated as it goes,
        so the whole array never sits in memory."""
        try:
            with zipfile.ZipFile(self.npz) as archive, archive.open(f"{self.key}.npy") as fp:
                _read_header(fp, f"{self.npz}:{self.key}")
                per_image = math.prod(self.shape[1:])
                for start in range(0, len(self), rows):
                    count = min(rows, len(self) - start)
                    buffer = fp.read(count * per_image)
                    if len(buffer) != count * per_image:
                        raise DataError(f"{self.npz}:{self.key}: truncated after image {start}")
                    yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])
        except _ZIP_ERRORS as err:
            if isinstance(err, DataError):
                raise
            raise DataError(f"{self.npz}:{self.key}: cannot read ({quote(err)})") from err


@dataclass
class Source:
    """What a raw source holds: per given split a FileSet or an ArraySet."""

    kind: str  # "npz", "folder" or "csv"
    root: Path  # the local file or folder (a cache copy for gs://)
    class_names: list[str]
    splits: dict[str, FileSet | ArraySet]
    flat: bool = False  # no split information: everything sits in "train"
    ignored: list[str] = field(default_factory=list)  # files that are not data, by design
    extra_hashed: list[Path] = field(default_factory=list)  # e.g. the CSV, part of the digest

    @property
    def native_size(self) -> int | None:
        shapes = [s.shape for s in self.splits.values() if isinstance(s, ArraySet)]
        return max(shapes[0][1:3]) if shapes else None

    @property
    def native_channels(self) -> int | None:
        shapes = [s.shape for s in self.splits.values() if isinstance(s, ArraySet)]
        return shapes[0][3] if shapes else None


# ---------------------------------------------------------------------------------------------
# .npz
# ---------------------------------------------------------------------------------------------


def _read_header(fp: IO[bytes], where: str = ".npy") -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from a ``.npy`` header, read with numpy's own parser;
    anything wrong with it (a truncated header, junk, a version numpy does not know) is a
    DataError, since its parser raises many kinds (ValueError, SyntaxError, TokenError, ...)."""
    try:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except (zipfile.BadZipFile, zlib.error, NotImplementedError, RuntimeError) as err:
        raise DataError(f"{where}: cannot read ({quote(err)})") from err
    except Exception as err:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise DataError(f"{where}: invalid .npy header ({type(err).__name__}: "
                        f"{quote(err)})") from err
    # Every dimension, and their product even when one is 0, must fit numpy's index type.
    if not all(isinstance(n, int) and n >= 0 for n in shape) or (
            math.prod(n for n in shape if n) * dtype.itemsize >= 2**62):
        raise DataError(f"{where}: invalid .npy header (shape {quote(shape)})")
    return tuple(shape), bool(fortran), dtype


# What zipfile raises on a damaged or odd archive: bad headers, CRC, deflate errors,
# unsupported compression (NotImplementedError), encryption (RuntimeError).
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, zlib.error,
               ValueError, NotImplementedError, RuntimeError)


@contextlib.contextmanager
def _open_member(archive: zipfile.ZipFile, key: str, where: str) -> Iterator[IO[bytes]]:
    """A member of an npz, any archive error while opening or reading it a DataError."""
    try:
        with archive.open(f"{key}.npy") as fp:
            yield fp
    except DataError:
        raise
    except _ZIP_ERRORS as err:
        raise DataError(f"{where}: cannot read ({type(err).__name__}: {quote(err)})") from err


def _image_member(archive: zipfile.ZipFile, key: str,
                  limits: Limits) -> tuple[tuple[int, ...], list[str]]:
    """An images member's shape (N, H, W, C) and what is wrong with it, from its header alone:
    layout, dtype, pixels per image, and a member too short for what it declares (a 216-byte
    member declaring 10**12 images is refused here, not when the images are read)."""
    with _open_member(archive, key, key) as fp:
        shape, fortran, dtype = _read_header(fp, key)
        stored = archive.getinfo(f"{key}.npy").file_size - fp.tell()
    if len(shape) == 3:
        shape = (*shape, 1)
    problems = _image_member_problems(key, shape, fortran, dtype, limits)
    declared = math.prod(shape) * dtype.itemsize
    if not problems and declared > stored:
        problems.append(f"{key}: declares {'x'.join(map(str, shape))} of {dtype} = "
                        f"{declared:,} bytes but holds {max(stored, 0):,} (truncated)")
    return shape, problems


def _check_member_bytes(where: str, shape: tuple[int, ...], dtype: np.dtype, limit: int) -> int:
    """Decoded bytes the header declares, refused above ``limit`` before anything is inflated."""
    if dtype.hasobject:
        raise DataError(f"{where}: holds Python objects (a pickle), which are never loaded")
    size = math.prod(shape) * dtype.itemsize  # Python ints: (10**12,) cannot overflow
    if size > limit:
        raise DataError(f"{where}: declares {'x'.join(map(str, shape)) or 'a scalar'} of "
                        f"{dtype} = {size:,} bytes, above the limit of {limit:,} "
                        f"(max_npz_member_bytes)")
    return size


def _read_member(archive: zipfile.ZipFile, key: str, where: str, limit: int) -> np.ndarray:
    """One small member (labels) read after its header passed the byte limit, so a member
    that deflates to gigabytes is refused at its header."""
    with _open_member(archive, key, where) as fp:
        shape, fortran, dtype = _read_header(fp, where)
        size = _check_member_bytes(where, shape, dtype, limit)
        buffer = fp.read(size)
    if len(buffer) != size:
        raise DataError(f"{where}: truncated ({len(buffer):,} of {size:,} bytes)")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order="F" if fortran else "C")


def _open_npz(path: Path) -> tuple[zipfile.ZipFile, set[str]]:
    """The archive and its ``.npy`` member keys; a damaged archive is a DataError."""
    try:
        archive = zipfile.ZipFile(path)
        return archive, {n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")}
    except _ZIP_ERRORS as err:
        raise DataError(f"{safe_name(str(path))}: not a readable .npz file ({quote(err)})") from err


def image_members(path: Path, limits: Limits = DEFAULT) -> list[ArraySet]:
    """The image members of an unlabeled ``.npz`` (``images``, ``<split>_images``; labels are
    ignored), each header checked as :func:`scan_npz` checks it, before anything is inflated.
    What predict reads; every problem is named in one error."""
    archive, keys = _open_npz(path)
    found: list[ArraySet] = []
    problems: list[str] = []
    with archive:
        for key in ("images", *(f"{s}_images" for s in SPLITS)):
            if key not in keys:
                continue
            try:
                shape, wrong = _image_member(archive, key, limits)
            except DataError as err:
                problems.append(str(err))
                continue
            problems += wrong
            if not wrong:
                found.append(ArraySet(path, key, tuple(int(n) for n in shape)))
    if problems:
        raise problems_error(safe_name(str(path)), "problem(s) with its image members", problems)
    if not found:
        raise DataError(f"{safe_name(str(path))}: no image key (expected 'images' or "
                        f"'<split>_images'; found: {shown(', '.join(sorted(keys)) or 'nothing')})")
    return found


def scan_npz(path: Path, class_names: list[str] | None = None,
             limits: Limits = DEFAULT) -> Source:
    """Validate a MedMNIST-style ``.npz`` (``<split>_images`` / ``<split>_labels``) and describe
    it; only the labels are loaded. Every wrong key, shape or dtype is named in one error."""
    archive, keys = _open_npz(path)
    problems: list[str] = []
    splits: dict[str, FileSet | ArraySet] = {}
    with archive:
        for name in SPLITS:
            image_key, label_key = f"{name}_images", f"{name}_labels"
            if (image_key in keys) != (label_key in keys):
                have, lack = (image_key, label_key) if image_key in keys else (label_key, image_key)
                problems.append(f"has {have} but not its pair {lack}")
                continue
            if image_key not in keys:
                continue
            split = _npz_split(path, archive, image_key, label_key, problems, limits)
            if split is not None:
                splits[name] = split
    if not splits and not problems:
        expected = ", ".join(f"{s}_images/{s}_labels" for s in SPLITS)
        found = shown(", ".join(sorted(keys)) or "nothing")
        problems.append(f"no split keys (expected some of {expected}; found: {found})")
    shapes = {name: s.shape[1:] for name, s in splits.items()}
    if len(set(shapes.values())) > 1:
        problems.append("images differ in shape between splits: " + ", ".join(
            f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items()))
    if problems:
        raise problems_error(str(path), "problem(s) with its keys, shapes or dtypes", problems)
    n_classes = int(max((s.labels.max() + 1 for s in splits.values() if len(s)), default=0))
    if n_classes > limits.max_classes:
        raise DataError(f"{path}: labels go up to {n_classes - 1}; at most {limits.max_classes} "
                        f"classes are supported (labels must be 0..K-1; max_classes)")
    if class_names is None:
        stem = path.name.split(".")[0].split("_")[0].lower()
        class_names = MEDMNIST_CLASS_NAMES.get(stem, [str(i) for i in range(n_classes)])
    if n_classes > len(class_names):
        raise DataError(f"{path}: labels go up to {n_classes - 1} but only {len(class_names)} "
                        f"class names are known ({quote(class_names)})")
    return Source("npz", path, list(class_names), splits)


def _image_member_problems(image_key: str, shape: tuple[int, ...], fortran: bool,
                           dtype: np.dtype, limits: Limits) -> list[str]:
    """What is wrong with an images member's header: layout, dtype, pixels per image."""
    problems = []
    if len(shape) != 4 or shape[-1] not in (1, 3):
        problems.append(f"{image_key}: expected images shaped (N, H, W) or (N, H, W, 1|3), "
                        f"got {quote(shape)}")
    elif shape[1] * shape[2] > limits.max_image_pixels:
        problems.append(f"{image_key}: images of {shape[1]}x{shape[2]} = "
                        f"{shape[1] * shape[2]:,} pixels, above the limit of "
                        f"{limits.max_image_pixels:,} (max_image_pixels)")
    if dtype != np.uint8:
        problems.append(f"{image_key}: expected uint8 pixels, got {quote(dtype)}")
    if fortran:
        problems.append(f"{image_key}: Fortran-ordered arrays are not supported")
    return problems


def _npz_split(path: Path, archive: zipfile.ZipFile, image_key: str, label_key: str,
               problems: list[str], limits: Limits) -> ArraySet | None:
    """One split's ArraySet, or None with its problems appended. Only headers are read before
    every size is checked; the labels are then read within max_npz_member_bytes."""
    before = len(problems)
    try:
        shape, wrong = _image_member(archive, image_key, limits)
    except DataError as err:
        problems.append(str(err))
        return None
    problems += wrong
    try:
        labels = _read_member(archive, label_key, label_key, limits.max_npz_member_bytes)
    except DataError as err:
        problems.append(str(err))
        return None
    if labels.ndim == 2 and labels.shape[1] != 1:
        problems.append(f"{label_key}: shaped {labels.shape}; multi-label data is not supported, "
                        f"expected one integer label per image")
    elif labels.ndim not in (1, 2):
        problems.append(f"{label_key}: expected shape (N,) or (N, 1), got {labels.shape}")
    elif shape and len(labels) != shape[0]:
        problems.append(f"{image_key} has {shape[0]} images but {label_key} has "
                        f"{len(labels)} labels")
    if not np.issubdtype(labels.dtype, np.integer):
        problems.append(f"{label_key}: labels must be integers, got {quote(labels.dtype)}")
    elif labels.size and int(labels.max()) > np.iinfo(np.int64).max:  # uint64 would wrap
        problems.append(f"{label_key}: label {labels.max()} is out of range")
    elif labels.size and labels.min() < 0:
        problems.append(f"{label_key}: negative label {labels.min()}")
    if len(problems) > before:
        return None
    return ArraySet(path, image_key, tuple(int(n) for n in shape),
                    labels.reshape(-1).astype(np.int64))


# ---------------------------------------------------------------------------------------------
# Folder trees
# ---------------------------------------------------------------------------------------------


def _visible(name: str) -> bool:
    return not name.startswith(".") and name not in JUNK


def _file_problem(path: Path, is_link: bool, real_root: Path) -> tuple[str, bool] | None:
    """(problem, structural) of one entry that is not a real folder, ("", False) for a
    symlinked folder (never followed), None for a usable file. A symlink leaving the root is
    structural (a red flag, as in a CSV); a FIFO, device or socket (reading it could hang) is
    that file's problem."""
    if is_link:
        try:
            if not path.resolve().is_relative_to(real_root):
                return "leads outside the source folder (symlink)", True
        except (OSError, RuntimeError) as err:  # a symlink loop
            return f"unresolvable symlink ({quote(err)})", False
    try:
        mode = path.stat().st_mode
    except OSError as err:
        return f"cannot read ({quote(err.strerror or str(err))})", False
    if stat.S_ISDIR(mode):
        return "", False
    if not stat.S_ISREG(mode):
        return f"not a regular file ({kind_of(mode)})", False
    return None


def walk_files(folder: Path, root: Path, outside: Problems | None = None,
               strict_names: bool = True) -> Iterator[tuple[Path, str, str]]:
    """(path, origin, problem) of every visible file below ``folder``, in no set order; the
    origin is its POSIX path relative to ``root``, escaped by :func:`safe_name`. Folders are
    walked with a stack (any depth) and hidden ones never entered; symlinked folders are not
    followed. A symlink leaving ``root`` goes to ``outside`` (structural) or, without it, is
    that file's problem; so is a name that is not printable UTF-8 with ``strict_names``
    (preprocess writes names into its manifest; predict only reports them, escaped). Both the
    data step and predict list folders through here."""
    real_root = root.resolve()
    relative = folder.relative_to(root).as_posix()
    stack = [(folder, "" if relative == "." else relative + "/")]
    while stack:
        current, prefix = stack.pop()
        try:
            with os.scandir(current) as listing:
                entries = [entry for entry in listing if _visible(entry.name)]
        except OSError as err:
            if not prefix:
                raise DataError(f"{safe_name(str(current))}: cannot list the folder "
                                f"({err.strerror or err})") from err
            yield current, safe_name(prefix[:-1]), f"cannot list folder ({err.strerror or err})"
            continue
        for entry in entries:
            origin, path = prefix + entry.name, Path(entry.path)
            if entry.is_dir(follow_symlinks=False):
                stack.append((path, origin + "/"))
                continue
            found = _file_problem(path, entry.is_symlink(), real_root)
            if found is None and strict_names and safe_name(origin) != origin:
                found = "file name is not valid UTF-8 or holds control characters", False
            if found is None:
                yield path, safe_name(origin), ""
            elif found[1] and outside is not None:
                outside.add(f"{quote(origin)} {found[0]}")
            elif found[0]:
                yield path, safe_name(origin), found[0]


def scan_folder(root: Path, class_names: list[str] | None = None,
                limits: Limits = DEFAULT) -> Source:
    """``<root>/[train|val|test/]<CLASS>/**`` with any number of classes. Every visible file in
    a class folder counts as an image; files beside the class folders are ignored."""
    children = sorted(p for p in root.iterdir() if _visible(p.name))
    dirs = [p for p in children if p.is_dir()]
    # Kermany's own release spells them train/val/test, others Train/Test: same meaning.
    named = [p for p in dirs if p.name.lower() in SPLITS]
    split_dirs = {p.name.lower(): p for p in named}
    if len(split_dirs) < len(named):
        raise DataError(f"{root}: split folders {[p.name for p in named]} differ only in case")
    ignored = [safe_name(p.relative_to(root).as_posix()) for p in children if not p.is_dir()]
    if split_dirs:
        others = [p.name for p in dirs if p.name.lower() not in SPLITS]
        if others:
            raise DataError(f"{root}: mixes split folders {sorted(split_dirs)} with other "
                            f"folders {quote(others)}; expected <root>/<split>/<CLASS>/ or "
                            f"<root>/<CLASS>/")
        layout = {}
        for name in SPLITS:
            if name in split_dirs:
                entries = sorted(p for p in split_dirs[name].iterdir() if _visible(p.name))
                layout[name] = [p for p in entries if p.is_dir()]
                ignored += [safe_name(p.relative_to(root).as_posix())
                            for p in entries if not p.is_dir()]
    else:
        layout = {"train": dirs}
    found = sorted({d.name for class_dirs in layout.values() for d in class_dirs})
    _check_class_folders(root, found, limits)
    nested = [f"{d.relative_to(root).as_posix()}/{c.name}" for class_dirs in layout.values()
              for d in class_dirs for c in d.iterdir() if c.is_dir() and c.name.lower() in SPLITS]
    if nested:
        raise DataError(f"{root}: split folders inside class folders ({quote(nested[:3])}); "
                        f"expected <root>/<split>/<CLASS>/, is the root one level too high?")
    problems = []
    for split, class_dirs in layout.items():
        have = {d.name for d in class_dirs}
        if have != set(found):
            lacks = sorted(set(found) - have)
            problems.append(f"split '{split}' lacks class folders {quote(lacks)}" if lacks
                            else f"split '{split}' has class folders "
                            f"{quote(sorted(have - set(found)))}")
    if problems:
        raise problems_error(str(root), "class folder mismatch(es) between splits", problems)
    names = check_class_names(str(root), "class folders", found, class_names)
    index = {name: i for i, name in enumerate(names)}
    real_root, outside = root.resolve(), Problems(limits.max_problems_shown)
    splits: dict[str, FileSet | ArraySet] = {}
    for split, class_dirs in layout.items():
        items = []
        for d in class_dirs:
            if not d.resolve().is_relative_to(real_root):
                outside.add(f"{quote(d.relative_to(root).as_posix())} leads outside the source "
                            f"folder (symlink)")
                continue
            items += [Item(path, origin, index[d.name], problem=problem)
                      for path, origin, problem in walk_files(d, root, outside)]
        splits[split] = FileSet(sorted(items, key=lambda item: item.origin))
    if outside:
        raise outside.error(str(root), "file(s) outside the source folder")
    return Source("folder", root, names, splits, flat=not split_dirs, ignored=ignored)


def _check_class_folders(root: Path, found: list[str], limits: Limits) -> None:
    """Class folders: at least one, at most max_classes, names printable on one line."""
    if not found:
        raise DataError(f"{root}: no class folders found "
                        f"(expected <root>/[train|val|test/]<CLASS>/)")
    if len(found) > limits.max_classes:
        raise DataError(f"{root}: {len(found)} class folders, above the limit of "
                        f"{limits.max_classes} (max_classes)")
    odd = [safe_name(name) for name in found if safe_name(name) != name]
    if odd:
        raise DataError(f"{root}: class folder name(s) {quote(odd[:5])} are not valid "
                        f"UTF-8 or hold control characters; rename them")


def check_class_names(where: str, what: str, found: list[str],
                       expected: list[str] | None) -> list[str]:
    """The class list to use: ``expected`` when given (``found`` must be a subset of it, so an
    external set may lack a class), else ``found`` in sorted order."""
    if expected is None:
        return sorted(found)
    if not set(found) <= set(expected):
        raise DataError(f"{where}: {what} {quote(sorted(found))} differ from the expected "
                        f"{quote(expected)}")
    return list(expected)
