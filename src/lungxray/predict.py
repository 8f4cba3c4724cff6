"""Apply a trained model (or a saved ensemble) to unlabeled images, streamed in batches.

The images go through the data step's own decoding (:func:`lungxray.images.decode` for files,
:func:`lungxray.images.convert_array` for ``.npz`` rows) at the size and channel count saved with
the model, so a prediction sees the pixels training saw. Files are listed first (paths only),
then decoded, predicted and written one batch at a time: memory stays flat whatever the number
of images. ``predictions.csv`` is written to a temporary name and renamed when complete, so a
failed run never leaves a file that looks like a result.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath, PureWindowsPath
from typing import Any, TextIO

import numpy as np
import pandas as pd

from lungxray import artifacts, prevalence, raw_source, safeio, sources
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray.errors import ConfigError, DataError, ModelError, quote
from lungxray.limits import Limits
from lungxray.model_loader import check_input_size as _check_input_size
from lungxray.model_loader import load as _load
from lungxray.overlays import write_overlays
from lungxray.pools import Unusable, read_file

PREDICTIONS_FILE = "predictions.csv"
PREVALENCE_FILE = artifacts.PREVALENCE_FILE
BAD_FILES = "bad_files.csv"
GRADCAM_DIR = "gradcam"
BATCH_SIZE = 64
MAX_NAMED = 10  # bad files named in an error line; the rest are counted
PROGRESS_EVERY_S = 5.0


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True)
class Entry:
    """One image to predict: a file, or row ``index`` of an ``.npz`` member ``key``."""

    origin: str  # how predictions.csv names it (relative to the source root)
    path: Path | None = None
    key: str = ""
    index: int = -1
    problem: str = ""  # found while listing (a FIFO, a symlink out of the root): a bad file


def _visible(relative: PurePath) -> bool:
    # The data step's rule: hidden names and OS litter are never data.
    return all(not part.startswith(".") and part not in sources.JUNK for part in relative.parts)


def _file_entry(path: Path, root: Path, origin: str) -> Entry:
    """An entry for ``path``, with a problem when it is not a regular file inside ``root``
    (reading a FIFO could hang; a symlink must not leak files from elsewhere)."""
    try:
        inside = path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return Entry(origin, path, problem="unresolvable symlink")
    if not inside:
        return Entry(origin, path, problem="leads outside the source folder (symlink)")
    if path.exists() and not path.is_file():
        return Entry(origin, path, problem="not a regular file")
    return Entry(origin, path)


def _list_folder(root: Path) -> list[Entry]:
    """Every visible file below ``root``, class folders or not (the images are unlabeled)."""
    found = [p for p in root.rglob("*") if _visible(p.relative_to(root)) and not p.is_dir()]
    found.sort(key=lambda p: p.relative_to(root).as_posix())
    return [_file_entry(p, root, p.relative_to(root).as_posix()) for p in found]


def _path_problem(text: str) -> str | None:
    """Why a CSV path may not be used: as in the data step, paths stay inside its folder."""
    if not text:
        return "empty path"
    if "\0" in text:
        return f"path {quote(text)} holds a NUL character"
    posix, windows = PurePosixPath(text), PureWindowsPath(text)
    if posix.is_absolute() or windows.is_absolute() or windows.drive or text.startswith("\\"):
        return f"absolute path {quote(text)} is not allowed; paths are relative to the CSV's folder"
    if ".." in windows.parts:  # PureWindowsPath splits on both '/' and '\\'
        return f"path {quote(text)} contains '..'; paths may not leave the CSV's folder"
    return None


def _list_csv(path: Path) -> list[Entry]:
    """A CSV with a ``path`` column (other columns, a label too, are ignored); paths are
    relative to the CSV's folder and may not leave it, as in the data step."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not a readable CSV ({quote(str(err))})") from err
    table.columns = [str(c).strip() for c in table.columns]
    if "path" not in table.columns:
        raise DataError(f"{path}: no 'path' column (found {quote(str(list(table.columns)))})")
    root = path.parent.resolve()
    entries, problems = [], []
    for line, text in enumerate(table["path"].str.strip(), start=2):
        text = PureWindowsPath(text).as_posix() if text else text
        problem = _path_problem(text)
        if problem:
            problems.append(f"line {line}: {problem}")
            continue
        entry = _file_entry(root / text, root, text)
        if entry.problem.startswith("leads outside"):
            problems.append(f"line {line}: path {quote(text)} {entry.problem}")
        entries.append(entry)
    if problems:
        raise DataError(f"{path}: {len(problems)} bad row(s): " + "; ".join(problems[:MAX_NAMED]))
    if not entries:
        raise DataError(f"{path}: has a header but no rows")
    return entries


