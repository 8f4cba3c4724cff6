"""The hyperparameter search spaces, in one place.

Every name is a key of ``hparams.DEFAULT_HPARAMS``: tune hands its choice to train through
``best_hparams.json`` and train refuses unknown names. Each space's default values are train's
defaults, i.e. what an untuned run uses, and every search's first trial is that default point
(``lungxray.tune`` makes keras-tuner start there instead of drawing it), so no search ends
without having tried what an untuned run would use.

Three spaces, used by three kinds of search (see ``lungxray.tune``):

- **head** (pretrained backbone, frozen): ``dense_units``, ``dropout``, ``learning_rate``,
  ``label_smoothing``, ``class_weighting``. Searched on cached backbone features, so it has no
  augmentation: augmentation acts on pixels, before the frozen backbone.
- **fine-tune** (pretrained backbone, after the head search): ``unfreeze``,
  ``fine_tune_learning_rate``, ``augment``. Searched on the full model, starting from the best
  head. ``unfreeze=0`` is allowed: the search may find that fine-tuning does not pay.
- **scratch** (``weights=none``, and always for SmallCNN, which has no pretrained weights): the
  head space with the lower learning rates a whole network trained from scratch needs, plus
  ``augment``, ``intensity_augment`` and ``standardize``. There is nothing to freeze or
  fine-tune.

``intensity_augment`` (acquisition-like intensity changes) is searched wherever augmentation
is; ``standardize`` (per-image intensity standardisation) only from scratch: the cached
features of the pretrained head search are computed without it. ``ema``, ``randaugment``,
``augmix``, ``mixup`` and ``cutmix`` are not searched: none gained on val, on the corruption
suite or on the ``test_shifted`` proxy (bench/levers.md), so they are train-only settings
(``--hparams``) and a search does not spend trials on them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lungxray.hparams import DEFAULT_HPARAMS, defaults_for

if TYPE_CHECKING:  # keras-tuner loads TensorFlow: only describe() needs it at run time
    import keras_tuner as kt

HEAD_UNITS = [0, 64, 128, 256]  # 0: no hidden layer, pooled features straight to softmax
# Pretrained heads learn fast on fixed features; a whole network from scratch needs lower
# rates (hparams.SCRATCH_DEFAULTS uses 1e-4; SmallCNN, with BatchNorm throughout, 1e-3).
HEAD_LR = {"pretrained": (1e-4, 1e-2), "scratch": (1e-5, 1e-3)}
FINE_TUNE_LR = (1e-6, 1e-4)  # low, so fine-tuning does not wreck the pretrained features


def head_space(hp: kt.HyperParameters, pretrained: bool = True,
               model_name: str | None = None) -> dict:
    """Head (and, from scratch, optimiser) hyperparameters; from scratch the learning rate
    starts at the model's own default (hparams.MODEL_DEFAULTS)."""
    low, high = HEAD_LR["pretrained" if pretrained else "scratch"]
    lr_default = (DEFAULT_HPARAMS["learning_rate"] if pretrained
                  else defaults_for(False, model_name)["learning_rate"])
    return {
        "dense_units": hp.Choice("dense_units", HEAD_UNITS,
                                 default=int(DEFAULT_HPARAMS["dense_units"])),
        "dropout": hp.Float("dropout", 0.0, 0.5, step=0.1,
                            default=DEFAULT_HPARAMS["dropout"]),
        "learning_rate": hp.Float("learning_rate", low, high, sampling="log",
                                  default=lr_default),
        "label_smoothing": hp.Float("label_smoothing", 0.0, 0.2, step=0.05,
                                    default=DEFAULT_HPARAMS["label_smoothing"]),
        "class_weighting": hp.Boolean("class_weighting",
                                      default=bool(DEFAULT_HPARAMS["class_weighting"])),
    }


def augment_space(hp: kt.HyperParameters, pretrained: bool = True,
                  model_name: str | None = None) -> dict:
    """Augmentation strength (0 = none; 1 = train's default rotation/zoom/shift/contrast) and
    intensity augmentation strength (0 = none; gamma, brightness, contrast, blur, noise)."""
    defaults = defaults_for(pretrained, model_name)
    return {"augment": hp.Float("augment", 0.0, 1.5, step=0.5, default=defaults["augment"]),
            "intensity_augment": hp.Float("intensity_augment", 0.0, 2.0, step=0.5,
                                          default=defaults["intensity_augment"])}


def fine_tune_space(hp: kt.HyperParameters) -> dict:
    """Fine-tuning of a pretrained backbone, plus augmentation (it needs the pixels)."""
    return {
        "unfreeze": hp.Float("unfreeze", 0.0, 0.5, step=0.1,
                             default=DEFAULT_HPARAMS["unfreeze"]),
        "fine_tune_learning_rate": hp.Float("fine_tune_learning_rate", *FINE_TUNE_LR,
                                            sampling="log",
                                            default=DEFAULT_HPARAMS["fine_tune_learning_rate"]),
        **augment_space(hp),
    }


def scratch_space(hp: kt.HyperParameters, model_name: str | None = None) -> dict:
    """Training a whole network from scratch: head, learning rate, augmentation and per-image
    standardisation, starting at ``model_name``'s defaults."""
    defaults = defaults_for(False, model_name)
    return {**head_space(hp, False, model_name), **augment_space(hp, False, model_name),
            "standardize": hp.Boolean("standardize", default=bool(defaults["standardize"]))}


SPACES = {
    "head": lambda hp: head_space(hp, pretrained=True),
    "fine_tune": fine_tune_space,
    "scratch": scratch_space,
}


def describe(space: str) -> list[dict]:
    """One row per hyperparameter of ``space`` (name, kind, range or values, sampling, default),
    read from keras-tuner itself so the documentation cannot drift from the search."""
    import keras_tuner as kt

    hp = kt.HyperParameters()
    SPACES[space](hp)
    rows = []
    for param in hp.space:
        config = param.get_config()
        if isinstance(param, kt.engine.hyperparameters.Choice):
            values = ", ".join(str(v) for v in config["values"])
        elif isinstance(param, kt.engine.hyperparameters.Boolean):
            values = "True, False"
        else:
            step = f" step {config['step']:g}" if config.get("step") else ""
            values = f"{config['min_value']:g} – {config['max_value']:g}{step}"
        rows.append({"space": space, "name": param.name, "type": type(param).__name__,
                     "values": values, "sampling": config.get("sampling") or "",
                     "default": param.default})
    return rows
