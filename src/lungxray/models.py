"""Registry of Keras Applications backbones and the classifier built around them.

The saved model takes raw pixels (0..255, the prepared image size and channel count): resizing
to the backbone's input size, grey-to-RGB, the backbone's own ``preprocess_input`` and the
augmentation all live inside the model, so evaluation and serving feed it plain images.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import keras
from keras import layers

from lungxray import safeio
from lungxray.backbones import REGISTRY, ModelSpec
from lungxray.errors import ModelError, quote
from lungxray.limits import DEFAULT as LIMITS

__all__ = ["REGISTRY", "ModelError", "ModelSpec", "build_classifier", "get_spec", "load_model",
           "resolve_weights"]

# Mean/std per preprocessing family, as in keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]
_TORCH_MEAN = [0.485, 0.456, 0.406]
_TORCH_STD = [0.229, 0.224, 0.225]
IMAGENET_TIMEOUT_S = 30


def get_spec(name: str) -> ModelSpec:
    """Look a backbone up by name; unknown names fail with the list of valid ones."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {quote(name, 60)}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name]


@keras.saving.register_keras_serializable(package="lungxray")
class ReverseChannels(layers.Layer):
    """RGB -> BGR for caffe-style backbones (a registered layer, so safe_mode loading works)."""

    def call(self, inputs):
        return keras.ops.flip(inputs, axis=-1)


def preprocessing_layers(spec: ModelSpec, channels: int) -> list[layers.Layer]:
    """The backbone's ``preprocess_input`` expressed as serialisable layers."""
    if spec.preprocess == "caffe":
        flip = [ReverseChannels()] if channels == 3 else []  # grey copies need no flip
        return [*flip, layers.Normalization(mean=_CAFFE_MEAN_BGR, variance=[1.0, 1.0, 1.0])]
    if spec.preprocess == "tf":
        return [layers.Rescaling(1.0 / 127.5, offset=-1.0)]
    if spec.preprocess == "torch":
        return [layers.Normalization(mean=[m * 255 for m in _TORCH_MEAN],
                                     variance=[(s * 255) ** 2 for s in _TORCH_STD])]
    return []


GEOMETRIC_AUGMENTATION = (layers.RandomRotation, layers.RandomZoom, layers.RandomTranslation)


def augmentation_layers(strength: float, seed: int) -> list[layers.Layer]:
    """Mild geometric and intensity augmentation; no horizontal flip (anatomy is not
    left-right symmetric). Active only in training."""
    if strength <= 0:
        return []
    return [
        layers.RandomRotation(0.03 * strength, fill_mode="constant", seed=seed),
        layers.RandomZoom(0.1 * strength, fill_mode="constant", seed=seed),
        layers.RandomTranslation(0.05 * strength, 0.05 * strength, fill_mode="constant",
                                 seed=seed),
        layers.RandomContrast(0.1 * strength, seed=seed),
        layers.RandomBrightness(0.1 * strength, value_range=(0, 255), seed=seed),
    ]


def resolve_weights(weights: str, cache_dir: Path | None = None) -> str | None:
    """'imagenet' | 'none' | a local or gs:// weights file -> what the constructor takes."""
    if weights.lower() == "none":
        return None
    if weights == "imagenet":
        return "imagenet"
    if weights.startswith("gs://"):
        from lungxray import storage  # google-cloud-storage only loads for gs:// files

        path = storage.fetch(weights, cache_dir)
    else:
        path = Path(weights)
    if not path.is_file():
        raise ModelError(f"weights file {quote(weights)} does not exist (use 'imagenet', 'none' "
                         f"or a path to a .h5 / .weights.h5 file)")
    check_weights_file(path, weights)
    return str(path)


HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"


def check_weights_file(path: Path, shown: str | None = None) -> None:
    """Refuse a weights file that is not HDF5 (a junk file would fail only inside Keras, after
    a run has written its state): the signature sits at byte 0, or 512, 1024, 2048... when the
    file has a user block."""
    shown = quote(shown or str(path))
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            offset = 0
            while offset + len(HDF5_SIGNATURE) <= size and offset <= 1 << 20:
                fh.seek(offset)
                if fh.read(len(HDF5_SIGNATURE)) == HDF5_SIGNATURE:
                    return
                offset = 512 if offset == 0 else offset * 2
    except OSError as err:
        raise ModelError(f"cannot read weights file {shown}: {err.strerror}") from None
    raise ModelError(f"weights file {shown} is not an HDF5 (.h5 / .weights.h5) file")


