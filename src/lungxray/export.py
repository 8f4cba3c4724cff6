"""Export a trained model (or a saved ensemble) as a TensorFlow SavedModel for TF Serving/KServe.

The layout is TF Serving's: ``<output>/<version>/saved_model.pb`` and ``variables/``, so
``<output>`` is the ``model_base_path`` of TF Serving and the ``storageUri`` of a KServe
``InferenceService`` (``modelFormat: tensorflow``). Three signatures, each returning
``probabilities`` (N, K) float32, ``class_index`` (N,) int64 and ``class_name`` (N,) string:

- ``serving_default``: ``images`` float32 (N, S, S, C), raw pixels 0..255 at the model's size;
- ``predict_uint8``: the same as uint8;
- ``predict_image_bytes``: ``image_bytes`` (N,) string of encoded PNG/JPEG/BMP/GIF files,
  decoded grey or RGB as the model expects and resized to S x S as the data step does
  (bilinear with antialiasing, rounded to uint8; padded with black for ``keep_aspect`` models).

The class is decided as in ``lungxray predict``: binary models at their saved validation
threshold on the positive class, others by the most probable class. An ensemble is exported as
the mean of its members' probabilities, as it is evaluated.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from lungxray.errors import ConfigError

METADATA_DIR = "assets.extra"  # TF Serving's place for files it does not read itself
METADATA_FILE = "lungxray.json"
SIGNATURES = ("serving_default", "predict_uint8", "predict_image_bytes")
OUTPUTS = ("probabilities", "class_index", "class_name")


def _decode_jpeg(data, size: int, channels: int):
    """A JPEG decoded as PIL's draft mode, which the data step uses, decodes it: libjpeg scales
    by 1/2, 1/4 or 1/8 while decoding when the target is that much smaller, accurate DCT."""
    import tensorflow as tf

    height_width = tf.io.extract_jpeg_shape(data)[:2]
    scale = tf.reduce_min(height_width // size)
    branch = tf.reduce_sum(tf.cast(scale >= [2, 4, 8], tf.int32))
    return tf.switch_case(branch, [
        (lambda r=r: tf.io.decode_jpeg(data, channels=channels, ratio=r,
                                       dct_method="INTEGER_ACCURATE"))
        for r in (1, 2, 4, 8)])


def decode_images(image_bytes, settings):
    """(N,) encoded PNG/JPEG/BMP/GIF strings -> (N, S, S, C) float32 pixels, in the graph, as
    :func:`lungxray.images.decode` prepares files: grey or RGB, bilinear with antialiasing
    (PIL's), rounded to uint8 values; an image already at size is left as it is."""
    import tensorflow as tf

    size, channels = settings.size, settings.channels

    def decode_one(data):
        image = tf.cond(tf.io.is_jpeg(data), lambda: _decode_jpeg(data, size, channels),
                        lambda: tf.io.decode_image(data, channels=channels, dtype=tf.uint8,
                                                   expand_animations=False))
        image.set_shape([None, None, channels])
        pixels = tf.cast(image, tf.float32)
        if settings.keep_aspect:
            resized = tf.image.resize_with_pad(pixels, size, size, method="bilinear",
                                               antialias=True)
        else:
            resized = tf.image.resize(pixels, [size, size], method="bilinear", antialias=True)
        same = tf.reduce_all(tf.equal(tf.shape(image)[:2], [size, size]))
        return tf.cond(same, lambda: pixels,
                       lambda: tf.clip_by_value(tf.round(resized), 0.0, 255.0))

    return tf.map_fn(decode_one, image_bytes,
                     fn_output_signature=tf.TensorSpec([size, size, channels], tf.float32))


def serving_functions(members: list[Any], info: dict[str, Any]) -> dict[str, Any]:
    """{signature name: (python function, input signature)} over the Keras ``members``."""
    import tensorflow as tf

    from lungxray.predict import settings_for

    settings = settings_for(info)
    size, channels = settings.size, settings.channels
    class_names = tf.constant([str(c) for c in info["class_names"]])
    threshold = info.get("threshold")
    binary = len(info["class_names"]) == 2 and threshold is not None

    def outputs(images):
        probs = tf.add_n([tf.cast(m(images, training=False), tf.float32) for m in members])
        probs = probs / float(len(members))
        if binary:
            index = tf.cast(probs[:, 1] >= float(threshold), tf.int64)
        else:
            index = tf.argmax(probs, axis=1, output_type=tf.int64)
        return {"probabilities": probs, "class_index": index,
                "class_name": tf.gather(class_names, index)}

    def serving_default(images):
        return outputs(images)

    def predict_uint8(images):
        return outputs(tf.cast(images, tf.float32))

    def predict_image_bytes(image_bytes):
        return outputs(decode_images(image_bytes, settings))

    shape = [None, size, size, channels]
    return {
        "serving_default": (serving_default, [tf.TensorSpec(shape, tf.float32, name="images")]),
        "predict_uint8": (predict_uint8, [tf.TensorSpec(shape, tf.uint8, name="images")]),
        "predict_image_bytes": (predict_image_bytes,
                                [tf.TensorSpec([None], tf.string, name="image_bytes")]),
    }


def _metadata(info: dict[str, Any], model_dir: Path, version: int) -> dict[str, Any]:
    return {"model_name": info.get("model_name"), "source": str(model_dir), "version": version,
            "class_names": list(info["class_names"]), "threshold": info.get("threshold"),
            "image_size": info["image_size"], "channels": info["channels"],
            "keep_aspect": bool(info.get("keep_aspect", False)),
            "ensemble_members": list(info.get("members", [])) or None,
            "signatures": {"serving_default": "images float32 (N,S,S,C) 0..255",
                           "predict_uint8": "images uint8 (N,S,S,C)",
                           "predict_image_bytes": "image_bytes string (N,) PNG/JPEG"},
            "outputs": list(OUTPUTS)}


def export(model_dir: Path | str, output: Path | str, version: int = 1,
           force: bool = False) -> dict[str, Any]:
    """Write ``<output>/<version>/`` (SavedModel + ``assets.extra/lungxray.json``). The version
    is written beside the others under a temporary name and renamed when complete; an existing
    version is refused unless ``force``. Returns what was written."""
    import keras

    from lungxray.predict import _check_input_size, _load, settings_for

    if keras.backend.backend() != "tensorflow":
        raise ConfigError(f"export needs the TensorFlow backend (KERAS_BACKEND="
                          f"{keras.backend.backend()}); run it with KERAS_BACKEND=tensorflow")
    if version < 1:
        raise ConfigError(f"version must be a positive integer (TF Serving's version folders), "
                          f"got {version}")
    model_dir, output = Path(model_dir), Path(output)
    predictor = _load(model_dir)
    _check_input_size(predictor.members, settings_for(predictor.info), model_dir)
    target = output / str(version)
    if target.exists() and not force:
        raise ConfigError(f"{target}: version {version} exists; pass --force to replace it or "
                          f"--version for a new one")
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".export-{version}-", dir=output))
    try:
        _write(predictor.members, predictor.info, staging / "model")
        extra = staging / "model" / METADATA_DIR
        extra.mkdir()
        (extra / METADATA_FILE).write_text(
            json.dumps(_metadata(predictor.info, model_dir, version), indent=2) + "\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / "model", target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model_name": predictor.info.get("model_name"), "saved_model": str(target),
            "version": version, "signatures": list(SIGNATURES),
            "members": len(predictor.members)}


def _write(members: list[Any], info: dict[str, Any], path: Path) -> None:
    """The SavedModel through Keras' ExportArchive (variables tracked, signatures named)."""
    import keras

    archive = keras.export.ExportArchive()
    for model in members:
        archive.track(model)
    # serving_default first: ExportArchive also aliases the first endpoint, TF Serving needs it.
    for name, (fn, signature) in serving_functions(members, info).items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(str(path), verbose=False)
