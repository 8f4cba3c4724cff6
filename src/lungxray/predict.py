"""Apply a trained model (or a saved ensemble) to unlabeled images, streamed in batches.

Sources are read by the data step's bounded readers (``sources.walk_files``,
``manifest_csv.list_paths``, ``sources.image_members``; docs/limits.md) and decoded by its
decoding (``images.decode``, ``images.convert_array``) at the size and channels saved with the
model, so a prediction sees the pixels training saw. All that can be checked without the model
(arguments, source, listing, CSV header, npz headers, output) is checked before TensorFlow is
imported; a CSV is then read as it is predicted, a batch at a time: memory stays flat. Names
are written escaped (``errors.safe_name``). Files are built in a ``.predict-*`` staging folder
(removed on errors, SIGTERM and SIGINT, swept after a kill) and moved into place complete.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import os
import shutil
import sys
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pandas as pd

from lungxray import (
    artifacts,
    manifest_csv,
    prevalence,
    raw_source,
    safeio,
    site_metrics,
    sources,
    staging,
)
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray.errors import ConfigError, DataError, ModelError, quote, safe_name
from lungxray.limits import Limits
from lungxray.model_loader import load as _load
from lungxray.overlays import write_overlays
from lungxray.pools import CHUNK_BYTES, Unusable, read_file
from lungxray.sources import shown

PREDICTIONS_FILE = "predictions.csv"
PREVALENCE_FILE = artifacts.PREVALENCE_FILE
BAD_FILES = "bad_files.csv"
GRADCAM_DIR = "gradcam"
STAGING_PREFIX = ".predict-"
BATCH_SIZE = 64
MAX_BATCH_SIZE = 4096  # decoded pixels of a batch are held at once (4096 x 224² x 3 = 0.6 GB)
MAX_NAMED = 10  # bad files named in an error line; the rest are counted
PROGRESS_EVERY_S = 10.0
MISSING = "no such file"
_OUTPUTS = (PREDICTIONS_FILE, BAD_FILES, PREVALENCE_FILE, GRADCAM_DIR)  # what a run replaces


# --------------------------------------------------------------------------- listing


@dataclass(frozen=True, slots=True)
class Entry:
    """One image to predict: a file, or row ``index`` of an ``.npz`` member ``key``."""

    origin: str  # how predictions.csv names it: relative to the source root, escaped
    path: Path | None = None
    key: str = ""
    index: int = -1
    problem: str = ""  # found while listing (a FIFO, a symlink out of the root): a bad file


@dataclass
class Listing:
    """A source's images, listed without decoding any: a folder's files (all, sorted), a CSV's
    rows (streamed: checked as they are read) or an npz's image members (headers checked)."""

    where: str  # the source as messages name it
    root: Path  # the local folder, CSV or npz
    files: Iterable[Entry] = ()
    members: list[sources.ArraySet] = field(default_factory=list)
    total: int | None = 0  # None for a CSV: counted as it streams
    stops: sources.Problems = field(default_factory=sources.Problems)  # CSV rows that stop it

    def batches(self, size: int) -> Iterator[tuple[list[Entry], np.ndarray | None]]:
        """(entries, their npz rows or None for files), ``size`` at a time; npz rows are also
        bounded by CHUNK_BYTES of source pixels, so big images come a few at a time."""
        for member in self.members:
            start = 0
            for rows in member.chunks(min(size, member.rows_within(CHUNK_BYTES))):
                yield [Entry(member.origin(i), self.root, member.key, i)
                       for i in range(start, start + len(rows))], rows
                start += len(rows)
        files = iter(self.files)
        while batch := list(itertools.islice(files, size)):
            yield batch, None


def _list_folder(root: Path, meter: Progress) -> list[Entry]:
    """Every visible file below ``root``, class folders or not (the images are unlabeled), as
    the data step lists them; a symlink out of the root or a FIFO is that file's problem."""
    entries = []
    for path, origin, problem in sources.walk_files(root, root, strict_names=False):
        entries.append(Entry(origin, path, problem=problem))
        meter.listing(safe_name(str(root)), len(entries))
    entries.sort(key=lambda entry: entry.origin)
    return entries


