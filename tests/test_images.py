"""lungxray.images: every supported pixel format decodes to one fixed uint8 layout; hostile
images are refused before decoding, any decoder failure is that file's one-line error, and
large decodes share one memory budget (issue 26)."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
from PIL import Image

from lungxray import images, pixels
from lungxray import limits as limiting
from tests.data_helpers import one_line, real_images
from tests.fuzz import hostile


@pytest.fixture(scope="module")
def xray(shared_npz) -> np.ndarray:
    """A real 28 px chest X-ray, stretched to use the full 0..255 range."""
    return pixels.stretch(real_images(shared_npz, 1)[0][0])


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def test_8bit_grey_png_round_trips_exactly(xray):
    out = images.decode(encode(Image.fromarray(xray)), "a.png", 28, 1)
    assert out.shape == (28, 28, 1) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., 0], xray)


@pytest.mark.parametrize("scale, bits", [(257, 16), (16, 12)])
def test_16bit_png_is_scaled_not_clipped(xray, scale, bits):
    wide = Image.fromarray(xray.astype(np.uint16) * scale)  # 16 bit, or 12 bit in 16
    assert wide.mode.startswith("I")
    out = images.decode(encode(wide), "wide.png", 28, 1)
    # Clipping (what PIL's plain convert("L") does) would turn most pixels white.
    np.testing.assert_array_equal(out[..., 0], xray)


def test_rgb_is_converted_with_luma_weights_and_grey_to_rgb_repeats(xray):
    rgb = np.stack([xray, np.zeros_like(xray), np.zeros_like(xray)], axis=-1)
    grey = images.decode(encode(Image.fromarray(rgb)), "c.png", 28, 1)[..., 0]
    np.testing.assert_allclose(grey, xray * 0.299, atol=1)
    out = images.decode(encode(Image.fromarray(xray)), "g.png", 28, 3)
    assert out.shape == (28, 28, 3)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_rgba_transparent_pixels_become_black(xray):
    rgba = np.zeros((28, 28, 4), np.uint8)
    rgba[..., :3] = 255  # white under the transparent half
    rgba[:, :14, 3] = 0
    rgba[:, 14:, 3] = 255
    out = images.decode(encode(Image.fromarray(rgba, "RGBA")), "t.png", 28, 1)[..., 0]
    assert (out[:, :14] == 0).all() and (out[:, 14:] == 255).all()


def test_palette_image_gives_its_palette_colours(xray):
    palette = Image.fromarray(xray).convert("P")
    out = images.decode(encode(palette), "p.png", 28, 1)[..., 0]
    np.testing.assert_array_equal(out, np.asarray(palette.convert("L")))


def test_exif_orientation_is_applied(xray):
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = images.decode(encode(Image.fromarray(xray), exif=exif), "r.png", 28, 1)[..., 0]
    np.testing.assert_array_equal(out, np.rot90(xray, k=-1))
    assert not np.array_equal(out, xray)


def test_keep_aspect_pads_instead_of_stretching():
    wide = Image.new("L", (64, 32), 255)
    padded = images.decode(encode(wide), "w.png", 32, 1, keep_aspect=True)[..., 0]
    assert (padded[:8] == 0).all() and (padded[-8:] == 0).all() and (padded[8:24] == 255).all()
    stretched = images.decode(encode(wide), "w.png", 32, 1)[..., 0]
    assert (stretched == 255).all()


def test_large_jpeg_decodes_close_to_the_png_path(xray):
    big = Image.fromarray(xray).resize((512, 512), Image.Resampling.BILINEAR)
    from_png = images.decode(encode(big), "b.png", 64, 1).astype(int)
    from_jpeg = images.decode(encode(big, "JPEG", quality=95), "b.jpg", 64, 1).astype(int)
    assert np.abs(from_png - from_jpeg).mean() < 2.0


@pytest.mark.parametrize("data, reason", [
    (b"", "empty file"),
    (b"just some notes, not pixels", "not an image"),
])
def test_unusable_bytes_say_why(data, reason):
    with pytest.raises(images.ImageError, match=reason):
        images.decode(data, "x.png", 28, 1)


def test_truncated_png_and_jpeg_are_refused(xray):
    big = Image.fromarray(xray).resize((256, 256))
    for fmt in ("PNG", "JPEG"):
        data = encode(big, fmt)
        with pytest.raises(images.ImageError, match="corrupt or truncated"):
            images.decode(data[: len(data) // 2], f"half.{fmt.lower()}", 28, 1)


def test_images_below_the_minimum_size_are_refused(xray):
    with pytest.raises(images.ImageError, match="5x5 px, below the minimum of 8 px"):
        images.decode(encode(Image.new("L", (5, 5))), "tiny.png", 28, 1)
    with pytest.raises(images.ImageError, match="28x28 px, below the minimum of 64 px"):
        images.decode(encode(Image.fromarray(xray)), "a.png", 64, 1, min_size=64)


def test_convert_array_resizes_and_changes_channels(xray):
    batch = np.stack([xray, 255 - xray])[..., np.newaxis]
    assert images.convert_array(batch, 28, 1) is batch  # nothing to do: no copy
    rgb = images.convert_array(batch, 28, 3)
    assert rgb.shape == (2, 28, 28, 3) and (rgb[..., 2] == batch[..., 0]).all()
    small = images.convert_array(batch, 14, 1)
    expected = np.asarray(Image.fromarray(xray).resize((14, 14), images.RESAMPLE))
    np.testing.assert_array_equal(small[0, ..., 0], expected)


def test_16bit_png_over_the_pixel_limit_is_refused_before_decoding():
    with pytest.raises(images.ImageError, match=r"13000x13000 = 169,000,000 pixels, above the "
                                                r"limit of 40,000,000 \(max_image_pixels\)"):
        images.decode(hostile.png_16bit(13000, full=False), "p.png", 16, 1)
    with pytest.raises(images.ImageError, match=r"7000x7000 = 49,000,000 pixels"):
        images.decode(hostile.png_16bit(7000, full=False), "p.png", 16, 1)
    more = limiting.with_overrides(limiting.DEFAULT, ["max_image_pixels=50000000"])
    assert images.decode(hostile.png_16bit(7000, full=False), "p.png", 16, 1,
                         limits=more).shape == (16, 16, 1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("payload", "name", "message"), [
    (hostile.dicom_nested(5000), "n.dcm", r"corrupt DICOM file \(RecursionError"),
    (hostile.dicom(64, 64, frames="x"), "f.dcm", r"DICOM NumberOfFrames is not a number"),
    (hostile.dds_unsupported(), "d.png", r"corrupt or truncated image \(NotImplementedError"),
    (hostile.dicom(64, 64, pixel_bytes=10), "short.dcm", r"cannot decode DICOM pixel data"),
    (b"\0" * 128 + b"DICM" + b"\xff" * 64, "junk.dcm", r"DICOM"),
])
def test_any_decoder_failure_is_that_files_image_error(payload, name, message):
    with pytest.raises(images.ImageError, match=message) as err:
        images.decode(payload, name, 16, 1)
    one_line(err)


def test_budget_lets_large_decodes_run_one_at_a_time():
    budget, inside, most = images.Budget(100), [0], [0]
    lock = threading.Lock()

    def work(cost: int) -> None:
        with budget.hold(cost):
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.02)
            with lock:
                inside[0] -= 1

    threads = [threading.Thread(target=work, args=(60,)) for _ in range(4)]
    threads.append(threading.Thread(target=work, args=(500,)))  # above the budget: alone
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and budget.used == 0
