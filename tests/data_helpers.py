"""Builders for raw sources made from the real PneumoniaMNIST pixels (folders, CSV, DICOM), and
the small hostile-input sources and checks the readers' tests share."""

from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lungxray import data
from lungxray.prepare import preprocess
from tests.fuzz import hostile

CLASSES = ("NORMAL", "PNEUMONIA")


def real_images(shared_npz: Path, per_class: int, offset: int = 0,
                split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """``per_class`` distinct real images of each class, (N, 28, 28) uint8 and labels."""
    with np.load(shared_npz, allow_pickle=False) as archive:
        images, labels = archive[f"{split}_images"], archive[f"{split}_labels"].reshape(-1)
    # Skip exact duplicates so tests control every duplicate themselves.
    _, first = np.unique(images.reshape(len(images), -1), axis=0, return_index=True)
    unique = np.zeros(len(images), bool)
    unique[first] = True
    picked = [np.flatnonzero((labels == c) & unique)[offset:offset + per_class] for c in (0, 1)]
    index = np.concatenate(picked)
    return images[index], labels[index].astype(np.int64)


def load_npz(path: Path) -> dict[str, data.Split]:
    """Every split of a MedMNIST-style ``.npz``, read here with numpy alone: images as
    (N, H, W, C) uint8, as preprocess prepares them, and labels as (N,) integers."""
    with np.load(path, allow_pickle=False) as archive:
        names = [k.removesuffix("_images") for k in archive.files if k.endswith("_images")]
        return {name: data.Split(
            archive[f"{name}_images"][..., None] if archive[f"{name}_images"].ndim == 3
            else archive[f"{name}_images"],
            archive[f"{name}_labels"].reshape(-1).astype(np.int64)) for name in names}


def image_hashes(images: np.ndarray) -> set[str]:
    """sha1 of each image's pixels: equal sets = identical images."""
    return {hashlib.sha1(image.tobytes()).hexdigest() for image in images}


def write_folder(root: Path, images: np.ndarray, labels: np.ndarray, size: int = 64,
                 names: tuple[str, ...] = CLASSES, prefix: str = "img",
                 ext: str = "png") -> list[Path]:
    """One image file per image under ``root/<class>/``, upscaled to ``size``."""
    paths = []
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        folder = root / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{prefix}{i:04d}.{ext}"
        Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR).save(path)
        paths.append(path)
    return paths


def tree_digest(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mode of every file under ``root``: equal before and after = untouched."""
    return {p.relative_to(root).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(),
                                             p.stat().st_mode)
            for p in sorted(root.rglob("*")) if p.is_file()}


def write_dicom(path: Path, pixels: np.ndarray, photometric: str = "MONOCHROME2",
                bits_stored: int = 12, window: tuple[float, float] | None = None,
                rescale: tuple[float, float] | None = None) -> Path:
    """A single-frame 16-bit DICOM file written by pydicom itself."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientID = "anon"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    if rescale is not None:
        ds.RescaleSlope, ds.RescaleIntercept = rescale
    ds.PixelData = pixels.astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def prepare_16px(source: Path, output: Path, **options) -> dict:
    """preprocess at 16 px with quarter val and test fractions, as the readers' tests run it."""
    return preprocess(str(source), output, seed=0, image_size=16, val_fraction=0.25,
                      test_fraction=0.25, **options)


def assert_clean(output: Path) -> None:
    """A refused preparation left neither its output nor a staging folder."""
    assert not output.exists()
    assert not list(output.parent.glob(".prepare-*"))


def one_line(err: pytest.ExceptionInfo, most: int = 1200) -> str:
    """The raised error's message, checked to be one line shorter than ``most``."""
    text = str(err.value)
    assert "\n" not in text and len(text) < most, text[:300]
    return text


def csv_source(root: Path, extra: str = "", header: str = "path,label") -> Path:
    """A CSV manifest of 8 small good images under ``root``, then the ``extra`` rows."""
    rows = hostile.csv_folder(root, 8)
    (root / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n" + extra)
    return root / "labels.csv"


def folder_source(root: Path, per_class: int = 4) -> Path:
    """A flat folder of classes ``a`` and ``b`` holding ``per_class`` small good PNGs each."""
    for i in range(per_class):
        for label in ("a", "b"):
            path = root / label / f"good{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(hostile.small_png(i * 40 + (label == "b") * 10))
    return root


def nih_rows(nih: Path) -> list[dict]:
    """The rows of the NIH site's manifest.csv (path, label, patient_id, ...)."""
    with open(nih, newline="") as fh:
        return list(csv.DictReader(fh))
