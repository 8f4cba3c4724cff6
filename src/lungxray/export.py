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
from pathlib import Path
from typing import Any

from lungxray import safeio, staging
from lungxray.errors import ConfigError, OutputError, quote

METADATA_DIR = "assets.extra"  # TF Serving's place for files it does not read itself
METADATA_FILE = "lungxray.json"
SIGNATURES = ("serving_default", "predict_uint8", "predict_image_bytes")
OUTPUTS = ("probabilities", "class_index", "class_name")
MAX_VERSION = 2**63 - 1  # TF Serving reads version folders as int64
STAGING_PREFIX = ".export-"  # <output>/.export-XXXX while a version is built


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
    is built in a staging folder beside the others and renamed when complete; an existing
    version is refused unless ``force``. The staging folder goes on errors, SIGTERM and
    SIGINT, and one a killed run left is swept by the next. Returns what was written."""
    from lungxray import model_loader

    if not 1 <= version <= MAX_VERSION:
        raise ConfigError(f"version must be a positive integer up to {MAX_VERSION} (TF "
                          f"Serving's int64 version folders), got {version}")
    model_dir, output = Path(model_dir), Path(output)
    with staging.stop_on_signals():  # a SIGINT while loading: exit 130, not a traceback
        model_loader.open_folder(model_dir)  # a bad folder is refused before Keras starts
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ConfigError(f"export needs the TensorFlow backend (KERAS_BACKEND="
                              f"{keras.backend.backend()}); run it with "
                              f"KERAS_BACKEND=tensorflow")
        predictor = model_loader.load(model_dir)
        target = output / str(version)
        if (target.exists() or target.is_symlink()) and not force:
            raise ConfigError(f"{target}: version {version} exists; pass --force to replace "
                              f"it or --version for a new one")
        # A failed first export leaves no empty output folder either (staging_dir).
        with staging.staging_dir(output, STAGING_PREFIX, "lungxray export") as build:
            _build(predictor.members, predictor.info, model_dir, version, build / "model",
                   target)
            _publish(build / "model", target, build)
    return {"model_name": predictor.info.get("model_name"), "saved_model": str(target),
            "version": version, "signatures": list(SIGNATURES),
            "members": len(predictor.members)}


def _build(members: list[Any], info: dict[str, Any], model_dir: Path, version: int,
           path: Path, target: Path) -> None:
    """The SavedModel and its metadata at ``path``; a full disk or an I/O error is one
    OutputError naming ``target`` and the space the variables need."""
    import tensorflow as tf

    try:
        _write(members, info, path)
        extra = path / METADATA_DIR
        extra.mkdir()
        (extra / METADATA_FILE).write_text(
            json.dumps(_metadata(info, model_dir, version), indent=2) + "\n")
    except (tf.errors.OpError, OSError) as err:
        raise _write_failure(err, members, target) from None


def _write_failure(err: BaseException, members: list[Any], target: Path) -> OutputError:
    """A full disk as :func:`safeio.no_space` says it (with the bytes the variables take),
    any other failure as ``<target>: cannot write the SavedModel (<reason>)``."""
    from lungxray.models import variables_bytes

    if isinstance(err, OSError):
        reason = err.strerror or str(err)
        full = err.errno in safeio.NO_SPACE
    else:  # TensorFlow's message: a function node, the file, then what went wrong
        text = " ".join(str(getattr(err, "message", err)).split())
        reason = text.rsplit("; ", 1)[-1].split(" [Op:", 1)[0] or type(err).__name__
        full = "no space left" in text.lower() or "quota exceeded" in text.lower()
    if full:
        return safeio.no_space(target, variables_bytes([v for m in members for v in m.weights]))
    return OutputError(f"{target}: cannot write the SavedModel ({quote(reason, 200)[1:-1]})")


def _publish(build: Path, target: Path, staging_folder: Path) -> None:
    """Rename the finished version into place; a version it replaces (``--force``) is moved
    into the staging folder first and put back if the rename fails. Signals wait meanwhile,
    so a kill never leaves the version missing."""
    previous = staging_folder / "previous"
    with staging.signals_blocked():
        if target.exists() or target.is_symlink():
            os.replace(target, previous)
        try:
            os.replace(build, target)
        except BaseException:
            if previous.exists() or previous.is_symlink():
                os.replace(previous, target)
            raise


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
