"""Where training runs: the backends train supports and the devices it sees."""

from __future__ import annotations

import keras
import pytest

from lungxray import devices


def test_a_backend_train_does_not_support_is_refused(monkeypatch):
    monkeypatch.setattr(keras.backend, "backend", lambda: "torch")
    with pytest.raises(ValueError, match=r"Keras backend 'torch' is not supported.*jax"):
        devices.configure_devices(None, None)


def test_on_cpu_mixed_precision_and_xla_default_to_off_and_can_be_asked_for():
    if devices.gpu_count():
        pytest.skip("checks the CPU defaults")
    try:
        strategy, mixed, jit = devices.configure_devices(None, None)
        assert (mixed, jit) == (False, False) and strategy.num_replicas_in_sync == 1
        assert keras.mixed_precision.global_policy().name == "float32"
        _, mixed, jit = devices.configure_devices(True, True)
        assert (mixed, jit) == (True, True)
        assert keras.mixed_precision.global_policy().name == "mixed_float16"
    finally:
        keras.mixed_precision.set_global_policy("float32")