def _npy_header(fp: Any, where: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran order, dtype) from an ``.npy`` member's header."""
    try:
        version = np.lib.format.read_magic(fp)
        read = {(1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read(fp)
    except Exception as err:  # noqa: BLE001 - numpy's header parser raises many kinds
        raise DataError(f"{where}: invalid .npy header ({type(err).__name__})") from err
    return tuple(int(n) for n in shape), bool(fortran), dtype


def _npz_members(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(key, shape) of the image members: ``images`` or ``<split>_images``, labels ignored."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = {n.removesuffix(".npy") for n in archive.namelist() if n.endswith(".npy")}
            keys = [k for k in ("images", *(f"{s}_images" for s in sources.SPLITS)) if k in names]
            found = []
            for key in keys:
                with archive.open(f"{key}.npy") as fp:
                    shape, fortran, dtype = _npy_header(fp, f"{path}:{key}")
                if len(shape) == 3:
                    shape = (*shape, 1)
                if len(shape) != 4 or shape[-1] not in (1, 3) or dtype != np.uint8 or fortran:
                    raise DataError(f"{path}:{key}: expected uint8 images shaped (N, H, W) or "
                                    f"(N, H, W, 1|3), got {dtype} {shape}")
                found.append((key, shape))
    except (zipfile.BadZipFile, OSError, zlib.error) as err:
        raise DataError(f"{path}: not a readable .npz file ({quote(str(err))})") from err
    if not found:
        raise DataError(f"{path}: no image key (expected 'images' or '<split>_images'; found: "
                        f"{quote(', '.join(sorted(names)) or 'nothing')})")
    return found


def list_source(source: str, cache_dir: Path | None = None) -> tuple[Path, list[Entry]]:
    """(local root, entries) of a folder, CSV, ``.npz`` or ``gs://`` URI of any of them.
    Only paths are listed here; no image is read."""
    path = raw_source.resolve(source, cache_dir)
    if not path.exists():
        raise DataError(f"{quote(source)}: no such file or directory")
    if path.is_dir():
        entries = _list_folder(path)
    elif path.suffix.lower() == ".csv":
        entries = _list_csv(path)
    elif path.suffix.lower() == ".npz":
        entries = [Entry(f"{key}[{i}]", path, key, i)
                   for key, shape in _npz_members(path) for i in range(shape[0])]
    else:
        raise DataError(f"{quote(source)}: expected an image folder, a .csv with a 'path' "
                        f"column or an .npz; got {path.suffix or 'a file without extension'}")
    if not entries:
        raise DataError(f"{quote(source)}: holds no image files")
    return path, entries


# --------------------------------------------------------------------------- decoding


@dataclass(frozen=True)
class Settings:
    """How the model's inputs are prepared: as its training data was, within the data step's
    limits (``LUNGXRAY_<LIMIT>`` environment variables, docs/limits.md)."""

    size: int
    channels: int
    keep_aspect: bool
    workers: int
    limits: Limits = field(default_factory=limiting.from_env)
    budget: imaging.Budget | None = None  # decode memory all workers share; None: from limits

    def __post_init__(self) -> None:
        if self.budget is None:
            object.__setattr__(self, "budget", imaging.Budget(self.limits.max_decode_bytes))


def settings_for(info: dict[str, Any], workers: int = 0) -> Settings:
    """The preprocessing saved with a model (``model_info.json`` / ``ensemble.json``)."""
    try:
        size, channels = int(info["image_size"]), int(info["channels"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"model info lacks a usable image_size/channels ({err})") from err
    return Settings(size, channels, bool(info.get("keep_aspect", False)),
                    workers or min(8, os.cpu_count() or 1))


def _decode_file(entry: Entry, settings: Settings) -> tuple[np.ndarray | None, str]:
    """(pixels, "") or (None, why): a bad file is reported, never raised, so all are named."""
    if entry.problem:
        return None, entry.problem
    try:
        data = read_file(entry.path, settings.limits.max_file_bytes)
    except FileNotFoundError:
        return None, "no such file"
    except Unusable as err:
        return None, str(err)
    except OSError as err:
        return None, f"cannot read ({err.strerror or err})"
    try:
        return imaging.decode(data, entry.path.name, settings.size, settings.channels,
                              settings.keep_aspect, limits=settings.limits,
                              budget=settings.budget), ""
    except imaging.ImageError as err:
        return None, str(err)
    except Exception as err:  # noqa: BLE001 - whatever one file does is that file's problem
        return None, f"cannot decode ({type(err).__name__})"


class NpzReader:
    """Rows of the ``.npz`` image members, read forward a chunk at a time: a compressed member
    is inflated as it goes, so the whole array never sits in memory."""

    def __init__(self, path: Path, members: list[tuple[str, tuple[int, ...]]]):
        self.path, self.shapes = path, dict(members)
        self._iter: Iterator[np.ndarray] | None = None
        self._key, self._buffer, self._start = "", np.zeros((0,)), 0

    def _chunks(self, key: str, rows: int) -> Iterator[np.ndarray]:
        shape, where = self.shapes[key], f"{self.path}:{key}"
        per_image = math.prod(shape[1:])
        try:
            with zipfile.ZipFile(self.path) as archive, archive.open(f"{key}.npy") as fp:
                _npy_header(fp, where)
                for start in range(0, shape[0], rows):
                    count = min(rows, shape[0] - start)
                    buffer = fp.read(count * per_image)
                    if len(buffer) != count * per_image:
                        raise DataError(f"{where}: truncated after image {start}")
                    yield np.frombuffer(buffer, dtype=np.uint8).reshape(count, *shape[1:])
        except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as err:
            raise DataError(f"{where}: cannot read ({quote(str(err))})") from err

    def rows(self, key: str, first: int, count: int, chunk: int) -> np.ndarray:
        """Rows ``first..first+count`` of ``key``; calls must go forward through the members."""
        out = []
        while count:
            if key != self._key:
                self._key, self._iter = key, self._chunks(key, chunk)
                self._buffer, self._start = np.zeros((0,)), 0
            end = self._start + len(self._buffer)
            if first >= end:
                self._start, self._buffer = end, next(self._iter)
                continue
            take = min(count, end - first)
            out.append(self._buffer[first - self._start:first - self._start + take])
            first, count = first + take, count - take
        return np.concatenate(out)


def decode_batch(batch: list[Entry], settings: Settings, executor: ThreadPoolExecutor,
                 npz: NpzReader | None) -> tuple[np.ndarray, list[int], list[tuple[str, str]],
                                                 list[np.ndarray | None]]:
    """(model inputs uint8 (n_ok, S, S, C), positions of the good entries, (origin, problem)
    of the bad ones, the source rows of npz entries for overlays)."""
    if npz is not None:
        blocks = []
        for key in dict.fromkeys(e.key for e in batch):  # a batch may span two members
            rows = [e.index for e in batch if e.key == key]
            blocks.append(npz.rows(key, rows[0], len(rows), max(len(batch), BATCH_SIZE)))
        pixels = np.concatenate([imaging.convert_array(b, settings.size, settings.channels,
                                                       settings.keep_aspect) for b in blocks])
        return pixels, list(range(len(batch))), [], [row for b in blocks for row in b]
    results = list(executor.map(lambda e: _decode_file(e, settings), batch))
    good = [i for i, (pixels, _) in enumerate(results) if pixels is not None]
    bad = [(batch[i].origin, problem) for i, (_, problem) in enumerate(results) if problem]
    shape = (0, settings.size, settings.size, settings.channels)
    stacked = np.stack([results[i][0] for i in good]) if good else np.zeros(shape, np.uint8)
    return stacked, good, bad, [None] * len(batch)


# --------------------------------------------------------------------------- prediction


def predict_probs(members: list[Any], images: np.ndarray, batch_size: int) -> np.ndarray:
    """Mean class probabilities of the members on one batch (``model.predict``: graph mode)."""
    x = np.asarray(images, dtype=np.float32)
    return np.mean([m.predict(x, batch_size=batch_size, verbose=0) for m in members],
                   axis=0).astype(np.float64)


def decide(probs: np.ndarray, threshold: float | None) -> np.ndarray:
    """Class indices: binary at the saved threshold on the positive class (index 1), else the
    most probable class."""
    if probs.shape[1] == 2 and threshold is not None:
        return (probs[:, 1] >= float(threshold)).astype(np.int64)
    return probs.argmax(axis=1)


class Progress:
    """``predict: 1280/100000 images, 42.0 img/s, 3 unreadable`` on stderr every few seconds."""

    def __init__(self, total: int, stream: TextIO | None = None):
        self.total, self.stream = total, stream or sys.stderr
        self.started = self.last = time.monotonic()

    def update(self, done: int, bad: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        rate = done / max(now - self.started, 1e-9)
        print(f"predict: {done}/{self.total} images, {rate:.1f} img/s"
              + (f", {bad} unreadable" if bad else ""), file=self.stream, flush=True)


# --------------------------------------------------------------------------- the command


def _check_output(output: Path, root: Path) -> None:
    """The output may not lie inside a source folder: the next run would read it as images."""
    if root.is_dir() and output.resolve().is_relative_to(root.resolve()):
        raise ConfigError(f"{output}: lies inside the source folder {root}; choose an output "
                          f"outside it")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{output}: exists and is not a directory")


def _bad_error(source: str, bad: list[tuple[str, str]], total: int) -> DataError:
    named = [f"{origin}: {problem}" for origin, problem in bad[:MAX_NAMED]]
    more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    return DataError(f"{quote(source)}: {len(bad)} of {total} file(s) unreadable "
                     f"(pass --skip-bad to skip them and list them in {BAD_FILES}): "
                     + "; ".join(p.replace("\n", " ") for p in named) + more)


def predict(model_dir: Path | str, source: str, output: Path | str, *,
            batch_size: int = BATCH_SIZE, skip_bad: bool = False, explain: bool = False,
            cache_dir: Path | None = None, workers: int = 0,
            progress: TextIO | None = None) -> dict[str, Any]:
    """Predict every image of ``source`` with the model in ``model_dir`` (a `lungxray train`
    output or a saved ensemble) into ``<output>/predictions.csv`` (and ``bad_files.csv``,
    ``gradcam/`` with ``explain``). Unreadable files fail the run, naming them, unless
    ``skip_bad``. Returns a summary (also what the CLI prints)."""
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    output = Path(output)
    predictor = _load(Path(model_dir))
    info = predictor.info
    class_names = [str(c) for c in info["class_names"]]
    threshold = info.get("threshold")
    calibration = _saved_calibration(info, Path(model_dir))
    settings = settings_for(info, workers)
    _check_input_size(predictor.members, settings, Path(model_dir))
    root, entries = list_source(str(source), cache_dir)
    _check_output(output, root)
    created = not output.exists()
    output.mkdir(parents=True, exist_ok=True)
    npz = NpzReader(root, _npz_members(root)) if root.suffix.lower() == ".npz" else None
    staging = Path(tempfile.mkdtemp(prefix=".predict-", dir=output))
    try:
        counts, bad, scores = _run(predictor.members, entries, settings, npz, staging,
                                   class_names, threshold, batch_size, skip_bad, explain,
                                   progress)
        if bad and not skip_bad:
            raise _bad_error(str(source), bad, len(entries))
        estimate = _target_prevalence(calibration, class_names, scores, threshold)
        if estimate is not None:
            safeio.write_text_atomic(staging / PREVALENCE_FILE, json.dumps(estimate, indent=2))
        _publish(staging, output, bad, explain)
    except BaseException:
        # A failed run leaves nothing that looks like a result (nor a folder it created).
        shutil.rmtree(output if created else staging, ignore_errors=True)
        raise
    shutil.rmtree(staging, ignore_errors=True)
    return {"model_name": info.get("model_name"), "source": str(source),
            "predictions": str(output / PREDICTIONS_FILE), "n": sum(counts.values()),
            "n_bad": len(bad), "bad_files": str(output / BAD_FILES) if bad else None,
            "threshold": threshold, "counts": counts,
            "gradcam": str(output / GRADCAM_DIR) if explain else None,
            "prevalence": (None if estimate is None else
                           {k: estimate[k] for k in ("estimate", "ci",
                                                     "bayes_threshold_at_estimate")}),
            "prevalence_file": None if estimate is None else str(output / PREVALENCE_FILE)}


def _saved_calibration(info: dict[str, Any], model_dir: Path) -> Any:
    """The validation calibration a two-class model was saved with (checked before anything
    is predicted), or None."""
    saved = info.get("calibration")
    if len(info["class_names"]) != 2 or saved is None:
        return None
    try:
        return prevalence.calibration_from(saved, str(model_dir / artifacts.INFO_FILE))
    except DataError as err:
        raise ModelError(str(err)) from None


def _target_prevalence(calibration: Any, class_names: list[str], scores: np.ndarray,
                       threshold: float | None) -> dict[str, Any] | None:
    """EM estimate of the prevalence of the images just predicted (lungxray.prevalence), when
    the model has a calibration; None otherwise."""
    if calibration is None or not len(scores):
        return None
    return {"positive_class": class_names[1],
            **prevalence.target_report(calibration, scores, threshold)}


def _run(members: list[Any], entries: list[Entry], settings: Settings, npz: NpzReader | None,
         staging: Path, class_names: list[str], threshold: float | None, batch_size: int,
         skip_bad: bool, explain: bool,
         progress: TextIO | None
         ) -> tuple[dict[str, int], list[tuple[str, str]], np.ndarray]:
    """Decode, predict and append CSV rows batch by batch into ``staging``; returns the counts
    per decided class, the bad files and, for two classes, the positive-class scores. Once a
    bad file is found without ``skip_bad`` the run is lost: the model stops, decoding goes on
    to name all."""
    counts = dict.fromkeys(class_names, 0)
    bad: list[tuple[str, str]] = []
    scores: list[np.ndarray] = []
    meter = Progress(len(entries), progress)
    columns = ["path", *(f"prob_{c}" for c in class_names), "predicted_index", "predicted_class"]
    if explain:
        columns.append("gradcam")
    with (open(staging / PREDICTIONS_FILE, "w", newline="", encoding="utf-8") as handle,
          ThreadPoolExecutor(max_workers=settings.workers) as executor):
        writer = csv.writer(handle)
        writer.writerow(columns)
        for start in range(0, len(entries), batch_size):
            batch = entries[start:start + batch_size]
            pixels, good, problems, raws = decode_batch(batch, settings, executor, npz)
            bad += problems
            if len(good) and (skip_bad or not bad):
                probs = predict_probs(members, pixels, batch_size)
                if len(class_names) == 2:
                    scores.append(probs[:, 1].astype(np.float32))
                decided = decide(probs, threshold)
                kept = [batch[i] for i in good]
                overlays = (write_overlays(members, pixels, decided, kept, [raws[i] for i in good],
                                           settings, staging / GRADCAM_DIR) if explain else None)
                for row, entry in enumerate(kept):
                    cells = [entry.origin, *(f"{p:.6f}" for p in probs[row]), int(decided[row]),
                             class_names[decided[row]]]
                    writer.writerow(cells + ([overlays[row]] if explain else []))
                    counts[class_names[decided[row]]] += 1
            meter.update(start + len(batch), len(bad))
    meter.update(len(entries), len(bad), final=True)
    return counts, bad, np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _publish(staging: Path, output: Path, bad: list[tuple[str, str]], explain: bool) -> None:
    """Move the finished files into ``output``; predictions.csv last, stale files removed."""
    if bad:
        pd.DataFrame(bad, columns=["path", "problem"]).to_csv(staging / BAD_FILES, index=False)
        os.replace(staging / BAD_FILES, output / BAD_FILES)
    else:
        (output / BAD_FILES).unlink(missing_ok=True)
    if (output / GRADCAM_DIR).is_dir():
        shutil.rmtree(output / GRADCAM_DIR)
    if explain and (staging / GRADCAM_DIR).is_dir():
        os.replace(staging / GRADCAM_DIR, output / GRADCAM_DIR)
    if (staging / PREVALENCE_FILE).is_file():
        os.replace(staging / PREVALENCE_FILE, output / PREVALENCE_FILE)
    else:
        (output / PREVALENCE_FILE).unlink(missing_ok=True)
    os.replace(staging / PREDICTIONS_FILE, output / PREDICTIONS_FILE)


def read_predictions(path: Path | str) -> pd.DataFrame:
    """predictions.csv as a table (paths kept as text)."""
    return pd.read_csv(io.StringIO(Path(path).read_text(encoding="utf-8")),
                       dtype={"path": str}, keep_default_na=False)
