"""Open a model folder for inference through one bounded loader: predict, export, evaluate and
challenge (the champion's model too) load every model here.

A model folder is a `lungxray train` output (``model.keras`` + ``model_info.json``) or a saved
ensemble (``ensemble.json`` + ``model_info.json`` + ``members/<name>/``, each a train output).
Every file the loader needs is checked on its ``lstat`` before zipfile, h5py or Keras opens it:
inside the folder once links are resolved, a regular file (a FIFO would hang the reader, a link
to /dev/zero never end, a directory is no file), within the limits (``max_json_bytes`` for the
JSON files, read by the bounded reader; ``max_model_folder_bytes`` for the archives together).
Then each archive is checked without building anything:

- its zip directory and ``config.json`` (:func:`lungxray.safeio.check_keras_archive`);
- its members are what Keras writes (``config.json``, ``metadata.json``, ``model.weights.h5``
  stored uncompressed): Keras would unpack any other member to disk, and would read a
  compressed weights file whole into memory;
- ``model.weights.h5`` holds plain number arrays in the file itself, declaring no more bytes
  than the file has: Keras reads a dataset whole before it compares its shape, so a compressed
  dataset declaring gigabytes, or one stored in another file (/dev/zero), is refused here.

No TensorFlow is imported for these checks. Keras then loads each archive in ``safe_mode``
through :func:`lungxray.models.load_model`, which first builds the network without allocating
its variables and refuses one that needs more memory than its weights file holds.
"""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from lungxray import limits as limiting
from lungxray import safeio, schema, site_metrics, sites
from lungxray.artifacts import ENSEMBLE_FILE, INFO_FILE, MEMBERS_DIR, MODEL_FILE
from lungxray.errors import LungxrayError, ModelError, quote, quote_repr
from lungxray.limits import Limits

if TYPE_CHECKING:
    from lungxray.predictor import Predictor

WEIGHTS_MEMBER = "model.weights.h5"
KERAS_MEMBERS = frozenset({"config.json", "metadata.json", WEIGHTS_MEMBER})
MAX_H5_OBJECTS = 100_000  # groups and datasets in a weights file (ConvNeXtXLarge has ~2,000)
_LOCAL_HEADER = struct.Struct("<4s22xHH")  # zip local file header: signature, name/extra sizes
_NUMBER_KINDS = "biuf"  # bool, int, uint, float: what a Keras variable holds


class InputShape(NamedTuple):
    """The images a network takes, as model_info.json says: ``size`` x ``size`` x
    ``channels`` (predict's Settings has the same two fields)."""

    size: int
    channels: int


@dataclass(frozen=True)
class ModelFolder:
    """A model folder whose files passed every check: its info and the archives to load."""

    path: Path
    info: dict[str, Any]
    archives: tuple[Path, ...]  # one model.keras per member (one for a single model)


def open_folder(model_dir: Path | str, limits: Limits | None = None) -> ModelFolder:
    """Check a model folder (see the module docstring) without loading any network; a folder
    that holds no usable model is a one-line ModelError."""
    model_dir = Path(model_dir)
    limits = limits or limiting.from_env()
    if not model_dir.is_dir():
        raise ModelError(f"{model_dir}: no such model directory")
    if os.path.lexists(model_dir / ENSEMBLE_FILE):
        info, relatives = _ensemble(model_dir, limits)
    else:
        info, relatives = _info(model_dir, Path(), limits), [Path(MODEL_FILE)]
    archives, total = [], 0
    for relative in relatives:
        try:
            _, size = safeio.check_model_file(model_dir, relative, "model file",
                                              limits.max_model_folder_bytes)
        except FileNotFoundError as err:
            raise ModelError(f"{model_dir}: not a lungxray model ({err})") from None
        total += size
        if total > limits.max_model_folder_bytes:
            raise ModelError(f"{model_dir}: model files hold more than "
                             f"{limits.max_model_folder_bytes} bytes (max_model_folder_bytes)")
        check_archive(model_dir / relative, limits)
        archives.append(model_dir / relative)
    return ModelFolder(model_dir, _checked_info(info, model_dir, limits), tuple(archives))


