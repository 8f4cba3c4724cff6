"""What survives a killed training run, written atomically and checked before it is trusted.

A state dir (``<output>/.state`` or ``--state-dir``) holds:

- ``job.json``: the job's settings. A state of another job, an older format, or one that cannot
  be read is discarded with a one-line note and training starts afresh; files train did not
  write are never deleted: a dir holding them is refused unless its job is this one.
- ``phases.json``: the finished phases (epochs, history); ``<phase>.weights.h5``: the best
  epoch's weights of each.
- inside a phase, ``<phase>.progress.json``: the commit record of the last finished epoch (every
  epoch's logs, whether early stopping ended the phase, which weights files hold the latest and
  the best epoch: ``<phase>.epoch-<k>.weights.h5``, optimizer state included), and
  ``<phase>.epochs.csv``, the same logs for people.

Every file goes to a temporary name and is renamed into place, the commit record after the
weights it names, so a kill at any instant leaves the previous epoch or the new one: the re-run
goes on from the last committed epoch, finishes a phase whose epochs all ran without training
again, and logs each epoch once.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import signal
import stat
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from lungxray import safeio, staging
from lungxray.errors import ConfigError, LungxrayError, quote
from lungxray.limits import DEFAULT

JOB_FILE = "job.json"  # what the saved checkpoints belong to
PHASES_FILE = "phases.json"
# Bump when the state dir's files change shape or meaning (2: epoch_started in the epoch logs;
# 3: val_auc exact; 4: commit records, no Keras BackupAndRestore), so an older state is
# discarded instead of mixed in.
STATE_FORMAT = 4
MONITOR = "val_auc"
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
MAX_LOG_KEYS = 64  # metrics in one epoch's log

# Every name train writes into a state dir (older formats' too, so their state is discarded,
# not refused), and the temporary names of its atomic writes.
_OURS = re.compile(r"(job\.json|phases\.json|[a-z]+\.(weights\.h5|best\.weights\.h5|backup"
                   r"|progress\.json|epochs\.csv|epoch-[0-9]+\.weights\.h5))")
_TEMP = re.compile(r"\.(?P<name>.+)\.[A-Za-z0-9_]+\.tmp(\.[a-z0-9.]+)?")


class StateUnusable(LungxrayError):
    """A state file that cannot be trusted (empty, truncated, edited): the state is discarded
    and training starts afresh."""

    kind = "state"


def note(message: str) -> None:
    """One line on stderr for something train did on its own (no error)."""
    print(f"lungxray train: note: {' '.join(message.split())}", file=sys.stderr, flush=True)


def is_ours(name: str) -> bool:
    """A name train writes into a state dir (or one of its temporary files)."""
    match = _TEMP.fullmatch(name)
    return bool(_OURS.fullmatch(match["name"] if match else name))


def sweep_temporaries(folder: Path, names: Callable[[str], bool]) -> list[str]:
    """Remove from ``folder`` the temporary files (``.<name>.<random>.tmp[.ext]``) that a kill
    left inside an atomic write of a file whose name ``names`` accepts; returns what is left."""
    left = []
    for entry in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []:
        match = _TEMP.fullmatch(entry.name)
        if match and names(match["name"]):
            _remove(entry)
        else:
            left.append(entry.name)
    return left


def check_state(state: Path, config: dict, config_file: str, what: str,
                ours: Callable[[str], bool] | None = None) -> None:
    """Make ``state`` the state dir of the job ``config`` (written to ``config_file``).

    A dir with nothing saved yet (no file but ``config_file``) is taken over whatever it says:
    a run that stopped before its first checkpoint never blocks a corrected re-run. Otherwise a
    state of another ``what`` is refused; with ``ours`` (train: which names it writes), a state
    made only of such files that belongs to another job, an older format, or cannot be read is
    discarded with a note, and the run starts afresh."""
    state = Path(state)
    if state.exists() and not state.is_dir():
        raise ConfigError(f"{state} exists and is not a directory; use another output or "
                          f"state dir")
    entries = sweep_temporaries(state, lambda name: name == config_file or is_ours(name))
    path = state / config_file
    if not [n for n in entries if n != config_file]:
        _remove(path)
    elif ours is not None and all(ours(n) for n in entries):
        reason = _mismatch(path, config, what)
        if reason is None:
            return
        note(f"{state} {reason}; discarded it, training starts afresh")
        _clear(state)
    elif path.is_file():
        reason = _mismatch(path, config, what)
        if reason is None:
            return
        raise ConfigError(f"{state} {reason}; use another output or state dir, or delete "
                          f"{state}")
    else:
        raise ConfigError(f"{state} holds state without {config_file} (another version?); "
                          f"use another output or state dir, or delete {state}")
    _write_config(path, config)


def _write_config(path: Path, config: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    safeio.write_text_atomic(path, json.dumps(config, indent=2))


def _mismatch(path: Path, config: dict, what: str) -> str | None:
    """Why the state whose settings are in ``path`` is not the job ``config`` (None: it is)."""
    if not path.is_file():
        return f"holds no {path.name} (killed while starting, or another version)"
    try:
        previous = safeio.load_json_object(path, "state file", error=ConfigError)
    except LungxrayError as err:
        return f"holds an unusable {path.name} ({err})"
    if previous == config:
        return None
    changed = sorted(k for k in set(previous) | set(config) if previous.get(k) != config.get(k))
    return (f"holds the state of a different {what} (differs in: "
            f"{quote(', '.join(map(str, changed)), 200)[1:-1]})")


def _clear(folder: Path) -> None:
    """Remove what train wrote into ``folder``; anything else (and a link to the folder) stays.
    """
    for entry in Path(folder).iterdir():
        if is_ours(entry.name):
            _remove(entry)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def state_key(*parts: object) -> str:
    """A stable directory name for one training job, so a retry finds its own checkpoints."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- weights files


