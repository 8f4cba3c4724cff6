"""The classifier around a backbone (``lungxray.backbones``): raw pixels in, augmentation and
the backbone's preprocessing inside, class probabilities out; building, weights and loading.

The saved model takes raw pixels (0..255, the prepared image size and channel count): resizing
to the backbone's input size, grey-to-RGB, the backbone's own ``preprocess_input`` and the
augmentation all live inside the model, so evaluation and serving feed it plain images.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import keras
from keras import layers

from lungxray import safeio
from lungxray.backbones import REGISTRY, ModelSpec, get_spec
from lungxray.errors import ModelError, quote
from lungxray.limits import DEFAULT as LIMITS
from lungxray.limits import Limits

__all__ = ["REGISTRY", "ModelError", "ModelSpec", "build_classifier", "get_spec", "load_model",
           "resolve_weights", "small_cnn"]

# Mean/std per preprocessing family, as in keras.applications.imagenet_utils.
_CAFFE_MEAN_BGR = [103.939, 116.779, 123.68]
_TORCH_MEAN = [0.485, 0.456, 0.406]
_TORCH_STD = [0.229, 0.224, 0.225]
IMAGENET_TIMEOUT_S = 30


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


@keras.saving.register_keras_serializable(package="lungxray")
class RandomGamma(layers.Layer):
    """Random gamma curve per image on 0..255 pixels, ``gamma = exp(U(-log_range, log_range))``:
    the exposure/detector response differences between X-ray machines. Training only."""

    def __init__(self, log_range: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.log_range, self.seed = float(log_range), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.log_range <= 0:
            return inputs
        ops = keras.ops
        shape = (ops.shape(inputs)[0], 1, 1, 1)
        gamma = ops.exp(keras.random.uniform(shape, -self.log_range, self.log_range,
                                             seed=self.generator))
        scaled = ops.clip(inputs / 255.0, 0.0, 1.0)
        return ops.power(scaled + 1e-6, gamma) * 255.0

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "log_range": self.log_range, "seed": self.seed}


@keras.saving.register_keras_serializable(package="lungxray")
class PixelNoise(layers.Layer):
    """Additive Gaussian noise of ``stddev`` grey levels (0..255 scale; Keras' GaussianNoise
    only takes a stddev up to 1): detector noise. Training only."""

    def __init__(self, stddev: float, seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.stddev, self.seed = float(stddev), seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.stddev <= 0:
            return inputs
        noise = keras.random.normal(keras.ops.shape(inputs), stddev=self.stddev,
                                    seed=self.generator)
        return keras.ops.clip(inputs + noise, 0.0, 255.0)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "stddev": self.stddev, "seed": self.seed}


@keras.saving.register_keras_serializable(package="lungxray")
class PerImageStandardization(layers.Layer):
    """Each image to zero mean and unit standard deviation (over its pixels and channels), then
    back onto the 0..255 scale the backbone preprocessing expects (mean 127.5, std 64): removes
    per-image brightness and contrast differences between sources, in training and serving."""

    def __init__(self, center: float = 127.5, scale: float = 64.0, **kwargs):
        super().__init__(**kwargs)
        self.center, self.scale = float(center), float(scale)

    def call(self, inputs):
        ops = keras.ops
        mean = ops.mean(inputs, axis=(1, 2, 3), keepdims=True)
        std = ops.std(inputs, axis=(1, 2, 3), keepdims=True)
        # The floor keeps a blank image (std 0) finite instead of dividing by zero.
        return (inputs - mean) / ops.maximum(std, 1.0) * self.scale + self.center

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "center": self.center, "scale": self.scale}


def augmentation_layers(strength: float, seed: int, intensity: float = 0.0,
                        randaugment: float = 0.0, augmix: float = 0.0) -> list[layers.Layer]:
    """Mild geometric and intensity augmentation; no horizontal flip (anatomy is not
    left-right symmetric). ``intensity`` > 0 adds acquisition-like intensity changes (gamma,
    stronger brightness/contrast, Gaussian blur, Gaussian noise), for robustness to other
    machines and sites. ``randaugment`` and ``augmix`` > 0 add Keras' RandAugment (two random
    operations per image at that magnitude) and AugMix (a mix of augmentation chains at that
    severity). Active only in training."""
    out: list[layers.Layer] = []
    if randaugment > 0:
        out.append(layers.RandAugment(value_range=(0, 255), num_ops=2,
                                      factor=min(1.0, randaugment), seed=seed,
                                      name="aug_randaugment"))
    if augmix > 0:
        out.append(layers.AugMix(value_range=(0, 255), factor=min(1.0, augmix), seed=seed,
                                 name="aug_augmix"))
    if strength > 0:
        out += [
            layers.RandomRotation(0.03 * strength, fill_mode="constant", seed=seed),
            layers.RandomZoom(0.1 * strength, fill_mode="constant", seed=seed),
            layers.RandomTranslation(0.05 * strength, 0.05 * strength, fill_mode="constant",
                                     seed=seed),
            layers.RandomContrast(0.1 * strength, seed=seed),
            layers.RandomBrightness(0.1 * strength, value_range=(0, 255), seed=seed),
        ]
    if intensity > 0:
        out += [
            RandomGamma(0.3 * intensity, seed=seed, name="aug_gamma"),
            layers.RandomContrast(min(0.9, 0.25 * intensity), seed=seed + 1,
                                  name="aug_contrast"),
            layers.RandomBrightness(min(0.9, 0.15 * intensity), value_range=(0, 255),
                                    seed=seed + 1, name="aug_brightness"),
            layers.RandomGaussianBlur(factor=min(1.0, 0.5 * intensity), kernel_size=3,
                                      sigma=(0.1, 1.0), value_range=(0, 255), seed=seed,
                                      name="aug_blur"),
            PixelNoise(4.0 * intensity, seed=seed, name="aug_noise"),
        ]
    return out


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


def small_cnn(weights: str | None = None, include_top: bool = False,
              input_shape: tuple[int, int, int] = (28, 28, 1),
              widths: tuple[int, ...] = (32, 64, 128), **_: object) -> keras.Model:
    """``SmallCNN``: per width two 3x3 Conv-BatchNorm-ReLU layers, max-pooling between blocks
    (not after the last, so its map stays large enough for Grad-CAM at 28 px: 7x7). Headless,
    like a Keras Applications backbone called with ``include_top=False``; ~0.29 M parameters
    for one input channel. No published weights: only ``weights=None``."""
    if weights is not None or include_top:
        raise ModelError("SmallCNN has no pretrained weights and no top; it trains from scratch")
    inputs = keras.Input(input_shape)
    x = inputs
    for block, width in enumerate(widths, start=1):
        if block > 1:
            x = layers.MaxPooling2D(name=f"block{block}_pool")(x)
        for conv in (1, 2):
            x = layers.Conv2D(width, 3, padding="same", use_bias=False,
                              name=f"block{block}_conv{conv}")(x)
            x = layers.BatchNormalization(name=f"block{block}_bn{conv}")(x)
            x = layers.ReLU(name=f"block{block}_relu{conv}")(x)
    return keras.Model(inputs, x, name="SmallCNN")


# Backbones built here rather than by keras.applications (ModelSpec.scratch_only).
CUSTOM_BACKBONES = {"SmallCNN": small_cnn}


def backbone_constructor(spec: ModelSpec):
    """The function that builds ``spec``'s backbone: lungxray's own for a scratch-only one,
    else its ``keras.applications`` function."""
    if spec.scratch_only:
        return CUSTOM_BACKBONES[spec.name]
    return getattr(keras.applications, spec.name)


def build_backbone(spec: ModelSpec, input_size: int, weights: str | None,
                   channels: int = 3) -> keras.Model:
    """Instantiate the headless backbone, failing fast when ImageNet weights can't be fetched."""
    kwargs = {"include_top": False, "input_shape": (input_size, input_size, channels)}
    if spec.name.startswith(("MobileNetV3", "EfficientNetV2", "ConvNeXt")):
        kwargs["include_preprocessing"] = True
    if weights is None or weights == "imagenet":
        # Keras' download has no timeout: bound it so an air-gapped cluster fails in seconds.
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(IMAGENET_TIMEOUT_S)
        try:
            return backbone_constructor(spec)(weights=weights, **kwargs)
        except Exception as err:
            if weights != "imagenet":
                raise
            raise ModelError(
                f"could not get ImageNet weights for {spec.name} ({type(err).__name__}: {err}); "
                f"offline, use --weights none, or --weights <file.h5> with a local or gs:// "
                f"weights file, or pre-bake them into the image (PREBAKE_WEIGHTS)") from err
        finally:
            socket.setdefaulttimeout(previous)
    base = backbone_constructor(spec)(weights=None, **kwargs)
    try:
        base.load_weights(weights)
    except Exception as err:
        raise ModelError(f"weights file {weights} does not fit {spec.name} without its top at "
                         f"{input_size}px: {err}") from err
    return base


