"""Grad-CAM overlays of `lungxray predict --gradcam` at a bounded resolution (issue 34): a
6000x5000 radiograph costs what a 1024 px one does, and the heatmap lands where the model
looked."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from lungxray import limits, overlays

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = SimpleNamespace(limits=limits.DEFAULT, channels=1, keep_aspect=False)


def gradient(width: int, height: int) -> np.ndarray:
    """A grey horizontal ramp (compresses fast, yet every column differs)."""
    return np.broadcast_to((np.arange(width) % 256).astype(np.uint8), (height, width)).copy()


CHILD = textwrap.dedent("""
    import json, resource, sys
    from pathlib import Path
    from types import SimpleNamespace
    import numpy as np
    from lungxray import limits, overlays
    settings = SimpleNamespace(limits=limits.DEFAULT, channels=int(sys.argv[2]),
                               keep_aspect=False)
    heatmap = np.random.default_rng(0).random((32, 32)).astype(np.float32)
    picture = overlays.overlay(overlays.source_image(Path(sys.argv[1]), None, settings),
                               heatmap, False)
    # VmHWM: this process's own peak (ru_maxrss would include the forked parent's pages).
    status = Path("/proc/self/status")
    peak = (int(next(line.split()[1] for line in status.read_text().splitlines()
                     if line.startswith("VmHWM:")))
            if status.exists() else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(json.dumps({"shape": picture.shape, "dtype": str(picture.dtype), "peak_kib": peak}))
""")


@pytest.mark.parametrize("channels", [1, 3])
def test_a_large_image_is_drawn_at_a_bounded_size_in_bounded_memory(tmp_path, channels):
    # Issue 34: a 6300² PNG took > 3 GiB (full resolution, float64); a 6000x5000 one 2.4 GiB
    # and 18 s here. Now it is reduced to 1024 px on its long side first.
    path = tmp_path / "big.png"
    Image.fromarray(gradient(6000, 5000)).save(path, compress_level=1)
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(path), str(channels)], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    result = json.loads(done.stdout)
    assert result["shape"] == [853, 1024, 3] and result["dtype"] == "uint8"
    assert result["peak_kib"] < 1 << 20, result  # under 1 GiB (2.4 GiB before)


def test_a_large_jpeg_and_npz_row_are_reduced_too(tmp_path):
    path = tmp_path / "big.jpg"
    Image.fromarray(gradient(4280, 3520)).convert("RGB").save(path, quality=80)
    grey = overlays.source_image(path, None, SETTINGS)
    assert grey.shape == (842, 1024) and grey.dtype == np.uint8
    rgb = overlays.source_image(path, None, SimpleNamespace(**{**vars(SETTINGS), "channels": 3}))
    assert rgb.shape == (842, 1024, 3)
    row = gradient(1500, 3000)[..., None]  # an npz row: (H, W, 1)
    assert overlays.source_image(None, row, SETTINGS).shape == (1024, 512)
    small = gradient(300, 200)[..., None]  # at most MAX_SIDE: its own size
    np.testing.assert_array_equal(overlays.source_image(None, small, SETTINGS), small[..., 0])


@pytest.mark.parametrize("keep_aspect", [False, True])
def test_the_heatmap_lands_where_the_model_looked(keep_aspect):
    image = np.full((100, 200), 128, np.uint8)  # wide: padded top and bottom in the input
    heatmap = np.zeros((32, 32), np.float32)
    heatmap[:, 16:] = 1.0  # the right half of the model input
    drawn = overlays.overlay(image, heatmap, keep_aspect).astype(int)
    assert drawn.shape == (100, 200, 3)
    red_minus_blue = drawn[..., 0] - drawn[..., 2]
    assert red_minus_blue[:, 150:].min() > 40 and red_minus_blue[:, :50].max() < -40
    # Evidence in the padding rows of a keep_aspect model's input lies outside the image.
    padding = np.zeros((32, 32), np.float32)
    padding[:4] = 1.0
    top = overlays.overlay(image, padding, keep_aspect).astype(int)[0]
    if keep_aspect:  # rows 0-7 of 32 are padding: nothing of it is drawn
        assert (top[:, 0] - top[:, 2]).max() < -40
    else:  # the whole input is the image: its top rows are hot
        assert (top[:, 0] - top[:, 2]).min() > 40


def test_predict_gradcam_on_a_large_radiograph(tmp_path):
    from lungxray import predict
    from tests.test_model_loader import small_model_dir

    model = small_model_dir(tmp_path / "model")
    source = tmp_path / "incoming"
    source.mkdir()
    Image.fromarray(gradient(3000, 2400)).save(source / "big.png", compress_level=1)
    Image.fromarray(gradient(60, 40)).save(source / "small.png")
    predict.predict(model, str(source), tmp_path / "out", explain=True)
    table = predict.read_predictions(tmp_path / "out" / predict.PREDICTIONS_FILE)
    sizes = {p: Image.open(tmp_path / "out" / g).size
             for p, g in zip(table["path"], table["gradcam"], strict=True)}
    assert sizes == {"big.png": (1024, 819), "small.png": (60, 40)}
