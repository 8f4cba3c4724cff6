"""Pass 1 of preprocess: decode every given split of a source into a memory-mapped pool.

Each split is decoded at the prepared size into one ``.npy`` in a scratch folder, a chunk at a
time on a thread pool, hashing every image on the way, so no split has to fit in memory. A file
that cannot be used is reported, never raised, so one run can name every bad file.
"""

from __future__ import annotations

import hashlib
import os
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungxray import download, safeio, sources
from lungxray import images as imaging
from lungxray import limits as limiting
from lungxray.limits import Limits

# Prepared pixels decoded or copied per step: memory stays a few times this, whatever the size
# of the dataset.
CHUNK_BYTES = 32 << 20


@dataclass
class Pool:
    """One given split at the prepared size, on disk, with per-image metadata."""

    path: Path | None  # .npy of shape (N, S, S, C); None when the split has no images
    labels: np.ndarray
    hashes: np.ndarray  # sha1 of the prepared pixels, "" for a skipped file
    groups: np.ndarray  # patient ids, "" when unknown
    origins: list[str]  # how reports name each image
    ok: np.ndarray  # False for files that could not be used

    def images(self) -> np.ndarray:
        """The pool's pixels, memory-mapped."""
        return np.load(self.path, mmap_mode="r", allow_pickle=False)


