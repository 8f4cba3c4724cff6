"""Open a raw source string (a local path, a ``gs://`` URI or a published dataset's name) as a
:class:`~lungxray.sources.Source`: resolved to a local path, then scanned as a folder, an
``.npz`` or a CSV manifest."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from lungxray.errors import DataError, quote
from lungxray.limits import DEFAULT, Limits
from lungxray.manifest_csv import scan_csv
from lungxray.sources import Source, kind_of, scan_folder, scan_npz, shown


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


def local_source(source: str, cache_dir: Path | None = None,
                 limits: Limits = DEFAULT) -> Path:
    """The local folder or regular file behind ``source`` (:func:`resolve`), its length
    checked first; a missing path, a FIFO (it would block the open forever) or a device is a
    DataError. Preprocess, evaluate and predict all start here."""
    if not source:
        raise DataError("the source is empty; give a folder, a file or a gs:// URI")
    if len(source) > limits.max_path_chars:
        raise DataError(f"source {quote(source)} is longer than {limits.max_path_chars} "
                        f"characters (max_path_chars)")
    path = resolve(source, cache_dir)
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError) as err:  # ValueError: a NUL byte
        raise DataError(f"{shown(source)}: no such file or directory"
                        if isinstance(err, FileNotFoundError) else
                        f"{shown(source)}: cannot read "
                        f"({getattr(err, 'strerror', None) or err})") from err
    if not stat.S_ISDIR(mode) and not stat.S_ISREG(mode):
        raise DataError(f"{shown(source)}: not a regular file ({kind_of(mode)})")
    return path


def open_source(source: str, class_names: list[str] | None = None,
                cache_dir: Path | None = None, limits: Limits = DEFAULT) -> Source:
    """Describe ``source`` (npz, folder, CSV, on gs:// or local, or a published name)."""
    path = local_source(source, cache_dir, limits)
    if path.is_dir():
        return scan_folder(path, class_names, limits)
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return scan_npz(path, class_names, limits)
    if suffix == ".csv":
        return scan_csv(path, class_names, limits)
    raise DataError(f"{shown(source)}: a file source must be a MedMNIST-style .npz or a .csv "
                    f"manifest (path,label[,split][,patient_id]); got "
                    f"{shown(path.suffix) or 'no extension'}")
