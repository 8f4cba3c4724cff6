"""What every decoder shares: the declared-size check before decoding, the one-line "why" of a
decoder's exception, and the 8-bit stretch that never copies a whole image as float64."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from lungxray import limits as limiting
from lungxray import pixels


def test_stretch_makes_no_full_float64_copy():
    wide = (np.arange(3000 * 3000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(3000, -1)
    tracemalloc.start()
    try:
        out = pixels.stretch(wide)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert out.dtype == np.uint8 and out.max() == 255 and out.min() == 0
    assert peak < 4 * wide.size  # a float64 copy alone would be 8 bytes per pixel
    floats = np.array([[np.nan, 0.0, np.inf], [1.0, -np.inf, 2.0]])
    np.testing.assert_array_equal(pixels.stretch(floats), [[0, 0, 255], [128, 0, 255]])



def test_stretch_of_a_flat_image_is_black_and_a_transform_applies_first():
    assert not pixels.stretch(np.full((4, 4), 700, np.uint16)).any()
    ramp = np.array([[0, 1000], [2000, 4000]], np.uint16)
    np.testing.assert_array_equal(pixels.stretch(ramp), [[0, 64], [128, 255]])
    # An inverting transform (MONOCHROME1) flips the scale.
    np.testing.assert_array_equal(pixels.stretch(ramp, lambda block: -block.astype(float)),
                                  [[255, 191], [128, 0]])


def test_declared_sizes_over_the_limits_are_refused_before_decoding():
    tight = limiting.with_overrides(limiting.DEFAULT, ["max_image_pixels=100",
                                                       "max_image_bytes=200"])
    pixels.check_pixels(10, 10, tight)  # at the limits: fine
    with pytest.raises(pixels.ImageError, match=r"declares an empty image \(0x5 px\)"):
        pixels.check_pixels(0, 5, tight)
    with pytest.raises(pixels.ImageError, match=r"11x10 = 110 pixels, above the limit of 100 "
                                                r"\(max_image_pixels\)"):
        pixels.check_pixels(11, 10, tight)
    with pytest.raises(pixels.ImageError, match=r"10x10 px x 3 frame\(s\) x 1 bytes = 300 "
                                                r"decoded bytes, above the limit of 200"):
        pixels.check_pixels(10, 10, tight, frames=3)


def test_a_decoders_exception_is_described_on_one_cut_line():
    assert pixels.describe(OSError("broken\n  data stream")) == "broken data stream"
    assert pixels.describe(NotImplementedError()) == "NotImplementedError"
    assert pixels.describe(KeyError("x")) == "KeyError: 'x'"
    long = pixels.describe(ValueError("y" * 5000))
    assert long.endswith("... (5000 characters)") and len(long) < 1000 and "\n" not in long