@dataclass(frozen=True)
class Settings:
    """How sources are decoded: prepared size and channels, threads, limits, memory budget."""

    size: int
    channels: int
    keep_aspect: bool
    min_size: int
    workers: int
    limits: Limits = limiting.DEFAULT
    budget: imaging.Budget = field(default_factory=lambda: imaging.Budget(
        limiting.DEFAULT.max_decode_bytes))

    @property
    def rows(self) -> int:
        """Prepared images per chunk of CHUNK_BYTES."""
        return max(1, CHUNK_BYTES // (self.size * self.size * self.channels))


def new_array_file(path: Path, shape: tuple[int, ...]) -> np.memmap:
    """A new uint8 ``.npy`` of ``shape``, memory-mapped for writing, its space allocated first
    (:func:`lungxray.safeio.reserve`): a full disk is then an OSError, not a SIGBUS."""
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    try:
        safeio.reserve(path, os.path.getsize(path))
    except BaseException:
        del array
        raise
    return array


def _new_pool_file(path: Path, n: int, settings: Settings) -> np.memmap | None:
    if n == 0:
        return None
    return new_array_file(path, (n, settings.size, settings.size, settings.channels))


def read_file(path: Path, limit: int) -> bytes:
    """A regular file's bytes, at most ``limit`` of them (:class:`Unusable` otherwise). Opened
    without blocking and checked on the open descriptor, so a FIFO or device put there after
    the scan cannot hang a worker. Preprocess and predict both read image files through it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise Unusable(f"not a regular file ({sources.kind_of(info.st_mode)})")
        if info.st_size > limit:
            raise Unusable(f"{info.st_size:,} bytes, above the limit of {limit:,} "
                            f"(max_file_bytes)")
        # Asks for the size fstat gave, not the limit: read(n) sets aside n bytes up front, and
        # 256 MiB per worker would make every small file cost that much address space.
        data = fh.read(info.st_size + 1)
        if len(data) > info.st_size:  # grew since fstat: the rest, up to the limit
            data += fh.read(limit + 1 - len(data))
    if len(data) > limit:  # grew while being read
        raise Unusable(f"more than {limit:,} bytes (max_file_bytes)")
    return data


class Unusable(Exception):
    """A file refused before decoding; the message says why."""


def _read_one(item: sources.Item, settings: Settings) -> tuple[np.ndarray | None, str, str, str]:
    """(pixels or None, sha1 of the pixels, sha256 of the file bytes, problem or ""); bad input
    is reported, never raised, so one run can name every bad file."""
    if item.problem:
        return None, "", "unusable", item.problem
    try:
        # Read once: hashed for the source digest, then decoded.
        data = read_file(item.path, settings.limits.max_file_bytes)
    except FileNotFoundError:
        return None, "", "missing", "no such file"
    except Unusable as err:
        return None, "", "unusable", str(err)
    except OSError as err:
        return None, "", "unreadable", f"cannot read ({err.strerror or err})"
    digest = hashlib.sha256(data).hexdigest()
    try:
        pixels = imaging.decode(data, item.path.name, settings.size, settings.channels,
                                settings.keep_aspect, settings.min_size, settings.limits,
                                settings.budget)
    except imaging.ImageError as err:
        return None, "", digest, str(err)
    except Exception as err:  # noqa: BLE001 - whatever one file does is that file's problem
        return None, "", digest, f"cannot decode ({type(err).__name__})"
    return pixels, hashlib.sha1(pixels.tobytes()).hexdigest(), digest, ""


def _decode_files(split: sources.FileSet, path: Path,
                  settings: Settings) -> tuple[Pool, list[str], list[tuple[str, str]]]:
    """Decode a FileSet into a pool on a thread pool (PIL and hashlib release the GIL).
    Returns the pool, the sha256 of every file and the (file, problem) list of unusable ones."""
    n = len(split)
    pool = _new_pool_file(path, n, settings)
    hashes = np.full(n, "", dtype=object)
    ok = np.zeros(n, dtype=bool)
    file_digests: list[str] = []
    bad: list[tuple[str, str]] = []
    executor = ThreadPoolExecutor(max_workers=settings.workers)
    try:
        for start in range(0, n, settings.rows):
            batch = split.items[start:start + settings.rows]
            results = executor.map(lambda item: _read_one(item, settings), batch)
            for i, (item, (pixels, pixel_hash, file_digest, problem)) in enumerate(
                    zip(batch, results, strict=True), start=start):
                file_digests.append(file_digest)
                if problem:
                    bad.append((item.origin, problem))
                    continue
                pool[i] = pixels
                hashes[i] = pixel_hash
                ok[i] = True
            if pool is not None:
                pool.flush()  # hands written pages back to the OS: memory stays flat
    finally:
        # On SIGTERM/SIGINT the queued files are dropped, not decoded first.
        executor.shutdown(wait=True, cancel_futures=True)
    del pool
    groups = np.array([item.group for item in split.items], dtype=object)
    return (Pool(path if n else None, split.labels, hashes.astype(str), groups.astype(str),
                 [item.origin for item in split.items], ok), file_digests, bad)


def _decode_arrays(split: sources.ArraySet, path: Path, settings: Settings) -> Pool:
    """Convert an npz member into a pool a chunk at a time."""
    n = len(split)
    pool = _new_pool_file(path, n, settings)
    hashes = []
    start = 0
    # A chunk is bounded in source bytes too: an npz of 40 MP images reads a few at a time.
    rows = min(settings.rows, split.rows_within(CHUNK_BYTES))
    for chunk in split.chunks(rows):
        converted = imaging.convert_array(chunk, settings.size, settings.channels,
                                          settings.keep_aspect)
        pool[start:start + len(converted)] = converted
        hashes += [hashlib.sha1(image.tobytes()).hexdigest() for image in converted]
        start += len(converted)
        pool.flush()
    del pool
    return Pool(path if n else None, split.labels, np.array(hashes, dtype=str),
                np.full(n, "", dtype=str), [split.origin(i) for i in range(n)],
                np.ones(n, dtype=bool))


def decode_all(src: sources.Source, pools_dir: Path,
               settings: Settings) -> tuple[dict[str, Pool], list[dict], str]:
    """Pass 1: every given split into a pool. Returns the pools, the unusable files and the
    source's sha256 (of the npz file, or of every file's path and bytes, good or bad)."""
    pools_dir.mkdir()
    digest = hashlib.sha256()
    for path in src.extra_hashed:
        digest.update(download.file_sha256(path).encode())
    pools: dict[str, Pool] = {}
    bad: list[dict] = []
    for name, split in src.splits.items():
        path = pools_dir / f"{name}.npy"
        if isinstance(split, sources.ArraySet):
            pools[name] = _decode_arrays(split, path, settings)
            continue
        pools[name], file_digests, problems = _decode_files(split, path, settings)
        bad += [{"split": name, "file": f, "reason": r} for f, r in problems]
        for item, file_digest in zip(split.items, file_digests, strict=True):
            digest.update(item.origin.encode() + b"\0" + file_digest.encode())
    source_sha = download.file_sha256(src.root) if src.kind == "npz" else digest.hexdigest()
    return pools, bad, source_sha