def _csv_entries(path: Path, limits: Limits, stops: sources.Problems) -> Iterator[Entry]:
    """The rows of a CSV with a ``path`` column (other columns, a label too, are ignored) as
    they are read; paths are relative to the CSV's folder and may not leave it, as in the data
    step. A row that stops the run (absolute, '..', too long, a symlink out) goes to ``stops``."""
    for line, text, resolved, problem, file_problem in manifest_csv.list_paths(path, limits,
                                                                                MISSING):
        if problem:
            stops.add(f"line {line}: {problem}")
        else:
            # A bad file needs no Path (costly, per row of millions): it is never opened.
            yield Entry(safe_name(text), None if file_problem else Path(resolved),
                        problem=file_problem)


def list_source(source: str, cache_dir: Path | None = None, limits: Limits | None = None,
                meter: Progress | None = None) -> Listing:
    """The :class:`Listing` of a folder, CSV, ``.npz`` or ``gs://`` URI of any of them. No image
    is read; a CSV's header and rows up to its first usable one are."""
    limits = limits or limiting.from_env()
    meter = meter or Progress()
    path = raw_source.local_source(source, cache_dir, limits)
    where = safe_name(source)
    if path.is_dir():
        files = _list_folder(path, meter)
        listing = Listing(where, path, files, total=len(files))
    elif path.suffix.lower() == ".csv":
        stops = sources.Problems(limits.max_problems_shown)
        rows = _csv_entries(path, limits, stops)
        first = next(rows, None)
        if first is None:
            raise (stops.error(where, "bad row(s)") if stops
                   else DataError(f"{where}: has a header but no rows"))
        listing = Listing(where, path, itertools.chain([first], rows), total=None, stops=stops)
    elif path.suffix.lower() == ".npz":
        members = sources.image_members(path, limits)
        listing = Listing(where, path, members=members, total=sum(map(len, members)))
    else:
        raise DataError(f"{where}: expected an image folder, a .csv with a 'path' column or an "
                        f".npz; got {shown(path.suffix) or 'a file without extension'}")
    if listing.total == 0:
        raise DataError(f"{where}: holds no image files")
    return listing


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


def settings_for(info: dict[str, Any], workers: int = 0,
                 limits: Limits | None = None) -> Settings:
    """The preprocessing saved with a model (``model_info.json`` / ``ensemble.json``)."""
    try:
        size, channels = int(info["image_size"]), int(info["channels"])
    except (KeyError, TypeError, ValueError) as err:
        raise ModelError(f"model info lacks a usable image_size/channels ({err})") from err
    return Settings(size, channels, bool(info.get("keep_aspect", False)),
                    workers or min(8, os.cpu_count() or 1), limits or limiting.from_env())


def _decode_file(entry: Entry, settings: Settings) -> tuple[np.ndarray | None, str]:
    """(pixels, "") or (None, why): a bad file is reported, never raised, so all are named."""
    if entry.problem:
        return None, entry.problem
    try:
        data = read_file(entry.path, settings.limits.max_file_bytes)
    except FileNotFoundError:
        return None, MISSING
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


