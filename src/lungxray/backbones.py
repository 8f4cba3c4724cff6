"""The registry of backbones: the Keras Applications ones and lungxray's own ``SmallCNN``, with
names and input conventions, readable without importing Keras (parameter checks use it before
any step runs). Building a backbone is :mod:`lungxray.models`' job: it reads this registry,
never the other way round."""

from __future__ import annotations

from dataclasses import dataclass

from lungxray.errors import ModelError, quote


@dataclass(frozen=True)
class ModelSpec:
    """How to build one Keras Applications backbone."""

    name: str
    preprocess: str  # 'caffe' | 'tf' | 'torch' | 'builtin' (the model preprocesses itself)
    default_size: int
    min_size: int = 32
    module: str = ""  # keras.applications submodule, for documentation only
    # True for a backbone built here (no published weights): it always trains from scratch and
    # ``weights`` (imagenet or a file) is ignored for it, so a run over several models with
    # weights=imagenet still gets a from-scratch baseline without any download.
    scratch_only: bool = False

    def input_size(self, image_size: int) -> int:
        """The backbone input size for a prepared image size: never below the minimum."""
        return max(image_size, self.min_size)

    def weights_for(self, weights: str) -> str:
        """The weights this backbone really starts from: ``none`` for a scratch-only one."""
        return "none" if self.scratch_only else weights


REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in [
    ModelSpec("VGG16", "caffe", 224, module="vgg16"),
    ModelSpec("VGG19", "caffe", 224, module="vgg19"),
    ModelSpec("ResNet50", "caffe", 224, module="resnet"),
    ModelSpec("ResNet101", "caffe", 224, module="resnet"),
    ModelSpec("ResNet152", "caffe", 224, module="resnet"),
    ModelSpec("ResNet50V2", "tf", 224, module="resnet_v2"),
    ModelSpec("ResNet101V2", "tf", 224, module="resnet_v2"),
    ModelSpec("ResNet152V2", "tf", 224, module="resnet_v2"),
    ModelSpec("InceptionV3", "tf", 299, 75, module="inception_v3"),
    ModelSpec("InceptionResNetV2", "tf", 299, 75, module="inception_resnet_v2"),
    ModelSpec("Xception", "tf", 299, 71, module="xception"),
    ModelSpec("DenseNet121", "torch", 224, module="densenet"),
    ModelSpec("DenseNet169", "torch", 224, module="densenet"),
    ModelSpec("DenseNet201", "torch", 224, module="densenet"),
    ModelSpec("MobileNet", "tf", 224, module="mobilenet"),
    ModelSpec("MobileNetV2", "tf", 224, module="mobilenet_v2"),
    ModelSpec("MobileNetV3Small", "builtin", 224, module="mobilenet_v3"),
    ModelSpec("MobileNetV3Large", "builtin", 224, module="mobilenet_v3"),
    *[ModelSpec(f"EfficientNetB{i}", "builtin", size, module="efficientnet")
      for i, size in enumerate([224, 240, 260, 300, 380, 456, 528, 600])],
    *[ModelSpec(f"EfficientNetV2{v}", "builtin", size, module="efficientnet_v2")
      for v, size in [("B0", 224), ("B1", 240), ("B2", 260), ("B3", 300), ("S", 384),
                      ("M", 480), ("L", 480)]],
    *[ModelSpec(f"ConvNeXt{v}", "builtin", 224, module="convnext")
      for v in ["Tiny", "Small", "Base", "Large", "XLarge"]],
    ModelSpec("NASNetMobile", "tf", 224, module="nasnet"),
    ModelSpec("NASNetLarge", "tf", 331, module="nasnet"),
    # A compact from-scratch CNN (~0.3 M parameters) at the native 28 px: the baseline that
    # tells whether a large pretrained backbone earns its cost on small grey X-rays.
    ModelSpec("SmallCNN", "tf", 28, 16, module="lungxray.models", scratch_only=True),
]}


def get_spec(name: str) -> ModelSpec:
    """Look a backbone up by name; unknown names fail with the list of valid ones."""
    if name not in REGISTRY:
        raise ModelError(f"unknown model {quote(name, 60)}; valid names: {', '.join(REGISTRY)}")
    return REGISTRY[name]