def check_weights_file(path: Path) -> None:
    """A weights file of ours: a regular file (not a link), within the model-folder limit, that
    starts as HDF5 does. Anything else is :class:`StateUnusable`."""
    try:
        info = os.lstat(path)
    except OSError as err:
        raise StateUnusable(f"{path.name} cannot be read ({err.strerror})") from None
    if not stat.S_ISREG(info.st_mode):
        raise StateUnusable(f"{path.name} is not a regular file")
    if info.st_size > DEFAULT.max_model_folder_bytes:
        raise StateUnusable(f"{path.name} has {info.st_size} bytes, more than the limit of "
                            f"{DEFAULT.max_model_folder_bytes}")
    with open(path, "rb") as fh:
        head = fh.read(len(HDF5_SIGNATURE))
    if head != HDF5_SIGNATURE:
        raise StateUnusable(f"{path.name} is not an HDF5 weights file (empty or truncated?)")


def load_weights(model: keras.Model, path: Path) -> None:
    """Load weights (and optimizer state) of ours into ``model``; a file that is not what it
    should be is :class:`StateUnusable`."""
    check_weights_file(path)
    try:
        with warnings.catch_warnings():
            # A phase finished without training again holds no optimizer to restore.
            warnings.simplefilter("ignore")
            model.load_weights(path)
    except Exception as err:  # noqa: BLE001 - whatever h5py or Keras raise: not usable
        raise StateUnusable(f"{path.name} cannot be loaded ({type(err).__name__}: "
                            f"{quote(' '.join(str(err).split()), 200)})") from None


def weights_bytes(model: keras.Model) -> int:
    """What a weights file of ``model`` takes, optimizer state included (without HDF5's own)."""
    variables = list(model.weights)
    if getattr(model, "optimizer", None) is not None:
        variables += list(model.optimizer.variables)
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize for v in variables)


def save_weights(model: keras.Model, path: Path) -> None:
    """``model.save_weights`` (optimizer state included) to a temporary file renamed over
    ``path``, after :func:`_save`'s checks."""
    _save(model.save_weights, model, path, ".tmp.weights.h5", "training state")


