"""Grad-CAM (Selvaraju et al. 2017) on a feature map of a lungxray classifier's backbone.

The classifier (``models.build_classifier``) nests its Keras Applications backbone as one layer
named ``backbone``. The explained feature map is the backbone's output when that is at least
2x2; at the small sizes of local runs it is 1x1 (VGG16 at 32 px, InceptionV3 at 75 px), where a
heatmap would be one constant, so the map is then the deepest block output that is still 2x2 or
larger: a layer every path through the backbone passes (``block5_conv3``, a ResNet stage's
``*_out``, an Inception ``mixed*``), not a branch. A sub-model from the outer input to [that
map, the input of the ``probs`` layer] runs the classifier's own layers (augmentation and
dropout inactive), and the class score is the pre-softmax logit recomputed from the ``probs``
layer's kernel and bias, as the paper prescribes (softmax gradients vanish on confident images).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from lungxray import models, plots
from lungxray.errors import DataError, ModelError

HEAD_LAYER = "probs"


class GradCamError(ModelError, ValueError):
    """A model Grad-CAM cannot be computed for, with what is missing."""


# Layers of models.build_classifier between the backbone and ``probs``, in order.
_AFTER_BACKBONE = ("pool", "head_dense", "head_dropout")
MIN_MAP = 2  # a 1x1 map has no spatial information


def _backbone_call(model: keras.Model) -> tuple[keras.Model, Any, Any]:
    """(backbone, its input tensor, its output tensor), tensors of the outer model's graph."""
    try:
        backbone = models.backbone_of(model)
    except ValueError as err:
        raise GradCamError(f"model {model.name!r} has no layer named 'backbone'") from err
    # The backbone is called once inside the classifier; that call's node is the last one added
    # (a Functional built from its own Input has no node of its own in Keras 3, but be safe).
    outer = [node for node in backbone._inbound_nodes
             if any(t is i for t in node.input_tensors for i in _graph_tensors(model))]
    if not outer:
        raise GradCamError(f"model {model.name!r}: cannot find the backbone's call in its graph")
    inputs, outputs = outer[-1].input_tensors, outer[-1].output_tensors
    if len(inputs) != 1 or len(outputs) != 1 or len(outputs[0].shape) != 4:
        raise GradCamError(f"model {model.name!r}: the backbone's output is not one (N, H, W, C) "
                           f"feature map: {[t.shape for t in outputs]}")
    return backbone, inputs[0], outputs[0]


def explained_layer(backbone: keras.Model) -> keras.layers.Layer:
    """The deepest layer of ``backbone`` that every path through it passes and whose output is
    a feature map of at least 2x2 (the backbone's last layer when its map is that large); the
    deepest such map on any path when no layer in the second half is passed by all."""
    index = {id(layer): i for i, layer in enumerate(backbone.layers)}
    last_use = list(range(len(backbone.layers)))  # the latest layer reading each one's output
    for j, layer in enumerate(backbone.layers):
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                i = index.get(id(tensor._keras_history.operation))
                if i is not None:
                    last_use[i] = max(last_use[i], j)
    cut, deepest, reach = None, None, -1
    for i, layer in enumerate(backbone.layers):
        shape = layer.output.shape
        # Padding and cropping layers are skipped: their borders are not evidence.
        if (len(shape) == 4 and min(shape[1], shape[2]) >= MIN_MAP
                and not isinstance(layer, keras.layers.ZeroPadding2D | keras.layers.Cropping2D)):
            deepest = i
            if reach <= i:  # no earlier output skips over this one: everything flows through it
                cut = i
        reach = max(reach, last_use[i])
    if deepest is None:
        raise GradCamError(f"{backbone.name}: no feature map of at least {MIN_MAP}x{MIN_MAP} "
                           f"(the images are too small to explain)")
    # Cells that read the two previous cells (NASNet) leave no late layer every path passes;
    # a stem layer would show edges, not evidence, so take the deepest map there instead.
    if cut is None or cut < len(backbone.layers) // 2:
        cut = deepest
    return backbone.layers[cut]