def load(model_dir: Path | str, limits: Limits | None = None) -> Predictor:
    """The model or ensemble in ``model_dir``, after :func:`open_folder`'s checks, loaded by
    Keras in safe mode; each network's input must be what ``model_info.json`` says."""
    limits = limits or limiting.from_env()
    folder = open_folder(model_dir, limits)  # before TensorFlow is imported: refusals are quick
    from lungxray import models
    from lungxray.predictor import Predictor

    members = [models.load_model(path, limits) for path in folder.archives]
    check_input_size(members, _expected_input(folder.info, folder.path), folder.path)
    classes = len(folder.info["class_names"])
    for model in members:
        outputs = model.outputs[0].shape[-1] if len(model.outputs) == 1 else None
        if outputs != classes:
            raise ModelError(f"{folder.path}: the network gives {outputs} class probabilities "
                             f"but its info names {classes} classes")
    return Predictor(folder.info, members)


def read_model_info(model_dir: Path | str) -> dict[str, Any]:
    """A model folder's model_info.json, read within the size and depth limits (the info only:
    nothing of the network is opened)."""
    path = Path(model_dir) / INFO_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: no {INFO_FILE}; is this a `lungxray train` output?")
    return safeio.load_json_object(path, "model info", error=ModelError)


def check_input_size(members: list[Any], settings: Any, model_dir: Path) -> None:
    """model_info.json must describe the saved network's input, or every prediction is wrong;
    ``settings`` has the ``size`` and ``channels`` the info gives (an :class:`InputShape`)."""
    expected = (settings.size, settings.size, settings.channels)
    for model in members:
        shape = tuple(model.inputs[0].shape[1:])
        if shape != expected:
            raise ModelError(f"{model_dir}: the network takes {shape} images but its info says "
                             f"{expected}")


# --------------------------------------------------------------------------- folder layout


def _json(model_dir: Path, relative: Path, what: str, limits: Limits) -> dict[str, Any]:
    """A JSON object file of the folder: checked in place, then read by the bounded reader."""
    safeio.check_model_file(model_dir, relative, what, limits.max_json_bytes)
    return safeio.load_json_object(model_dir / relative, what, limits, ModelError)


def _info(model_dir: Path, relative: Path, limits: Limits) -> dict[str, Any]:
    """``model_info.json`` of the model at ``model_dir/relative``."""
    where = model_dir / relative
    try:
        return _json(model_dir, relative / INFO_FILE, "model info", limits)
    except FileNotFoundError:
        raise ModelError(f"{where}: not a lungxray model (no {INFO_FILE}; is this a `lungxray "
                         f"train` output?)") from None


def _ensemble(model_dir: Path, limits: Limits) -> tuple[dict[str, Any], list[Path]]:
    """(info, archive paths relative to ``model_dir``) of a saved ensemble, its members
    checked against the spec."""
    spec_path = model_dir / ENSEMBLE_FILE
    spec = _json(model_dir, Path(ENSEMBLE_FILE), "ensemble spec", limits)
    names = spec.get("members")
    if not isinstance(names, list) or not 2 <= len(names) <= schema.MAX_MODELS:
        raise ModelError(f"{spec_path}: 'members' must list 2 to {schema.MAX_MODELS} member "
                         f"model dirs")
    relatives = []
    for name in names:
        # The spec is input like any other: a member is one folder name inside members/.
        if not isinstance(name, str) or name in {"", ".", ".."} or "/" in name or "\\" in name:
            raise ModelError(f"{spec_path}: member {quote(str(name), 60)} is not a directory in "
                             f"{model_dir / MEMBERS_DIR}")
        member = Path(MEMBERS_DIR, name)
        if not (model_dir / member).is_dir():
            raise ModelError(f"{spec_path}: member {quote(name, 60)} is not a directory in "
                             f"{model_dir / MEMBERS_DIR}")
        info = _info(model_dir, member, limits)
        for key in ("class_names", "image_size", "channels"):
            if info.get(key) != spec.get(key):
                raise ModelError(f"{spec_path}: member {quote(name, 60)} has {key}="
                                 f"{quote_repr(info.get(key), 80)}, the ensemble "
                                 f"{quote_repr(spec.get(key), 80)}")
        relatives.append(member / MODEL_FILE)
    return {**spec, "ensemble": True}, relatives