def decode_batch(batch: list[Entry], rows: np.ndarray | None, settings: Settings,
                 executor: ThreadPoolExecutor) -> tuple[np.ndarray, list[int],
                                                        list[tuple[str, str]],
                                                        list[np.ndarray | None]]:
    """(model inputs uint8 (n_ok, S, S, C), positions of the good entries, (origin, problem)
    of the bad ones, the source rows of npz entries for overlays). Files already known to be
    bad (missing, a FIFO) are not handed to a thread: two million missing rows pass quickly."""
    if rows is not None:
        pixels = imaging.convert_array(rows, settings.size, settings.channels,
                                       settings.keep_aspect)
        return pixels, list(range(len(batch))), [], list(rows)
    results: list[tuple[np.ndarray | None, str]] = [(None, e.problem) for e in batch]
    todo = [i for i, entry in enumerate(batch) if not entry.problem]
    for i, result in zip(todo, executor.map(lambda i: _decode_file(batch[i], settings), todo),
                         strict=True):
        results[i] = result
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
    """Progress on stderr, at most every PROGRESS_EVERY_S (a short run prints only its last
    line): ``predict: listing /data: 120000 files so far`` while a folder is listed, then
    ``predict: 1280/100000 images, 42.0 img/s, 3 unreadable`` (a CSV, read as it streams,
    has no total until its end)."""

    def __init__(self, stream: TextIO | None = None, every: float | None = None):
        self.stream = stream or sys.stderr
        self.every = PROGRESS_EVERY_S if every is None else every
        self.started = self.last = time.monotonic()

    def _due(self) -> bool:
        now = time.monotonic()
        if now - self.last < self.every:
            return False
        self.last = now
        return True

    def _print(self, text: str) -> None:
        print(f"predict: {text}", file=self.stream, flush=True)

    def listing(self, where: str, found: int) -> None:
        if self._due():
            self._print(f"listing {where}: {found} files so far")

    def start(self) -> None:
        """Images per second count from here (the model is loaded)."""
        self.started = time.monotonic()

    def update(self, done: int, total: int | None, bad: int, final: bool = False) -> None:
        if not final and not self._due():
            return
        rate = done / max(time.monotonic() - self.started, 1e-9)
        self._print(f"{done}{'' if total is None else f'/{total}'} images, {rate:.1f} img/s"
                    + (f", {bad} unreadable" if bad else ""))


# --------------------------------------------------------------------------- the command


def _check_output(output: Path, root: Path, model_dir: Path) -> None:
    """The output may not lie inside the source folder (the next run would read it as images)
    or the model folder (what predict reads it never changes), and must be a folder that can
    be made: all checked before the model is loaded."""
    where = safe_name(str(output))
    try:
        real = output.resolve()
    except (OSError, RuntimeError, ValueError) as err:
        raise ConfigError(f"{where}: not a usable output path ({err})") from err
    for folder, what in ((root, "the source folder"), (model_dir, "the model folder")):
        if folder.is_dir() and real.is_relative_to(folder.resolve()):
            raise ConfigError(f"{where}: lies inside {what} {safe_name(str(folder))}; choose an "
                              f"output outside it")
    if output.exists() and not output.is_dir():
        raise ConfigError(f"{where}: exists and is not a directory")
    _check_replaceable(output, where)
    existing = next(p for p in (output.absolute(), *output.absolute().parents)
                    if os.path.lexists(p))
    if not existing.is_dir():
        raise ConfigError(f"{where}: {safe_name(str(existing))} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{where}: {safe_name(str(existing))} is not writable")


def _check_replaceable(output: Path, where: str) -> None:
    """What a run replaces in ``output`` must be an earlier run's: a foreign ``gradcam/`` (or
    any of the names, of another kind or a symlink) is never removed or written through."""
    found = [name for name in _OUTPUTS if os.path.lexists(output / name)]
    for name in found:
        target = output / name
        if target.is_symlink() or target.is_dir() != (name == GRADCAM_DIR):
            raise ConfigError(f"{where}: {name} there is a symlink or not a "
                              f"{'folder' if name == GRADCAM_DIR else 'regular file'}; "
                              f"choose another output")
    if found and PREDICTIONS_FILE not in found:
        raise ConfigError(f"{where}: holds {', '.join(found)} but no {PREDICTIONS_FILE}, so it "
                          f"is not an earlier predict output; choose another output")


def _bad_error(where: str, named: list[str], n_bad: int, done: int,
               stopped: bool) -> DataError:
    what = (f"of the first {done} file(s) unreadable, stopped there" if stopped else
            f"of {done} file(s) unreadable")
    return sources.problems_error(where, what, named,
                                  f" (pass --skip-bad to skip them and list them in "
                                  f"{BAD_FILES})", total=n_bad, shown=MAX_NAMED)


