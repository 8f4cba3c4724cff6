"""Find out what a raw source holds, without decoding any image yet.

A source is a MedMNIST-style ``.npz``, a folder tree ``<root>/[train|val|test/]<CLASS>/...``, a
CSV manifest ``path,label[,split][,patient_id]``, any of them on ``gs://``, or the name of a
published dataset. :func:`open_source` returns a :class:`Source`: class names and, per given
split, either a list of files (:class:`FileSet`) or an ``.npz`` member read in chunks
(:class:`ArraySet`). Structural problems (missing keys, classes that differ between splits,
paths escaping the CSV's folder, ...) are collected and raised together as one
:class:`DataError`; problems with single files are found later, when they are decoded.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
MAX_CLASSES = 1000  # an npz label far above this is corrupt, not a class
# MedMNIST .npz files carry no class names; these are the official ones from its INFO table.
MEDMNIST_CLASS_NAMES = {"pneumoniamnist": ["normal", "pneumonia"]}
CSV_COLUMNS = ("path", "label")
CSV_OPTIONAL = ("split", "patient_id")
# Operating-system litter that is never data; hidden names (".DS_Store", "._x") are skipped too.
JUNK = {"__MACOSX", "Thumbs.db", "desktop.ini"}


class DataError(ValueError):
    """Input data that cannot be used, with a message naming what and where."""


def problems_error(where: str, what: str, problems: list[str], hint: str = "") -> DataError:
    """One error, on one line (the CLI's convention), that names every problem."""
    text = "; ".join(p.replace("\n", " ") for p in problems)
    return DataError(f"{where}: {len(problems)} {what}{hint}: {text}")


@dataclass(frozen=True)
class Item:
    """One image file: where it is, how reports name it, its label and its patient."""

    path: Path
    origin: str  # POSIX path relative to the source root: stable across machines and caches
    label: int
    group: str = ""  # patient id; "" when the source has none


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
    labels: np.ndarray

    def __len__(self) -> int:
        return self.shape[0]

    def origin(self, index: int) -> str:
        return f"{self.key}[{index}]"

    def chunks(self, rows: int) -> Iterator[np.ndarray]:
        """Consecutive ``(rows, H, W, C)`` blocks; a compressed member is inflated as it goes,
        so the whole array never sits in memory."""
        try:
            with zipfile.ZipFile(self.npz) as archive, archive.open(f"{self.key}.npy") as fp:
                _read_header(fp)
                per_image = int(np.prod(self.shape[1:]))
                for start in range(0, len(self), rows):
                    count = min(rows, len(self) - start)
                    buffer = fp.read(count * per_image)
                    if len(buffer) != count * per_image:
                        raise DataError(f"{self.npz}:{self.key}: truncated after image {start}")
                    yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *self.shape[1:])
        except (zipfile.BadZipFile, OSError, EOFError) as err:
            raise DataError(f"{self.npz}:{self.key}: cannot read ({err})") from err


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


def _read_header(fp) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fp)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fp)
    return np.lib.format.read_array_header_2_0(fp)


