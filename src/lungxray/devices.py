"""Where training runs: the Keras backend (TensorFlow or JAX), the GPUs it sees, and the
precision, XLA and distribution strategy that follow from them."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import keras

from lungxray.errors import ConfigError

if TYPE_CHECKING:
    import tensorflow as tf

# The image and CI train on TensorFlow; JAX (KERAS_BACKEND=jax) also trains, on one device, for
# machines that have JAX but no TensorFlow build for their GPU.
BACKENDS = ("tensorflow", "jax")


def gpu_count() -> int:
    """The GPUs the Keras backend sees."""
    if keras.backend.backend() == "jax":
        import jax

        return sum(device.platform == "gpu" for device in jax.devices())
    import tensorflow as tf

    return len(tf.config.list_physical_devices("GPU"))


class OneDevice:
    """Stands in for a tf.distribute strategy on JAX, which trains on one device here."""

    num_replicas_in_sync = 1

    def scope(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def configure_devices(mixed_precision: bool | None, jit_compile: bool | None
                      ) -> tuple[tf.distribute.Strategy | OneDevice, bool, bool]:
    """Mixed precision and XLA default to on with a GPU, off on CPU (where they slow down);
    several GPUs train data-parallel with MirroredStrategy. On JAX, XLA defaults to on also on
    CPU (without it, JAX runs op by op)."""
    backend = keras.backend.backend()
    if backend not in BACKENDS:
        raise ConfigError(f"Keras backend {backend!r} is not supported; use one of {BACKENDS} "
                         "(KERAS_BACKEND)")
    gpus = gpu_count()
    mixed = gpus > 0 if mixed_precision is None else mixed_precision
    jit = (gpus > 0 or backend == "jax") if jit_compile is None else jit_compile
    keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
    if backend == "jax":
        return OneDevice(), mixed, jit
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy() if gpus > 1 else tf.distribute.get_strategy()
    return strategy, mixed, jit