def save_model(model: keras.Model, path: Path) -> None:
    """``model.save`` (a ``.keras`` file) to a temporary file renamed over ``path``."""
    _save(model.save, model, path, ".tmp.keras", "model file")


def _save(save: Callable[[Path], object], model: keras.Model, path: Path, suffix: str,
          what: str) -> None:
    """``save(temp)``, then the temporary file renamed over ``path``. A file system without
    room for the model's variables is refused before writing; a full disk during the write is
    one :class:`~lungxray.errors.OutputError` naming ``path`` and the bytes it needs, the
    half-written HDF5 file closed and removed here, so that h5py does not fail again (with a
    traceback, then a crash) when it is collected."""
    need = weights_bytes(model)

    def write(temp: Path) -> None:
        try:
            save(temp)
        except BaseException:
            _close_hdf5(temp)
            raise

    safeio.check_free_space(path, need, what)
    with safeio.no_space_as_error(path, need):
        safeio.replace_via_temp(path, write, suffix=suffix)


def _close_hdf5(path: Path) -> None:
    """Close what h5py still holds open of ``path`` after a failed write, emptied first so its
    last writes find room."""
    import h5py

    with contextlib.suppress(OSError):
        os.truncate(path, 0)
    wanted = os.fsencode(str(path))
    for handle in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE):
        with contextlib.suppress(Exception):  # best effort: the write failed already
            if handle.name == wanted:
                h5py.File(handle).close()


# --------------------------------------------------------------------------- phases


@dataclass
class Progress:
    """A phase's committed epochs: their logs, whether early stopping ended the phase, the
    latest epoch's weights file and the best epoch (index, ``val_auc``, weights file)."""

    rows: list[dict[str, float]]
    stopped: bool
    latest: Path
    best: tuple[int, float, Path] | None

    def as_json(self) -> str:
        best = None if self.best is None else {
            "epoch": self.best[0], "value": self.best[1], "weights": self.best[2].name}
        return json.dumps({"format": STATE_FORMAT, "epochs": self.rows, "stopped": self.stopped,
                           "latest": self.latest.name, "best": best}, indent=1)


