"""Train's hyperparameters: their defaults (one owner for each), the merge of a run's choice over
them, and the reading of a tuning result (``best_hparams.json``).

No Keras here: the search spaces, the tuning report and the argument checks read the defaults
without loading a framework.
"""

from __future__ import annotations

from pathlib import Path

from lungxray import safeio, schema
from lungxray.errors import ConfigError, quote

# One place for the defaults of every hyperparameter train understands; tune searches a subset
# of them and hands its choice over in best_hparams.json.
DEFAULT_HPARAMS: dict[str, float | int | bool] = {
    "learning_rate": 1e-3,
    "dropout": 0.2,
    "dense_units": 0,
    "label_smoothing": 0.0,
    "augment": 1.0,
    "unfreeze": 0.3,  # share of backbone layers unfrozen in the fine-tune phase
    "fine_tune_learning_rate": 1e-5,
    "class_weighting": True,
    # Every site carries the same total weight in training (with class_weighting: every site x
    # class group); a no-op on one site. batches.balanced_weights.
    "site_weighting": False,
    # Acquisition-like intensity augmentation (gamma, brightness, contrast, blur, noise;
    # models.augmentation_layers), 0 = off.
    "intensity_augment": 0.0,
    # Per-image intensity standardisation inside the model (models.PerImageStandardization).
    # Off for pretrained backbones: their ImageNet features expect natural intensities, and
    # the cached features of the head search are computed without it.
    "standardize": False,
    # Adam keeps an exponential moving average of the weights, validated and saved instead of
    # the raw weights (keras.callbacks.SwapEMAWeights).
    "ema": False,
    # Keras' RandAugment magnitude and AugMix severity (models.augmentation_layers), 0 = off.
    "randaugment": 0.0,
    "augmix": 0.0,
    # MixUp's Beta alpha and CutMix's factor on training batches (batches.with_mixing), 0 = off.
    "mixup": 0.0,
    "cutmix": 0.0,
}
# Without BatchNorm (VGG) a from-scratch network at 1e-3 collapses to one class; 1e-4 learns.
SCRATCH_DEFAULTS: dict[str, float | int | bool] = {"learning_rate": 1e-4}
# Per-model scratch defaults over SCRATCH_DEFAULTS. SmallCNN has BatchNorm after every conv and
# learns at 1e-3: on the shift proxy (bench/levers_bench.py, 8 epochs) val AUC 0.992 and
# test_shifted AUC 0.962 against 0.986 / 0.934 at 1e-4. Without the geometric augmentation it
# did better on val, test_shifted and NIH's patients in all of 2 seeds x 2 setups (val +0.005 to
# +0.012 AUC, test_shifted +0.014 to +0.052, NIH in training +0.022 / +0.120; bench/defaults.py,
# bench/generalisation.md "Training defaults").
MODEL_DEFAULTS: dict[str, dict[str, float | int | bool]] = {
    "SmallCNN": {"learning_rate": 1e-3, "augment": 0.0}}


def defaults_for(pretrained: bool = True, model_name: str | None = None) -> dict:
    """Train's defaults: DEFAULT_HPARAMS, and from scratch SCRATCH_DEFAULTS and the model's own
    MODEL_DEFAULTS over them."""
    if pretrained:
        return dict(DEFAULT_HPARAMS)
    return {**DEFAULT_HPARAMS, **SCRATCH_DEFAULTS, **MODEL_DEFAULTS.get(model_name or "", {})}


def merge_hparams(hparams: dict | None, pretrained: bool = True,
                  model_name: str | None = None) -> dict:
    """Defaults (:func:`defaults_for`) overridden by ``hparams``; unknown names are an error,
    not silently ignored."""
    hparams = dict(hparams or {})
    unknown = sorted(set(hparams) - set(DEFAULT_HPARAMS))
    if unknown:
        shown = ", ".join(quote(str(n), 40) for n in unknown[:10])
        raise ConfigError(f"unknown hyperparameters {shown}"
                          f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}; "
                          f"known: {', '.join(sorted(DEFAULT_HPARAMS))}")
    schema.check_hparams(hparams, "hparams")
    return {**defaults_for(pretrained, model_name), **hparams}


def read_best_hparams(path: Path, model_name: str | None = None) -> dict:
    """The hyperparameters from a ``best_hparams.json`` (or a plain {name: value} file);
    a tuning result for another model than ``model_name`` is refused."""
    content = safeio.load_json_object(Path(path), "--hparams file", error=ConfigError)
    shown = quote(str(path))
    tuned = content.get("model_name")
    if model_name and tuned and tuned != model_name:
        raise ConfigError(f"{shown}: hyperparameters tuned for {quote(str(tuned), 60)}, not "
                          f"{model_name}")
    hparams = content.get("hparams", content)
    if not isinstance(hparams, dict):
        raise ConfigError(f"{shown}: 'hparams' must be a JSON object of hyperparameters")
    merge_hparams(hparams)  # names, types and ranges refused here, before any state exists
    return hparams


def classifier_options(hp: dict) -> dict:
    """The keyword arguments of ``models.build_classifier`` that come from hyperparameters."""
    return {"dropout": hp["dropout"], "dense_units": int(hp["dense_units"]),
            "augment": hp["augment"], "intensity_augment": hp["intensity_augment"],
            "standardize": bool(hp["standardize"]), "randaugment": hp["randaugment"],
            "augmix": hp["augmix"]}
