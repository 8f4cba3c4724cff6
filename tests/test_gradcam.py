"""Grad-CAM on lungxray classifiers (untrained weights: the maths does not need training)."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from lungxray import gradcam, models

SIZE = 96  # VGG16 at 96 px ends in a 3x3 feature map: enough to show a spatial pattern


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    keras.utils.set_random_seed(0)
    return models.build_classifier("VGG16", SIZE, 1, 2, None, augment=0.0, seed=0)


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (4, SIZE, SIZE, 1)).astype(np.float32)


def class_activation_map(model: keras.Model, images: np.ndarray, c: int) -> np.ndarray:
    """CAM of Zhou et al. (2016), computed without gradients.

    The head is global average pooling -> dropout -> Dense, so d logit_c / d F[h, w, k] is
    W[k, c] / (H W) everywhere: Grad-CAM's channel weights are W[:, c] / (H W) and its map is
    relu(sum_k W[k, c] F[..., k]) up to a positive scale, which normalising to 0..1 removes.
    """
    features = keras.Model(model.inputs[0], model.get_layer("pool").input)(images,
                                                                           training=False)
    kernel = model.get_layer("probs").kernel.numpy()
    cam = np.maximum(np.einsum("nhwk,k->nhw", features.numpy(), kernel[:, c]), 0)
    cam = tf.image.resize(cam[..., None], images.shape[1:3], method="bilinear")[..., 0].numpy()
    peak = cam.reshape(len(cam), -1).max(axis=1)
    return cam / np.where(peak > 0, peak, 1)[:, None, None]


@pytest.mark.parametrize("c", [0, 1])
def test_gradcam_equals_cam_for_a_gap_head(classifier, images, c):
    heat = gradcam.gradcam(classifier, images, c)
    assert heat.shape == (4, SIZE, SIZE)
    assert heat.min() >= 0 and heat.max() <= 1 + 1e-6
    np.testing.assert_allclose(heat, class_activation_map(classifier, images, c), atol=1e-4)
    assert heat.std() > 0  # a 3x3 map upsampled: not constant


def test_per_image_class_index_and_feature_size(classifier, images):
    both = gradcam.gradcam(classifier, images, np.array([0, 1, 0, 1]))
    np.testing.assert_allclose(both[1], gradcam.gradcam(classifier, images[1:2], 1)[0],
                               atol=1e-5)
    np.testing.assert_allclose(both[2], gradcam.gradcam(classifier, images[2:3], 0)[0],
                               atol=1e-5)
    assert gradcam.feature_map(classifier) == ("block5_pool", 3, 3)  # the backbone's own output
    with pytest.raises(ValueError, match="class_index"):
        gradcam.gradcam(classifier, images, 2)


def test_saved_and_reloaded_model(classifier, images, tmp_path):
    path = tmp_path / "model.keras"
    classifier.save(path)
    loaded = models.load_model(path)
    np.testing.assert_allclose(gradcam.gradcam(loaded, images, 1),
                               gradcam.gradcam(classifier, images, 1), atol=1e-5)


def test_mixed_precision_model():
    # float16 convolutions are slow on CPU: the smallest VGG16 input, one image.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = models.build_classifier("VGG16", 32, 1, 2, None, augment=0.0, seed=0)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    image = np.random.default_rng(1).integers(0, 256, (1, 32, 32, 1)).astype(np.float32)
    heat = gradcam.gradcam(model, image, 1)
    assert heat.dtype == np.float32 and np.isfinite(heat).all() and heat.shape == (1, 32, 32)


def test_model_without_backbone_is_refused():
    inputs = keras.Input((8, 8, 1))
    outputs = keras.layers.Dense(2, activation="softmax", name="probs")(
        keras.layers.Flatten()(inputs))
    with pytest.raises(gradcam.GradCamError, match="backbone"):
        gradcam.gradcam_model(keras.Model(inputs, outputs))


def test_select_cases_binary_and_multiclass():
    y = np.array([1, 1, 1, 0, 0, 0, 1])
    p1 = np.array([0.9, 0.6, 0.2, 0.7, 0.1, 0.95, 0.4])
    cases = gradcam.select_cases(y, np.column_stack([1 - p1, p1]), ["normal", "pneumonia"],
                                 threshold=0.5, per_category=2)
    assert [c["label"].split("\n")[0] for c in cases] == [
        "true positive", "false positive", "false negative"]
    assert cases[0]["indices"] == [0, 1]  # most confident true positives first
    assert cases[1]["indices"] == [5, 3]  # most confident false alarms first
    assert cases[2]["indices"] == [2, 6]  # the most confidently missed first
    assert {c["class_index"] for c in cases} == {1}
    y3 = np.array([0, 1, 2, 2])
    p3 = np.array([[.8, .1, .1], [.2, .7, .1], [.1, .6, .3], [.1, .1, .8]])
    cases = gradcam.select_cases(y3, p3, ["a", "b", "c"], None)
    assert len(cases) == 9
    by_label = {c["label"].replace("\n", " "): c["indices"] for c in cases}
    assert by_label["false positive b"] == [2] and by_label["false negative c"] == [2]
    assert by_label["true positive c"] == [3] and by_label["false positive a"] == []


def test_a_1x1_backbone_output_is_explained_on_the_last_larger_block():
    """VGG16 at 32 px (the local profiles) ends in 1x1: Grad-CAM moves to block5_conv3 (2x2).
    Reference without the sub-model: block5_pool is a 2x2 max-pool, so d logit_c / d F[h, w, k]
    is W[k, c] where F[..., k] peaks and 0 elsewhere; the weights are that gradient's mean."""
    keras.utils.set_random_seed(0)
    model = models.build_classifier("VGG16", 32, 1, 2, None, augment=0.0, seed=0)
    images = np.random.default_rng(2).integers(0, 256, (3, 32, 32, 1)).astype(np.float32)
    assert gradcam.feature_map(model) == ("block5_conv3", 2, 2)
    backbone, inner_input, _ = gradcam._backbone_call(model)
    prepared = keras.Model(model.inputs[0], inner_input)(images, training=False)
    features = keras.Model(backbone.inputs[0], backbone.get_layer("block5_conv3").output)(
        prepared, training=False).numpy()
    kernel = model.get_layer("probs").kernel.numpy()
    flat = features.reshape(3, 4, -1)
    peak = flat == flat.max(axis=1, keepdims=True)
    for c in (0, 1):
        weights = (peak * kernel[:, c]).mean(axis=1)  # (N, K)
        cam = np.maximum(np.einsum("nhwk,nk->nhw", features, weights), 0)
        cam = tf.image.resize(cam[..., None], (32, 32), method="bilinear")[..., 0].numpy()
        cam /= np.where(cam.max(axis=(1, 2)) > 0, cam.max(axis=(1, 2)), 1)[:, None, None]
        heat = gradcam.gradcam(model, images, c)
        np.testing.assert_allclose(heat, cam, atol=1e-4)
        assert (heat.reshape(3, -1).std(axis=1) > 0).any()  # a map, not one constant
    # The sub-model's head input reproduces the classifier's own probabilities.
    _, pooled = gradcam.gradcam_model(model)(images, training=False)
    head = model.get_layer("probs")
    logits = pooled.numpy() @ head.kernel.numpy() + head.bias.numpy()
    np.testing.assert_allclose(tf.nn.softmax(logits).numpy(), model.predict(images, verbose=0),
                               atol=1e-5)


@pytest.mark.parametrize(("name", "layer"), [("ResNet50V2", "conv4_block5_out"),
                                             ("InceptionV3", "mixed7"),
                                             ("MobileNetV2", "block_13_expand_relu"),
                                             ("NASNetMobile", None)])
def test_the_explained_map_is_a_late_block_output_not_a_branch_or_padding(name, layer):
    model = models.build_classifier(name, 32, 1, 2, None, augment=0.0, seed=0)
    chosen, h, w = gradcam.feature_map(model)
    assert min(h, w) >= 2
    if layer:
        assert chosen == layer
    # NASNet's cells read the two previous cells: no late layer is on every path, and the
    # first one that is (the stem) would show edges. The map stays in the late layers.
    backbone = models.backbone_of(model)
    assert [x.name for x in backbone.layers].index(chosen) >= len(backbone.layers) // 2