def build_classifier(name: str, image_size: int, channels: int, num_classes: int,
                     weights: str | None, dropout: float = 0.2, dense_units: int = 0,
                     augment: float = 1.0, seed: int = 42, intensity_augment: float = 0.0,
                     standardize: bool = False, randaugment: float = 0.0,
                     augmix: float = 0.0) -> keras.Model:
    """Raw pixels in, class probabilities out. The backbone is the layer named ``backbone``.
    A scratch-only backbone (SmallCNN) ignores ``weights`` and reads the grey channel as is;
    ``standardize`` puts a :class:`PerImageStandardization` after the augmentation."""
    spec = get_spec(name)
    if image_size < 8:
        raise ModelError(f"image size {image_size} is too small")
    if spec.scratch_only:
        weights = None
    input_size = spec.input_size(image_size)
    inputs = keras.Input((image_size, image_size, channels), name="image")
    x = inputs
    for layer in augmentation_layers(augment, seed, intensity_augment, randaugment, augmix):
        x = layer(x)
    if standardize:
        x = PerImageStandardization(name="standardize")(x)
    if input_size != image_size:
        x = layers.Resizing(input_size, input_size, name="resize")(x)
    rgb = not spec.scratch_only  # ImageNet backbones take 3 channels; SmallCNN takes the image's
    if channels == 1 and rgb:
        x = layers.Concatenate(name="grey_to_rgb")([x, x, x])
    for layer in preprocessing_layers(spec, channels):
        x = layer(x)
    backbone = build_backbone(spec, input_size, weights, 3 if rgb else channels)
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