class PhaseState:
    """A state dir's finished phases and the committed epochs of the phase under way."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.record = self.root / PHASES_FILE

    def weights(self, phase: str) -> Path:
        return self.root / f"{phase}.weights.h5"

    def log(self, phase: str) -> Path:
        return self.root / f"{phase}.epochs.csv"

    def progress_file(self, phase: str) -> Path:
        return self.root / f"{phase}.progress.json"

    def epoch_weights(self, phase: str, epochs: int) -> Path:
        return self.root / f"{phase}.epoch-{epochs}.weights.h5"

    def open(self, config: dict, plan: list[tuple[str, int]]) -> None:
        """Take the state dir for the job ``config`` (:func:`check_state`), then check what it
        holds against the phases of ``plan`` ((name, epochs) pairs); a state that does not
        check out is discarded with a note."""
        check_state(self.root, config, JOB_FILE, "training job", ours=is_ours)
        try:
            self.finished(plan)
            for phase, epochs in plan:
                self.progress(phase, epochs)
        except StateUnusable as err:
            self.discard(config, err)

    def discard(self, config: dict, reason: Exception) -> None:
        """Start afresh after ``reason``: everything of the state removed, ``config`` written."""
        note(f"{self.root}: {reason}; discarded the training state, training starts afresh")
        _clear(self.root)
        _write_config(self.root / JOB_FILE, config)

    def finished(self, plan: list[tuple[str, int]]) -> list[dict]:
        """The finished phases, checked: in ``plan``'s order, with at most its epochs, a
        history of one value per epoch, and their weights file."""
        if not self.record.exists():
            return []
        records = safeio.load_json(self.record, "training state", error=StateUnusable)
        expected = [(name, n) for name, n in plan if n > 0]
        if not isinstance(records, list) or len(records) > len(expected):
            raise StateUnusable(f"{PHASES_FILE} is not a list of at most {len(expected)} phases")
        for record, (name, n_epochs) in zip(records, expected, strict=False):
            epochs = record.get("epochs") if isinstance(record, dict) else None
            history = record.get("history") if isinstance(record, dict) else None
            if (not isinstance(record, dict) or record.get("name") != name
                    or not _count(epochs, n_epochs)
                    or not isinstance(history, dict) or not all(
                        isinstance(v, list) and len(v) == epochs and all(map(_is_number, v))
                        for v in history.values())):
                raise StateUnusable(f"{PHASES_FILE}: phase {quote(str(record), 80)} is not a "
                                    f"finished {name!r} phase of at most {n_epochs} epochs")
            check_weights_file(self.weights(name))
        return records

    def progress(self, phase: str, n_epochs: int) -> Progress | None:
        """The phase's committed epochs, checked (None before the first one)."""
        path = self.progress_file(phase)
        if not path.exists():
            return None
        content = safeio.load_json_object(path, "epoch record", error=StateUnusable)
        rows, best = content.get("epochs"), content.get("best")
        if (content.get("format") != STATE_FORMAT or not isinstance(rows, list)
                or not _count(len(rows), n_epochs)
                or not all(_is_row(row, i) for i, row in enumerate(rows))
                or not isinstance(content.get("stopped"), bool)
                or content.get("latest") != self.epoch_weights(phase, len(rows)).name):
            raise StateUnusable(f"{path.name} is not a record of at most {n_epochs} epochs")
        if best is not None:
            epoch = best.get("epoch") if isinstance(best, dict) else None
            if not (_count(epoch + 1 if _is_int(epoch) else None, len(rows))
                    and _is_number(best.get("value"))
                    and best.get("weights") == self.epoch_weights(phase, epoch + 1).name):
                raise StateUnusable(f"{path.name}: its best epoch is not one of its epochs")
            best = (epoch, float(best["value"]), self.root / best["weights"])
            check_weights_file(best[2])
        latest = self.epoch_weights(phase, len(rows))
        check_weights_file(latest)
        return Progress(rows, content["stopped"], latest, best)

    def commit(self, phase: str, progress: Progress) -> None:
        """Record an epoch: the record (after the weights it names), then the CSV log; weights
        files it no longer names go."""
        safeio.write_text_atomic(self.progress_file(phase), progress.as_json())
        safeio.write_text_atomic(self.log(phase), _csv(progress.rows))
        keep = {progress.latest.name, *([progress.best[2].name] if progress.best else [])}
        self._remove_epoch_weights(phase, keep)

    def _remove_epoch_weights(self, phase: str, keep: set[str]) -> None:
        for path in self.root.glob(f"{phase}.epoch-*.weights.h5"):
            if path.name not in keep:
                path.unlink(missing_ok=True)

    def callbacks(self, phase: str, patience: int, validation: keras.callbacks.Callback,
                  ema: bool = False, resumed: Progress | None = None
                  ) -> list[keras.callbacks.Callback]:
        """A phase's callbacks; ``resumed``: the committed epochs to go on from."""
        # With EMA, the averaged weights are swapped in at each epoch's end (and out at the next
        # epoch's start), so validation, checkpoint and early stopping all see them.
        swap = [keras.callbacks.SwapEMAWeights(swap_on_epoch=True)] if ema else []
        if resumed is None:  # a fresh phase: nothing of an earlier try of it may be kept
            self._remove_epoch_weights(phase, set())
        return [
            *swap,
            validation,  # first after the swap: everything after it reads the exact val_auc
            EpochTimer(),
            keras.callbacks.EarlyStopping(monitor=MONITOR, mode="max", patience=patience),
            keras.callbacks.ReduceLROnPlateau(monitor=MONITOR, mode="max", factor=0.3,
                                              patience=max(1, patience // 2), min_lr=1e-7),
            EpochCommit(self, phase, resumed),  # last: it records what the others decided
        ]

    def finish(self, phase: str, model: keras.Model, progress: Progress) -> dict:
        """Keep the phase's best epoch (the latest without one) and record the phase as done;
        the phase's epoch files go once the record is written."""
        load_weights(model, progress.best[2] if progress.best else progress.latest)
        save_weights(model, self.weights(phase))
        keys = sorted({k for row in progress.rows for k in row} - {"epoch"})
        record = {"name": phase, "epochs": len(progress.rows),
                  "history": {k: [row.get(k, math.nan) for row in progress.rows] for k in keys}}
        records = (safeio.load_json(self.record, "training state", error=StateUnusable)
                   if self.record.exists() else [])
        safeio.write_text_atomic(self.record, json.dumps([*records, record], indent=2))
        self.progress_file(phase).unlink(missing_ok=True)
        self._remove_epoch_weights(phase, set())
        return record

    @contextlib.contextmanager
    def stop_on_signals(self) -> Iterator[None]:
        """SIGTERM and SIGINT unwind the run like an error (every atomic write removes its
        temporary file), said in one line; exits 128 + the signal number."""
        with staging.stop_on_signals():
            try:
                yield
            except staging.Stopped as err:
                note(f"stopped by {signal.Signals(err.signum).name}; {self.root} keeps the "
                     f"finished epochs, the same command resumes from them")
                raise

    def remove(self) -> None:
        """The job is complete: its settings go first, so a kill during the removal leaves a
        state that the next run discards rather than one it resumes."""
        (self.root / JOB_FILE).unlink(missing_ok=True)
        _clear(self.root)
        with contextlib.suppress(OSError):  # kept if it holds what train did not write
            self.root.rmdir()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _count(value: object, most: int) -> bool:
    return _is_int(value) and 1 <= value <= most


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_row(row: object, index: int) -> bool:
    return (isinstance(row, dict) and row.get("epoch") == index and len(row) <= MAX_LOG_KEYS
            and all(isinstance(k, str) and len(k) <= 100 and _is_number(v)
                    for k, v in row.items()))


def _csv(rows: list[dict[str, float]]) -> str:
    keys = ["epoch", *sorted({k for row in rows for k in row} - {"epoch"})]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=keys, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------- callbacks


class EpochTimer(keras.callbacks.Callback):
    """Adds ``epoch_seconds`` and ``epoch_started`` (Unix time, to line epochs up with a GPU
    utilisation log) to each epoch's logs, so the history and epoch log record them."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started, self.started_at = time.perf_counter(), time.time()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.started
            logs["epoch_started"] = self.started_at


class EpochCommit(keras.callbacks.Callback):
    """Commits every epoch (:meth:`PhaseState.commit`): the weights, optimizer state included,
    to a new file, then the record naming it and the best epoch's (``val_auc``, as Keras'
    ModelCheckpoint would keep it). Resumed, it loads the last committed weights when training
    begins, after Keras has built the optimizer, so that its state is restored too."""

    def __init__(self, state: PhaseState, phase: str, resumed: Progress | None = None):
        super().__init__()
        self.state, self.phase, self.resumed = state, phase, resumed
        self.rows = list(resumed.rows) if resumed else []
        self.best = resumed.best if resumed else None

    def on_train_begin(self, logs: dict | None = None) -> None:
        if self.resumed is not None:
            load_weights(self.model, self.resumed.latest)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        row: dict[str, float] = {"epoch": epoch}
        for key, value in sorted((logs or {}).items()):
            try:
                row[str(key)] = float(value)
            except (TypeError, ValueError):
                continue
        latest = self.state.epoch_weights(self.phase, epoch + 1)
        save_weights(self.model, latest)
        value = row.get(MONITOR, math.nan)
        if math.isfinite(value) and (self.best is None or value > self.best[1]):
            self.best = (epoch, value, latest)
        self.rows = [*self.rows[:epoch], row]
        self.state.commit(self.phase, Progress(self.rows, bool(self.model.stop_training),
                                               latest, self.best))