@staging.stop_on_signals()  # SIGTERM/SIGINT: exit 128 + signal, no traceback, nothing left
def predict(model_dir: Path | str, source: str, output: Path | str, *,
            batch_size: int = BATCH_SIZE, skip_bad: bool = False, explain: bool = False,
            cache_dir: Path | None = None, workers: int = 0,
            progress: TextIO | None = None, site: str | None = None) -> dict[str, Any]:
    """Predict every image of ``source`` with the model in ``model_dir`` (a `lungxray train`
    output or a saved ensemble) into ``<output>/predictions.csv`` (and ``bad_files.csv``,
    ``gradcam/`` with ``explain``). Unreadable files fail the run, naming them, unless
    ``skip_bad``. ``site``: decide at that training site's own validation threshold
    (``site_thresholds`` in model_info.json) instead of the pooled one. Returns a summary
    (also what the CLI prints)."""
    if not 1 <= batch_size <= MAX_BATCH_SIZE:
        raise ConfigError(f"batch size must be between 1 and {MAX_BATCH_SIZE}, got "
                          f"{batch_size}")
    if workers < 0:
        raise ConfigError(f"workers must be 0 (one per CPU) or more, got {workers}")
    output, limits, meter = Path(output), limiting.from_env(), Progress(progress)
    if not Path(model_dir).is_dir():
        raise ModelError(f"{safe_name(str(model_dir))}: no such model directory")
    listing = list_source(str(source), cache_dir, limits, meter)
    _check_output(output, listing.root, Path(model_dir))
    predictor = _load(Path(model_dir))
    info = predictor.info
    class_names = [str(c) for c in info["class_names"]]
    threshold = info.get("threshold") if site is None else site_threshold(info, site)
    calibration = _saved_calibration(info, Path(model_dir))
    settings = settings_for(info, workers, limits)  # the input load checked the network has
    # A failed or stopped run leaves nothing that looks like a result, nor a folder it created
    # (staging_dir).
    with staging.staging_dir(output, STAGING_PREFIX, "lungxray predict") as build:
        counts, n_bad, scores = _run(predictor.members, listing, settings, build, class_names,
                                     threshold, batch_size, skip_bad, explain, meter)
        estimate = _target_prevalence(calibration, class_names, scores, threshold)
        if estimate is not None:
            safeio.write_text_atomic(build / PREVALENCE_FILE, json.dumps(estimate, indent=2))
        with staging.signals_blocked():  # the old files, or all the new ones
            _publish(build, output, n_bad, explain)
    return {"model_name": info.get("model_name"), "source": safe_name(str(source)),
            "predictions": safe_name(str(output / PREDICTIONS_FILE)),
            "n": sum(counts.values()), "n_bad": n_bad,
            "bad_files": safe_name(str(output / BAD_FILES)) if n_bad else None,
            "threshold": threshold, "site": site, "counts": counts,
            "gradcam": safe_name(str(output / GRADCAM_DIR)) if explain else None,
            "prevalence": (None if estimate is None else
                           {k: estimate[k] for k in ("estimate", "ci",
                                                     "bayes_threshold_at_estimate")}),
            "prevalence_file": (None if estimate is None else
                                safe_name(str(output / PREVALENCE_FILE)))}


def site_threshold(info: dict[str, Any], site: str) -> float:
    """The threshold chosen on ``site``'s own validation rows, or a ConfigError naming the
    sites that have one."""
    own = info.get(site_metrics.SITE_THRESHOLDS) or {}
    if site not in own:
        have = ", ".join(sorted(own)) or "none (one training site, or too few validation images)"
        raise ConfigError(f"--site {quote(str(site), 60)}: the model has no threshold of its own "
                          f"for that site; sites with one: {have}")
    return float(own[site])


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


