"""DICOM files written by pydicom from real X-ray pixels: photometry, rescale and windowing;
hostile DICOM sizes and deflated bombs refused before their pixels are read (issue 26)."""

from __future__ import annotations

import numpy as np
import pytest

from lungxray import data, images, pixels, prepare
from lungxray import limits as limiting
from tests.data_helpers import real_images, tree_digest, write_dicom
from tests.fuzz import hostile


@pytest.fixture(scope="module")
def xrays(shared_npz) -> tuple[np.ndarray, np.ndarray]:
    """Real X-rays stretched to the full 0..255 range, and their labels."""
    pictures, labels = real_images(shared_npz, 12)
    return np.stack([pixels.stretch(p) for p in pictures]), labels


def decode(path, size: int = 28) -> np.ndarray:
    return images.decode(path.read_bytes(), path.name, size, 1)[..., 0]


def test_monochrome2_16bit_with_full_window_gives_the_original(xrays, tmp_path):
    ref = xrays[0][0]
    path = write_dicom(tmp_path / "m2.dcm", ref.astype(np.uint16) * 16, window=(2048, 4096))
    np.testing.assert_array_equal(decode(path), ref)


def test_monochrome1_is_inverted(xrays, tmp_path):
    ref = xrays[0][0]
    stored = 4095 - ref.astype(np.uint16) * 16  # MONOCHROME1: low values display white
    path = write_dicom(tmp_path / "m1.dcm", stored, photometric="MONOCHROME1",
                       window=(2048, 4096))
    np.testing.assert_array_equal(decode(path), ref)
    plain = write_dicom(tmp_path / "as_m2.dcm", stored, window=(2048, 4096))
    np.testing.assert_array_equal(decode(plain), 255 - ref)


def test_window_is_applied(xrays, tmp_path):
    ref = xrays[0][0]
    stored = ref.astype(np.float64) * 16
    center, width = float(np.median(stored)), 800.0
    path = write_dicom(tmp_path / "w.dcm", stored.astype(np.uint16), window=(center, width))
    # DICOM PS3.3 C.11.2.1.2.1, linear window onto 0..255.
    expected = np.clip((stored - (center - 0.5)) / (width - 1) + 0.5, 0, 1) * 255
    out = decode(path)
    assert np.abs(out - expected).max() <= 1
    assert (out == 0).mean() > 0.05 and (out == 255).mean() > 0.05  # the window clips


def test_rescale_is_applied_before_the_window(xrays, tmp_path):
    ref = xrays[0][0]
    stored = ref.astype(np.uint16) * 16
    # Window in rescaled units (like Hounsfield units): only right after the rescale.
    path = write_dicom(tmp_path / "r.dcm", stored, rescale=(1.0, -1024.0), window=(1024, 4096))
    np.testing.assert_array_equal(decode(path), ref)


def test_dicom_without_extension_or_window_is_recognised(xrays, tmp_path):
    ref = xrays[0][0]
    path = write_dicom(tmp_path / "IM0001", ref.astype(np.uint16) * 257, bits_stored=16)
    np.testing.assert_array_equal(decode(path), ref)


def test_truncated_dicom_is_refused(xrays, tmp_path):
    path = write_dicom(tmp_path / "t.dcm", xrays[0][0].astype(np.uint16) * 16)
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(path.read_bytes()[:-300])
    with pytest.raises(images.ImageError, match="DICOM"):
        decode(cut)
    notdicom = tmp_path / "fake.dcm"
    notdicom.write_bytes(b"\0" * 200)
    with pytest.raises(images.ImageError, match="DICOM"):
        decode(notdicom)


def test_a_dicom_folder_through_preprocess(xrays, tmp_path):
    pictures, labels = xrays
    root = tmp_path / "dicoms"
    for i, (ref, label) in enumerate(zip(pictures, labels, strict=True)):
        stored = ref.astype(np.uint16) * 16
        mono1 = i % 2 == 1
        write_dicom(root / ["NORMAL", "PNEUMONIA"][label] / f"{i:03d}.dcm",
                    4095 - stored if mono1 else stored,
                    photometric="MONOCHROME1" if mono1 else "MONOCHROME2", window=(2048, 4096))
    before = tree_digest(root)
    manifest = prepare.preprocess(str(root), tmp_path / "out", image_size=28,
                                  val_fraction=0.25, test_fraction=0.25, seed=0)
    assert tree_digest(root) == before
    assert manifest["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert sum(s["n"] for s in manifest["splits"].values()) == len(pictures)
    index = {}
    for name in manifest["splits"]:
        split = data.load_split(tmp_path / "out", name)
        index.update({bytes(img.tobytes()): int(lab) for img, lab in
                      zip(split.images, split.labels, strict=True)})
    # Every original image comes back pixel-exact, with its label, whatever its photometry.
    assert index == {ref.tobytes(): int(lab) for ref, lab in zip(pictures, labels, strict=True)}


def test_dicom_declared_size_is_checked_before_pixel_data():
    bomb = hostile.dicom(20000, 20000, pixel_bytes=2)
    with pytest.raises(images.ImageError, match=r"20000x20000 = 400,000,000 pixels, above"):
        images.decode(bomb, "x.dcm", 16, 1)
    with pytest.raises(images.ImageError, match=r"multi-frame DICOM \(7 frames\)"):
        images.decode(hostile.dicom(64, 64, frames="7"), "x.dcm", 16, 1)


def test_deflated_dicom_inflation_is_bounded_and_a_good_one_decodes():
    tight = limiting.with_overrides(limiting.DEFAULT, ["max_image_bytes=1048576"])
    bomb = hostile.dicom(4000, 4000, deflated=True)  # 32 MB of pixels in 32 KB
    with pytest.raises(images.ImageError, match=r"Deflated DICOM inflates to more than "
                                                r"17,825,792 bytes"):
        images.decode(bomb, "x.dcm", 16, 1, limits=tight)
    good = hostile.dicom(64, 64, deflated=True)
    assert images.decode(good, "x.dcm", 16, 1).shape == (16, 16, 1)