def build_backbone(spec: ModelSpec, input_size: int, weights: str | None) -> keras.Model:
    """Instantiate the headless backbone, failing fast when ImageNet weights can't be fetched."""
    kwargs = {"include_top": False, "input_shape": (input_size, input_size, 3)}
    if spec.name.startswith(("MobileNetV3", "EfficientNetV2", "ConvNeXt")):
        kwargs["include_preprocessing"] = True
    if weights is None or weights == "imagenet":
        # Keras' download has no timeout: bound it so an air-gapped cluster fails in seconds.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(IMAGENET_TIMEOUT_S)
        try:
            return spec.constructor()(weights=weights, **kwargs)
        except Exception as err:
            if weights != "imagenet":
                raise
            raise ModelError(
                f"could not get ImageNet weights for {spec.name} ({type(err).__name__}: {err}); "
                f"offline, use --weights none, or --weights <file.h5> with a local or gs:// "
                f"weights file, or pre-bake them into the image (PREBAKE_WEIGHTS)") from err
        finally:
            socket.setdefaulttimeout(previous)
    base = spec.constructor()(weights=None, **kwargs)
    try:
        base.load_weights(weights)
    except Exception as err:
        raise ModelError(f"weights file {weights} does not fit {spec.name} without its top at "
                         f"{input_size}px: {err}") from err
    return base


def build_classifier(name: str, image_size: int, channels: int, num_classes: int,
                     weights: str | None, dropout: float = 0.2, dense_units: int = 0,
                     augment: float = 1.0, seed: int = 42) -> keras.Model:
    """Raw pixels in, class probabilities out. The backbone is the layer named ``backbone``."""
    spec = get_spec(name)
    if image_size < 8:
        raise ModelError(f"image size {image_size} is too small")
    input_size = spec.input_size(image_size)
    inputs = keras.Input((image_size, image_size, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment, seed):
        x = layer(x)
    if input_size != image_size:
        x = layers.Resizing(input_size, input_size, name="resize")(x)
    if channels == 1:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    for layer in preprocessing_layers(spec, channels):
        x = layer(x)
    backbone = build_backbone(spec, input_size, weights)
    backbone.name = "backbone"
    if weights is None:
        # Keras' 0.99 lets BatchNorm's moving statistics lag for hundreds of steps, so short
        # from-scratch runs validate on near-initial statistics (AUC ~0.5); 0.9 warms up in
        # tens of steps (PyTorch's default).
        for layer in backbone.layers:
            if isinstance(layer, layers.BatchNormalization):
                layer.momentum = min(layer.momentum, 0.9)
    # A pretrained backbone always runs in inference mode, so its BatchNorm statistics survive
    # fine-tuning (keras.io transfer-learning guide); from scratch they must learn.
    x = backbone(x, training=False) if weights is not None else backbone(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return keras.Model(inputs, add_head(x, num_classes, dense_units, dropout),
                       name=f"lungxray_{name}")


def add_head(x, num_classes: int, dense_units: int = 0, dropout: float = 0.2):
    """The head on pooled features: [a ReLU dense layer,] dropout and the softmax ``probs``.
    One definition for the classifier and the feature-cache head of tuning, whose weights
    move between them by layer name."""
    if dense_units:
        x = layers.Dense(dense_units, activation="relu", name="head_dense")(x)
    x = layers.Dropout(dropout, name="head_dropout")(x)
    return layers.Dense(num_classes, activation="softmax", dtype="float32", name="probs")(x)


def backbone_of(model: keras.Model) -> keras.Model:
    """The Keras Applications backbone nested in a classifier (its layer ``backbone``)."""
    return model.get_layer("backbone")


def set_trainable(model: keras.Model, unfreeze: float) -> None:
    """Freeze the backbone, then unfreeze its top ``unfreeze`` share of layers (0..1).

    BatchNormalization layers stay frozen: small medical batches would wreck their statistics.
    """
    backbone = backbone_of(model)
    backbone.trainable = unfreeze > 0
    if unfreeze <= 0:
        return
    cut = int(round(len(backbone.layers) * (1 - min(unfreeze, 1.0))))
    for i, layer in enumerate(backbone.layers):
        trainable = i >= cut and not isinstance(layer, layers.BatchNormalization)
        layer.trainable = trainable


def load_model(path: Path) -> keras.Model:
    """Load a saved classifier with ``safe_mode`` (no arbitrary code from the file), after
    checking the archive's sizes and its config.json's depth (Keras reads config.json whole)."""
    path = Path(path)
    if path.suffix == ".keras":
        safeio.check_keras_archive(path, LIMITS)
    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except FileNotFoundError:
        raise
    except Exception as err:  # an untrusted file: whatever Keras raises is the file's problem
        message = quote(" ".join(str(err).split()), 200)
        raise ModelError(f"cannot load model file {quote(str(path))}: "
                         f"{type(err).__name__}: {message}") from err
