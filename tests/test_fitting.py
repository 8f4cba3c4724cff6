"""How train and tune compile a classifier and score its epochs: the exact validation AUC."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest

from lungxray import fitting, metrics, resume


def test_the_phase_callbacks_monitor_and_log_the_exact_validation_auc(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.arange(64) % 2
    # Tiny inputs keep every probability inside one of the 200 bins of Keras' AUC, which then
    # reads about 0.5 however well the scores rank.
    x = ((rng.normal(size=(64, 4)) + labels[:, None]) * 1e-3).astype(np.float32)
    y = np.eye(2, dtype=np.float32)[labels]
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    # A start that ranks well: the score grows with the inputs' sum.
    model.layers[-1].set_weights([np.tile([[-1.0, 1.0]], (4, 1)), np.zeros(2)])
    fitting.compile_model(model, 1e-3, 0.0, 2)
    state = resume.PhaseState(tmp_path)
    model.fit(x, y, validation_data=(x, y), epochs=3, batch_size=16, verbose=0,
              callbacks=state.callbacks("scratch", 3, fitting.ValidationAUC(x, labels)))
    logged = state.finish("scratch", model, state.progress("scratch", 3))["history"]["val_auc"]
    exact = metrics.roc_auc(labels, model.predict(x, verbose=0))  # the kept (best) epoch
    assert max(logged) == pytest.approx(exact, abs=1e-6) and exact > 0.7


def test_validation_auc_is_shared_not_copied_by_keras_tuner():
    x, labels = np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1])
    callback = fitting.ValidationAUC(x, labels)
    copied = copy.deepcopy(callback)
    assert copied is not callback and copied.inputs is x
    assert copied.labels.tolist() == labels.tolist()