def _checked_info(info: dict[str, Any], model_dir: Path, limits: Limits) -> dict[str, Any]:
    """The info every command reads, its fields checked: class names, input, threshold, name
    (a copy; an absent threshold is None, an absent name the folder's)."""
    where = f"{model_dir}: model info"
    names = info.get("class_names")
    if (not isinstance(names, list) or not 2 <= len(names) <= limits.max_classes
            or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ModelError(f"{where} needs 'class_names': 2 to {limits.max_classes} distinct "
                         f"names, got {quote_repr(names, 80)}")
    _expected_input(info, model_dir)
    threshold = info.get("threshold")
    if threshold is not None and (not isinstance(threshold, int | float)
                                  or isinstance(threshold, bool) or not 0 <= threshold <= 1):
        raise ModelError(f"{where}: 'threshold' must be a number in 0..1 or null, got "
                         f"{quote_repr(threshold, 40)}")
    _check_site_thresholds(info.get(site_metrics.SITE_THRESHOLDS), where)
    name = info.get("model_name", model_dir.name)
    if not isinstance(name, str) or not isinstance(info.get("keep_aspect", False), bool):
        raise ModelError(f"{where}: 'model_name' must be text and 'keep_aspect' true or false")
    return {**info, "threshold": threshold, "model_name": name}


def _check_site_thresholds(found: Any, where: str) -> None:
    """``site_thresholds``: absent, null or {site name: number in 0..1}, at most MAX_SITES."""
    if found is None:
        return
    what = f"{where}: '{site_metrics.SITE_THRESHOLDS}'"
    if not isinstance(found, dict) or len(found) > sites.MAX_SITES:
        raise ModelError(f"{what} must map at most {sites.MAX_SITES} site names to thresholds, "
                         f"got {quote_repr(found, 80)}")
    for name, value in found.items():
        sites.check_name(name, what, ModelError)
        if (not isinstance(value, int | float) or isinstance(value, bool)
                or not 0 <= value <= 1):
            raise ModelError(f"{what}: the threshold of site {name!r} must be a number in 0..1, "
                             f"got {quote_repr(value, 40)}")


def _expected_input(info: dict[str, Any], model_dir: Path) -> InputShape:
    """The input the info promises; checked before any network is built."""
    size, channels = info.get("image_size"), info.get("channels")
    if (not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= 1 << 16
            or channels not in (1, 3) or isinstance(channels, bool)):
        raise ModelError(f"{model_dir}: model info lacks a usable image_size/channels (got "
                         f"{quote_repr(size, 40)}, {quote_repr(channels, 40)})")
    return InputShape(size, channels)


# --------------------------------------------------------------------------- one archive


def check_archive(path: Path, limits: Limits | None = None) -> None:
    """Check one ``.keras`` archive (a regular file already checked) without building its
    network: the zip directory and config.json, the member names, the weights file."""
    limits = limits or limiting.from_env()
    safeio.check_keras_archive(path, limits)
    what = f"cannot load model file {quote(str(path))}"  # as models.load_model says it
    try:
        with zipfile.ZipFile(path) as archive:
            members = {m.filename: m for m in archive.infolist()}
    except (zipfile.BadZipFile, OSError) as err:  # changed since check_keras_archive read it
        raise ModelError(f"{what}: {err}") from None
    unexpected = sorted(set(members) - KERAS_MEMBERS)
    if unexpected:
        raise ModelError(f"{what}: it holds {quote(', '.join(unexpected), 80)}; a Keras archive "
                         f"holds only {', '.join(sorted(KERAS_MEMBERS))}")
    weights = members.get(WEIGHTS_MEMBER)
    if weights is None:
        raise ModelError(f"{what}: it has no {WEIGHTS_MEMBER}")
    if weights.compress_type != zipfile.ZIP_STORED:
        raise ModelError(f"{what}: {WEIGHTS_MEMBER} is compressed; Keras stores it "
                         f"uncompressed (save the model again with model.save)")
    _check_weights(path, weights, what)


class _Window(io.RawIOBase):
    """Read-only view of ``size`` bytes at ``start`` of an open file: the stored weights file
    inside the archive, read in place (h5py seeks back and forth; zipfile would re-read)."""

    def __init__(self, fd: int, start: int, size: int) -> None:
        super().__init__()
        self.fd, self.start, self.size, self.position = fd, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer: Any) -> int:
        count = max(0, min(len(buffer), self.size - self.position))
        data = os.pread(self.fd, count, self.start + self.position) if count else b""
        buffer[:len(data)] = data
        self.position += len(data)
        return len(data)