def _member_header(archive: zipfile.ZipFile, key: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    with archive.open(f"{key}.npy") as fp:
        return _read_header(fp)


def scan_npz(path: Path, class_names: list[str] | None = None) -> Source:
    """Validate a MedMNIST-style ``.npz`` (``<split>_images`` / ``<split>_labels``) and describe
    it; only the labels are loaded. Every wrong key, shape or dtype is named in one error."""
    try:
        archive = zipfile.ZipFile(path)
        keys = {n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as err:
        raise DataError(f"{path}: not a readable .npz file ({err})") from err
    problems: list[str] = []
    splits: dict[str, FileSet | ArraySet] = {}
    with archive, np.load(path, allow_pickle=False) as arrays:
        for name in SPLITS:
            image_key, label_key = f"{name}_images", f"{name}_labels"
            if (image_key in keys) != (label_key in keys):
                have, lack = (image_key, label_key) if image_key in keys else (label_key, image_key)
                problems.append(f"has {have} but not its pair {lack}")
                continue
            if image_key not in keys:
                continue
            split = _npz_split(path, archive, arrays, image_key, label_key, problems)
            if split is not None:
                splits[name] = split
    if not splits and not problems:
        expected = ", ".join(f"{s}_images/{s}_labels" for s in SPLITS)
        problems.append(f"no split keys (expected some of {expected}; "
                        f"found: {', '.join(sorted(keys)) or 'nothing'})")
    shapes = {name: s.shape[1:] for name, s in splits.items()}
    if len(set(shapes.values())) > 1:
        problems.append("images differ in shape between splits: " + ", ".join(
            f"{name} {'x'.join(map(str, shape))}" for name, shape in shapes.items()))
    if problems:
        raise problems_error(str(path), "problem(s) with its keys, shapes or dtypes", problems)
    n_classes = int(max((s.labels.max() + 1 for s in splits.values() if len(s)), default=0))
    if n_classes > MAX_CLASSES:
        raise DataError(f"{path}: labels go up to {n_classes - 1}; at most {MAX_CLASSES} classes "
                        f"are supported (labels must be 0..K-1)")
    if class_names is None:
        stem = path.name.split(".")[0].split("_")[0].lower()
        class_names = MEDMNIST_CLASS_NAMES.get(stem, [str(i) for i in range(n_classes)])
    if n_classes > len(class_names):
        raise DataError(f"{path}: labels go up to {n_classes - 1} but only {len(class_names)} "
                        f"class names are known ({class_names})")
    return Source("npz", path, list(class_names), splits)


def _npz_split(path: Path, archive: zipfile.ZipFile, arrays, image_key: str, label_key: str,
               problems: list[str]) -> ArraySet | None:
    """One split's ArraySet, or None with its problems appended."""
    before = len(problems)
    try:
        shape, fortran, dtype = _member_header(archive, image_key)
    except (ValueError, OSError, zipfile.BadZipFile) as err:
        problems.append(f"{image_key}: unreadable ({err})")
        return None
    if len(shape) == 3:
        shape = (*shape, 1)
    if len(shape) != 4 or shape[-1] not in (1, 3):
        problems.append(f"{image_key}: expected images shaped (N, H, W) or (N, H, W, 1|3), "
                        f"got {shape}")
    if dtype != np.uint8:
        problems.append(f"{image_key}: expected uint8 pixels, got {dtype}")
    if fortran:
        problems.append(f"{image_key}: Fortran-ordered arrays are not supported")
    try:
        labels = np.asarray(arrays[label_key])
    except ValueError as err:  # e.g. pickled object arrays, refused on purpose
        problems.append(f"{label_key}: cannot read ({err})")
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
        problems.append(f"{label_key}: labels must be integers, got {labels.dtype}")
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


def _files_under(folder: Path, root: Path) -> list[Path]:
    """Every visible file below ``folder`` (recursively), sorted by path relative to root."""
    files = [p for p in folder.rglob("*")
             if p.is_file() and all(_visible(part) for part in p.relative_to(root).parts)]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def scan_folder(root: Path, class_names: list[str] | None = None) -> Source:
    """``<root>/[train|val|test/]<CLASS>/**`` with any number of classes. Every visible file in
    a class folder counts as an image; files beside the class folders are ignored."""
    children = sorted(p for p in root.iterdir() if _visible(p.name))
    dirs = [p for p in children if p.is_dir()]
    # Kermany's own release spells them train/val/test, others Train/Test: same meaning.
    named = [p for p in dirs if p.name.lower() in SPLITS]
    split_dirs = {p.name.lower(): p for p in named}
    if len(split_dirs) < len(named):
        raise DataError(f"{root}: split folders {[p.name for p in named]} differ only in case")
    ignored = [p.relative_to(root).as_posix() for p in children if p.is_file()]
    if split_dirs:
        others = [p.name for p in dirs if p.name.lower() not in SPLITS]
        if others:
            raise DataError(f"{root}: mixes split folders {sorted(split_dirs)} with other "
                            f"folders {others}; expected <root>/<split>/<CLASS>/ or "
                            f"<root>/<CLASS>/")
        layout = {}
        for name in SPLITS:
            if name in split_dirs:
                entries = sorted(p for p in split_dirs[name].iterdir() if _visible(p.name))
                layout[name] = [p for p in entries if p.is_dir()]
                ignored += [p.relative_to(root).as_posix() for p in entries if p.is_file()]
    else:
        layout = {"train": dirs}
    nested = [f"{d.relative_to(root).as_posix()}/{c.name}" for class_dirs in layout.values()
              for d in class_dirs for c in d.iterdir() if c.is_dir() and c.name.lower() in SPLITS]
    if nested:
        raise DataError(f"{root}: split folders inside class folders ({nested[:3]}); expected "
                        f"<root>/<split>/<CLASS>/, is the root one level too high?")
    found = sorted({d.name for class_dirs in layout.values() for d in class_dirs})
    if not found:
        raise DataError(f"{root}: no class folders found "
                        f"(expected <root>/[train|val|test/]<CLASS>/)")
    problems = []
    for split, class_dirs in layout.items():
        have = {d.name for d in class_dirs}
        if have != set(found):
            lacks = sorted(set(found) - have)
            problems.append(f"split '{split}' lacks class folders {lacks}" if lacks else
                            f"split '{split}' has class folders {sorted(have - set(found))}")
    if problems:
        raise problems_error(str(root), "class folder mismatch(es) between splits", problems)
    names = _check_class_names(str(root), "class folders", found, class_names)
    splits: dict[str, FileSet | ArraySet] = {}
    for split, class_dirs in layout.items():
        items = [Item(path, path.relative_to(root).as_posix(), names.index(d.name))
                 for d in class_dirs for path in _files_under(d, root)]
        splits[split] = FileSet(sorted(items, key=lambda item: item.origin))
    return Source("folder", root, names, splits, flat=not split_dirs, ignored=ignored)


def _check_class_names(where: str, what: str, found: list[str],
                       expected: list[str] | None) -> list[str]:
    """The class list to use: ``expected`` when given (``found`` must be a subset of it, so an
    external set may lack a class), else ``found`` in sorted order."""
    if expected is None:
        return sorted(found)
    if not set(found) <= set(expected):
        raise DataError(f"{where}: {what} {sorted(found)} differ from the expected {expected}")
    return list(expected)


# ---------------------------------------------------------------------------------------------
# CSV manifests
# ---------------------------------------------------------------------------------------------


def _path_problem(text: str) -> str | None:
    """Why a CSV path may not be used, or None. Paths must stay inside the CSV's folder."""
    if not text:
        return "empty path"
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or text.startswith("\\"):
        return f"absolute path {text!r} is not allowed; paths are relative to the CSV's folder"
    if ".." in windows.parts:  # PureWindowsPath splits on both '/' and '\\'
        return f"path {text!r} contains '..'; paths may not leave the CSV's folder"
    return None


def scan_csv(path: Path, class_names: list[str] | None = None) -> Source:
    """A CSV with columns ``path,label`` and optionally ``split`` and ``patient_id``; paths
    are relative to the CSV's folder and may not leave it."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({err})") from err
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected path,label[,split]"
                        f"[,patient_id], found {list(table.columns)}")
    if table.empty:
        raise DataError(f"{path}: has a header but no rows")
    table = table.apply(lambda column: column.str.strip())
    root = path.parent.resolve()
    problems = []
    # Backslashes are separators (exports from Windows tools); the file name is POSIX below.
    table["path"] = [PureWindowsPath(text).as_posix() if text else text for text in table["path"]]
    for row, record in enumerate(table.to_dict("records"), start=2):  # line 1 is the header
        where = f"line {row}"
        problem = _path_problem(record["path"])
        if problem is None and not (root / record["path"]).resolve().is_relative_to(root):
            problem = f"path {record['path']!r} leads outside the CSV's folder (symlink)"
        if problem:
            problems.append(f"{where}: {problem}")
        if not record["label"]:
            problems.append(f"{where}: empty label")
        if "split" in table and record["split"] not in SPLITS:
            problems.append(f"{where}: split {record['split']!r} is not one of {list(SPLITS)}")
        if "patient_id" in table and not record["patient_id"]:
            problems.append(f"{where}: empty patient_id")
    for dup in table.loc[table["path"].duplicated(), "path"].unique():
        problems.append(f"path {dup!r} is listed more than once")
    if problems:
        raise problems_error(str(path), "bad row(s)", problems)
    splits_of = table["split"] if "split" in table else pd.Series("train", index=table.index)
    problems = []
    labels_by_split = {s: set(table.loc[splits_of == s, "label"]) for s in SPLITS
                       if (splits_of == s).any()}
    every = set(table["label"])
    for split, labels in labels_by_split.items():
        if labels != every:
            problems.append(f"split '{split}' lacks classes {sorted(every - labels)}")
    if problems:
        raise problems_error(str(path), "class mismatch(es) between splits", problems)
    names = _check_class_names(str(path), "labels", sorted(every), class_names)
    splits: dict[str, FileSet | ArraySet] = {}
    for split in labels_by_split:
        rows = table[splits_of == split]
        splits[split] = FileSet([
            Item(root / r["path"], r["path"], names.index(r["label"]), r.get("patient_id", ""))
            for r in rows.to_dict("records")])
    return Source("csv", path.parent, names, splits, flat="split" not in table,
                  extra_hashed=[path])


# ---------------------------------------------------------------------------------------------
# Resolving a source string
# ---------------------------------------------------------------------------------------------


def resolve(source: str, cache_dir: Path | None = None) -> Path:
    """A local path for ``source``: itself, a cached copy of a ``gs://`` object or prefix (for a
    CSV: its whole folder, since the rows point into it) or a downloaded published dataset."""
    if source.startswith("gs://"):
        from lungxray import storage  # google-cloud-storage only loads for gs:// sources

        uri = source
        if source.lower().endswith(".csv"):
            uri = source.rpartition("/")[0] + "/"
        try:
            local = storage.fetch(uri, cache_dir)
        except (storage.StorageError, ValueError, FileNotFoundError) as err:
            raise DataError(f"{source}: {err}") from err
        return local / source.rpartition("/")[2] if uri != source else local
    if re.fullmatch(r"pneumoniamnist(_\d+)?", source) and not Path(source).exists():
        from lungxray import download

        size = int(source.rpartition("_")[2]) if "_" in source else 28
        try:
            return download.fetch_pneumoniamnist(size, cache_dir)
        except download.DownloadError as err:
            raise DataError(str(err)) from err
    return Path(source)


def open_source(source: str, class_names: list[str] | None = None,
                cache_dir: Path | None = None) -> Source:
    """Describe ``source`` (npz, folder, CSV, on gs:// or local, or a published name)."""
    path = resolve(source, cache_dir)
    if not path.exists():
        raise DataError(f"{source}: no such file or directory")
    if path.is_dir():
        return scan_folder(path, class_names)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return scan_npz(path, class_names)
    if suffix == ".csv":
        return scan_csv(path, class_names)
    raise DataError(f"{source}: a file source must be a MedMNIST-style .npz or a .csv manifest "
                    f"(path,label[,split][,patient_id]); got {path.suffix or 'no extension'}")