def _feature_and_head_input(model: keras.Model) -> tuple[Any, Any]:
    """The explained feature map and the input of ``probs``, as tensors of one graph from the
    classifier's input."""
    backbone, inner_input, output = _backbone_call(model)
    head = model.get_layer(HEAD_LAYER)
    layer = explained_layer(backbone)
    if layer is backbone.layers[-1]:
        return output, head.input
    # The backbone again, now also returning the earlier map (same layers, same weights), and
    # the classifier's own head layers on its output.
    both = keras.Model(backbone.inputs[0], [layer.output, backbone.outputs[0]])
    feature, x = both(inner_input)
    for name in _AFTER_BACKBONE:
        if any(other.name == name for other in model.layers):
            x = model.get_layer(name)(x)
    return feature, x


def _graph_tensors(model: keras.Model) -> list[Any]:
    """Every tensor produced inside the outer model's graph (inputs included)."""
    found = list(model.inputs)
    for layer in model.layers:
        for node in layer._inbound_nodes:
            found.extend(node.output_tensors)
    return found


def gradcam_model(model: keras.Model) -> keras.Model:
    """Sub-model: classifier input -> [explained feature map, input of the ``probs`` layer]."""
    try:
        model.get_layer(HEAD_LAYER)
    except ValueError as err:
        raise GradCamError(f"model {model.name!r} has no {HEAD_LAYER!r} output layer") from err
    if len(model.inputs) != 1:
        raise GradCamError(f"model {model.name!r} has {len(model.inputs)} inputs; expected one")
    feature, head_input = _feature_and_head_input(model)
    # One input tensor, not a list of one: the sub-model is then called with a plain array.
    return keras.Model(model.inputs[0], [feature, head_input], name=f"{model.name}_gradcam")


def gradcam(model: keras.Model, images: np.ndarray, class_index: np.ndarray | int,
            batch_size: int = 16) -> np.ndarray:
    """Grad-CAM heatmaps (N, H, W) in 0..1 at the images' size, for ``class_index`` (one int
    or one per image). Images are raw pixels (N, H, W, C), as the classifier takes them."""
    import tensorflow as tf  # the Keras backend here; only imported when heatmaps are asked for

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4:
        raise DataError(f"images must be (N, H, W, C), got shape {images.shape}")
    n_classes = int(model.outputs[0].shape[-1])
    targets = np.broadcast_to(np.asarray(class_index, dtype=np.int64), (len(images),))
    if targets.size and (targets.min() < 0 or targets.max() >= n_classes):
        raise DataError(f"class_index must be in 0..{n_classes - 1}, got {sorted(set(targets))}")
    sub = gradcam_model(model)
    head = model.get_layer(HEAD_LAYER)
    cams = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size])
        idx = tf.convert_to_tensor(targets[start:start + batch_size])
        with tf.GradientTape() as tape:
            feature, pooled = sub(x, training=False)
            # A mixed-precision model computes in float16 but keeps its head in float32.
            kernel = tf.convert_to_tensor(head.kernel)
            logits = tf.matmul(tf.cast(pooled, kernel.dtype), kernel) + tf.cast(head.bias,
                                                                                kernel.dtype)
            score = tf.gather(logits, idx, axis=1, batch_dims=1)
        # Images are independent in inference mode, so d(sum of scores)/d(feature) is per image.
        grads = tf.cast(tape.gradient(score, feature), tf.float32)
        feature = tf.cast(feature, tf.float32)
        weights = tf.reduce_mean(grads, axis=(1, 2))
        cam = tf.nn.relu(tf.einsum("nhwc,nc->nhw", feature, weights))
        cam = tf.image.resize(cam[..., tf.newaxis], images.shape[1:3], method="bilinear")
        cams.append(cam[..., 0].numpy())
    if not cams:
        return np.zeros((0, *images.shape[1:3]), dtype=np.float32)
    cams_all = np.concatenate(cams)
    peak = cams_all.reshape(len(cams_all), -1).max(axis=1)
    # An all-zero map means no positive evidence for the class: keep it zero, don't rescale noise.
    scale = np.where(peak > 0, peak, 1.0)
    return (cams_all / scale[:, None, None]).astype(np.float32)