def load_model(path: Path, limits: Limits = LIMITS) -> keras.Model:
    """Load a saved classifier with ``safe_mode`` (no arbitrary code from the file), after
    checking the archive's sizes and its config.json's depth (Keras reads config.json whole)
    and that the network it describes needs no more memory than its weights file holds."""
    path = Path(path)
    try:
        if path.suffix == ".keras":
            sizes, config = safeio.read_keras_archive(path, limits)
            _check_network_size(path, sizes, config)
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except (FileNotFoundError, ModelError):
        raise
    except Exception as err:  # an untrusted file: whatever Keras raises is the file's problem
        message = quote(" ".join(str(err).split()), 200)
        raise ModelError(f"cannot load model file {quote(str(path))}: "
                         f"{type(err).__name__}: {message}") from err


WEIGHTS_SLACK = 1 << 20  # bytes a network may need beyond its weights file (seed states)


def _check_network_size(path: Path, sizes: dict[str, int], config: object) -> None:
    """A config.json of a few bytes can describe a Dense layer of 10**9 units, allocated and
    initialised while Keras builds the network, before any weight is read: refuse a network
    whose variables need more bytes than its weights file holds."""
    needed = network_bytes(config)
    held = sizes.get("model.weights.h5", 0)
    if needed > held + WEIGHTS_SLACK:
        raise ModelError(f"model file {quote(str(path))}: its network needs {needed} bytes of "
                         f"weights but model.weights.h5 holds {held}")


def network_bytes(config: dict) -> int:
    """Bytes of the variables a model config (a config.json) builds, counted without
    allocating them: the layers are built in a stateless scope, where variables stay
    uninitialised, and dropped."""
    from keras.src.backend.common import global_state
    from keras.src.saving.serialization_lib import ObjectSharingScope

    if not isinstance(config, dict):
        raise ModelError(f"a model config must be a JSON object, not {type(config).__name__}")
    pending = list(global_state.get_global_attribute("uninitialized_variables") or [])
    try:
        with keras.StatelessScope(initialize_variables=False), ObjectSharingScope():
            model = keras.saving.deserialize_keras_object({**config, "compile_config": None},
                                                          safe_mode=True)
            return variables_bytes(list(getattr(model, "variables", None) or []))
    finally:
        # Left registered, these variables would be allocated by the next stateless scope
        # Keras leaves (building the real network opens several).
        global_state.set_global_attribute("uninitialized_variables", pending)


def variables_bytes(variables: list) -> int:
    """Bytes the Keras ``variables`` hold (dtype names such as ``float32``, ``bfloat16``,
    ``bool``), read from their shapes: nothing is allocated or copied."""
    total = 0
    for variable in variables:
        bits = "".join(c for c in str(variable.dtype) if c.isdigit())
        total += math.prod(variable.shape) * (max(1, int(bits) // 8) if bits else 1)
    return total