def _run(members: list[Any], listing: Listing, settings: Settings, staging: Path,
         class_names: list[str], threshold: float | None, batch_size: int, skip_bad: bool,
         explain: bool, meter: Progress) -> tuple[dict[str, int], int, np.ndarray]:
    """Decode, predict and append rows batch by batch to ``staging``'s predictions.csv and
    bad_files.csv; returns the counts per decided class, the number of bad files and, for two
    classes, the positive-class scores. Once the run is lost the model stops: after a bad file
    without ``skip_bad`` decoding goes on until MAX_NAMED are named (two million missing rows
    fail in seconds, not minutes), after a CSV row that stops the run only the listing does, to
    count those rows."""
    counts = dict.fromkeys(class_names, 0)
    scores: list[np.ndarray] = []
    named: list[str] = []
    done = n_bad = 0
    stopped = False
    columns = ["path", *(f"prob_{c}" for c in class_names), "predicted_index", "predicted_class"]
    if explain:
        columns.append("gradcam")
    meter.start()
    executor = ThreadPoolExecutor(max_workers=settings.workers)
    try:
        with (open(staging / PREDICTIONS_FILE, "w", newline="", encoding="utf-8") as handle,
              open(staging / BAD_FILES, "w", newline="", encoding="utf-8") as bad_handle):
            writer, bad_writer = csv.writer(handle), csv.writer(bad_handle)
            writer.writerow(columns)
            bad_writer.writerow(["path", "problem"])
            for batch, rows in listing.batches(batch_size):
                done += len(batch)
                if not listing.stops:
                    pixels, good, problems, raws = decode_batch(batch, rows, settings, executor)
                    for origin, problem in problems:
                        problem = safe_name(problem)  # an OSError's text may quote a path
                        bad_writer.writerow([origin, problem])
                        if len(named) < MAX_NAMED:
                            named.append(f"{origin}: {problem}")
                    n_bad += len(problems)
                    if len(good) and (skip_bad or not n_bad):
                        kept = [batch[i] for i in good]
                        writer.writerows(_predicted(members, pixels, kept, [raws[i] for i in good],
                                                    settings, staging, class_names, threshold,
                                                    batch_size, explain, counts, scores))
                meter.update(done, listing.total, n_bad)
                if n_bad >= MAX_NAMED and not skip_bad:
                    stopped = listing.total is None or done < listing.total
                    break
    finally:
        # On SIGTERM/SIGINT the queued files are dropped, not decoded first.
        executor.shutdown(wait=True, cancel_futures=True)
    if listing.stops:
        raise listing.stops.error(listing.where, "bad row(s)")
    if n_bad and not skip_bad:
        raise _bad_error(listing.where, named, n_bad, done, stopped)
    meter.update(done, done, n_bad, final=True)
    return counts, n_bad, np.concatenate(scores) if scores else np.zeros(0, np.float32)


def _predicted(members: list[Any], pixels: np.ndarray, kept: list[Entry],
               raws: list[np.ndarray | None], settings: Settings, staging: Path,
               class_names: list[str], threshold: float | None, batch_size: int, explain: bool,
               counts: dict[str, int], scores: list[np.ndarray]) -> list[list[Any]]:
    """predictions.csv rows of one decoded batch (overlays written with ``explain``); the
    counts and scores are added to."""
    probs = predict_probs(members, pixels, batch_size)
    if len(class_names) == 2:
        scores.append(probs[:, 1].astype(np.float32))
    decided = decide(probs, threshold)
    overlays = (write_overlays(members, pixels, decided, kept, raws, settings,
                               staging / GRADCAM_DIR) if explain else None)
    lines = []
    for row, entry in enumerate(kept):
        cells = [entry.origin, *(f"{p:.6f}" for p in probs[row]), int(decided[row]),
                 class_names[decided[row]]]
        lines.append(cells + ([overlays[row]] if explain else []))
        counts[class_names[decided[row]]] += 1
    return lines


def _publish(staging: Path, output: Path, n_bad: int, explain: bool) -> None:
    """Move the finished files into ``output``; predictions.csv last, stale files removed."""
    if n_bad:
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