def _check_weights(path: Path, member: zipfile.ZipInfo, what: str) -> None:
    """The stored weights file: plain number datasets inside it, declaring at most its size."""
    import h5py

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ModelError(f"{what}: it changed into a non-regular file")
        header = os.pread(fd, _LOCAL_HEADER.size, member.header_offset)
        if len(header) != _LOCAL_HEADER.size or header[:4] != b"PK\x03\x04":
            raise ModelError(f"{what}: {WEIGHTS_MEMBER} has no valid zip entry header")
        _, name_len, extra_len = _LOCAL_HEADER.unpack(header)
        start = member.header_offset + _LOCAL_HEADER.size + name_len + extra_len
        if start + member.file_size > os.fstat(fd).st_size:
            raise ModelError(f"{what}: it is truncated inside {WEIGHTS_MEMBER}")
        window = io.BufferedReader(_Window(fd, start, member.file_size))
        try:
            with h5py.File(window, "r") as h5:
                declared = _declared_bytes(h5, f"{what}: {WEIGHTS_MEMBER}")
        except LungxrayError:
            raise
        except Exception as err:  # noqa: BLE001 - HDF5 raises many kinds on a damaged file
            raise ModelError(f"{what}: {WEIGHTS_MEMBER} is not a readable HDF5 file "
                             f"({type(err).__name__}: {quote(' '.join(str(err).split()), 160)})"
                             ) from None
    finally:
        os.close(fd)
    if declared > member.file_size:
        raise ModelError(f"{what}: {WEIGHTS_MEMBER} declares {declared} bytes of weights in a "
                         f"file of {member.file_size} bytes (compressed or lying datasets)")


def _declared_bytes(h5: Any, where: str) -> int:
    """Bytes the datasets of an open HDF5 file declare; links to elsewhere, datasets stored in
    other files and anything but plain numbers are refused."""
    import h5py

    total, seen, problem = 0, 0, ""

    def visit(name: str, link: Any) -> bool | None:
        nonlocal total, seen, problem
        seen += 1
        if seen > MAX_H5_OBJECTS:
            problem = f"holds more than {MAX_H5_OBJECTS} objects"
        elif not isinstance(link, h5py.HardLink):
            problem = f"{quote(name, 80)} is a {type(link).__name__}"
        else:
            item = h5[name]
            if isinstance(item, h5py.Dataset):
                if item.is_virtual or item.external:
                    problem = f"{quote(name, 80)} is stored outside the file"
                elif item.dtype.kind not in _NUMBER_KINDS:
                    problem = f"{quote(name, 80)} holds {item.dtype}, not numbers"
                else:
                    total += int(item.size) * item.dtype.itemsize
        return True if problem else None  # a value other than None stops the walk

    h5.visititems_links(visit)
    if problem:
        raise ModelError(f"{where} {problem}")
    return total