def feature_map(model: keras.Model) -> tuple[str, int, int]:
    """(layer name, h, w) of the explained feature map: h x w is the resolution a heatmap
    really has."""
    layer = explained_layer(_backbone_call(model)[0])
    return layer.name, int(layer.output.shape[1]), int(layer.output.shape[2])


def select_cases(y_true: np.ndarray, probs: np.ndarray, class_names: list[str],
                 threshold: float | None, per_category: int = 4) -> list[dict[str, Any]]:
    """True positives, false positives and false negatives to explain, most confident first.

    Binary: for the positive class at ``threshold``. More classes: argmax predictions, the three
    categories for each class (one-vs-rest). Each entry: ``label``, ``class_index`` (the class
    whose evidence the heatmap shows) and ``indices`` (at most ``per_category``).
    """
    y = np.asarray(y_true).astype(int)
    p = np.asarray(probs, dtype=float)
    if p.shape[1] == 2:
        thr = 0.5 if threshold is None else float(threshold)
        pred = np.where(p[:, 1] >= thr, 1, 0)
        targets = [1]
    else:
        pred = p.argmax(axis=1)
        targets = list(range(p.shape[1]))
    cases = []
    for c in targets:
        score = p[:, c]
        name = class_names[c]
        for label, mask, highest_first in (
            (f"true positive\n{name}", (y == c) & (pred == c), True),
            (f"false positive\n{name}", (y != c) & (pred == c), True),
            # Missed cases with the least evidence first: the most confidently missed.
            (f"false negative\n{name}", (y == c) & (pred != c), False),
        ):
            idx = np.flatnonzero(mask)
            order = np.argsort(-score[idx] if highest_first else score[idx], kind="mergesort")
            cases.append({"label": label, "class_index": c,
                          "indices": idx[order][:per_category].tolist()})
    return cases


def gradcam_grid(model: keras.Model, images: np.ndarray, y_true: np.ndarray, probs: np.ndarray,
                 class_names: list[str], threshold: float | None, path: Path | str,
                 per_category: int = 4, title: str = "Grad-CAM") -> dict[str, Any]:
    """Draw the true positive / false positive / false negative Grad-CAM grid to ``path``.

    Returns ``{"path", "feature_map", "layer", "cases": [{"label", "indices"}]}`` so the figure
    can be traced back to rows of predictions.csv.
    """
    cases = select_cases(y_true, probs, class_names, threshold, per_category)
    chosen = [i for case in cases for i in case["indices"]]
    targets = [case["class_index"] for case in cases for _ in case["indices"]]
    heatmaps = gradcam(model, images[chosen], np.asarray(targets, dtype=np.int64))
    layer, h, w = feature_map(model)
    rows, start = [], 0
    y = np.asarray(y_true).astype(int)
    for case in cases:
        idx = case["indices"]
        maps = heatmaps[start:start + len(idx)]
        start += len(idx)
        c = case["class_index"]
        captions = [f"P({class_names[c]})={probs[i, c]:.3f}" + (
            f"\ntrue: {class_names[y[i]]}" if len(class_names) > 2 else "") for i in idx]
        rows.append({"label": case["label"], "images": images[idx], "heatmaps": maps,
                     "captions": captions})
    plots.plot_gradcam_grid(rows, path, title=f"{title} ({layer} {h}x{w}, upsampled)")
    return {"path": str(path), "feature_map": [h, w], "layer": layer,
            "cases": [{"label": c["label"].replace("\n", " "), "indices": c["indices"]}
                      for c in cases]}
