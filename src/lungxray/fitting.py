"""How a classifier is compiled and scored while it fits, the same for train and for every tuning
trial: Adam + cross-entropy (:func:`compile_model`) and the exact validation ROC AUC that
checkpoints, early stopping and keras-tuner choose by (:class:`ValidationAUC`)."""

from __future__ import annotations

import keras
import numpy as np

from lungxray import metrics, models
from lungxray.resume import MONITOR


def compile_model(model: keras.Model, learning_rate: float, label_smoothing: float,
                  num_classes: int, jit_compile: bool = False, ema: bool = False) -> None:
    """Adam + cross-entropy; ``auc`` is macro one-vs-rest, which for two softmax outputs equals
    the binary ROC AUC of the positive class (Keras' approximation: :class:`ValidationAUC` makes
    ``val_auc`` exact where it is used to choose). ``model.jit_compile`` then says whether Keras
    really compiles with XLA: it refuses to for a model holding layers it marks unsupported."""
    if jit_compile and keras.backend.backend() == "jax":
        # Keras marks its geometric augmentation layers not XLA-compilable for all backends, as
        # TensorFlow has no XLA kernel for their image transform, and then compiles the whole
        # model without XLA. JAX compiles them, and without XLA it runs op by op: VGG16 at
        # 224 px trained at 40 images/s on an H200 that way.
        for layer in model.layers:
            if isinstance(layer, models.GEOMETRIC_AUGMENTATION):
                layer.supports_jit = True
    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate, use_ema=ema),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy", keras.metrics.AUC(name="auc", multi_label=True,
                                               num_labels=num_classes)],
        jit_compile=jit_compile,
    )


class ValidationAUC(keras.callbacks.Callback):
    """Replaces Keras' ``val_auc``, an approximation on 200 fixed thresholds, by the exact ROC
    AUC (sklearn) of the model's validation predictions: the figure evaluation reports. Listed
    first, it runs before the checkpoint, early stopping, the LR schedule, the epoch log and
    keras-tuner read the value. Costs one more prediction pass over validation per epoch."""

    def __init__(self, inputs: object, labels: np.ndarray):
        super().__init__()
        self.inputs, self.labels = inputs, np.asarray(labels)

    def __deepcopy__(self, memo: dict) -> ValidationAUC:
        # keras-tuner deep-copies search callbacks for every trial; the data is shared, not
        # copied (a tf.data pipeline cannot be).
        return ValidationAUC(self.inputs, self.labels)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is None:
            return
        auc = metrics.roc_auc(self.labels, self.model.predict(self.inputs, verbose=0))
        if auc is not None:  # a class absent from validation: leave Keras' value
            logs[MONITOR] = auc
