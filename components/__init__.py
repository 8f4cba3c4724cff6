"""Thin KFP lightweight components: each maps artifacts to paths and calls ``lungxray``.

Components are created for a given container image at compile time (``build``), never from an
environment variable read at import.
"""

from __future__ import annotations

from types import SimpleNamespace

from kfp import dsl

from components.challenge import challenge
from components.compare import compare
from components.crossfold import crossfold
from components.evaluate import evaluate
from components.predict import predict
from components.preprocess import preprocess
from components.promote import promote
from components.refit import refit
from components.train import train
from components.tune import tune

FUNCTIONS = {f.__name__: f for f in (preprocess, tune, train, crossfold, evaluate, compare,
                                      refit, challenge, promote, predict)}
LOCAL_IMAGE = "lungxray:local"  # kfp.local's SubprocessRunner ignores the image


def build(image: str = LOCAL_IMAGE) -> SimpleNamespace:
    """Every component with ``image`` as its base image. The image has lungxray and kfp
    installed, so nothing is pip-installed at run time (air-gapped clusters work)."""
    return SimpleNamespace(**{
        name: dsl.component(func, base_image=image, install_kfp_package=False)
        for name, func in FUNCTIONS.items()
    })
