"""The one schema of the pipeline's run parameters and of train/tune's settings: types and
ranges, checked before any step runs (``make local``, compile, submit and schedule through
``pipelines.params.check_values``; ``lungxray train``/``tune`` before any state is written),
and the locations a run writes or reads at its end (champion_uri, target_data).
"""

from __future__ import annotations

import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from lungxray.errors import ConfigError, quote, quote_repr
from lungxray.limits import DEFAULT, Limits

TUNE_ALGORITHMS = ("hyperband", "bayesian", "random")
MAX_SEED = 2**32 - 1  # numpy's and TensorFlow's seeds are unsigned 32-bit
MAX_EPOCHS = 10_000
MAX_TRIALS = 10_000
MAX_BATCH = 65_536
MAX_COUNT = 1_000_000_000  # sample counts (max_per_split, train_samples)
MAX_TEXT = 4096  # characters of a free-text parameter (paths, URIs, class maps)
MAX_MODELS = 100
# The pipeline's data_source default (pipelines/pipeline.py; a test keeps the two equal): the
# main site's name, when sites are given without a data_source, is derived from it.
DEFAULT_DATA_SOURCE = "pneumoniamnist"


def _rng(lo: float | None = None, hi: float | None = None, *, zero: bool = False,
         choices: tuple[str, ...] = ()) -> dict:
    """Field metadata: inclusive range (``zero``: 0 is also allowed, meaning "default")."""
    return {"lo": lo, "hi": hi, "zero": zero, "choices": choices}


@dataclass(frozen=True)
class PipelineParams:
    """Every run parameter of the pipeline, with its type and allowed range (no defaults here:
    those live in pipelines/pipeline.py; a test keeps the two name lists equal)."""

    data_source: str = field(metadata=_rng(1, MAX_TEXT))
    sites: str = field(metadata=_rng(0, MAX_TEXT))
    holdout_site: str = field(metadata=_rng(0, 40))
    base_models: list[str] = field(metadata=_rng(1, MAX_MODELS))
    image_size: int = field(metadata=_rng(8, None, zero=True))  # hi: Limits.max_image_size
    keep_aspect: bool = field(metadata=_rng())
    skip_bad: bool = field(metadata=_rng())
    shifted_test_fraction: float = field(metadata=_rng(0.0, 0.5))
    weights: str = field(metadata=_rng(1, MAX_TEXT))
    epochs: int = field(metadata=_rng(1, MAX_EPOCHS))
    tune_trials: int = field(metadata=_rng(1, MAX_TRIALS))
    tune_epochs: int = field(metadata=_rng(1, MAX_EPOCHS))
    tune_train_samples: int = field(metadata=_rng(0, MAX_COUNT))
    tune_algorithm: str = field(metadata=_rng(choices=TUNE_ALGORITHMS))
    tune_hyperband_factor: int = field(metadata=_rng(2, 100))
    tune_fine_tune_trials: int = field(metadata=_rng(0, MAX_TRIALS))
    batch_size: int = field(metadata=_rng(1, MAX_BATCH))
    max_per_split: int = field(metadata=_rng(0, MAX_COUNT))
    seed: int = field(metadata=_rng(0, MAX_SEED))
    select_metric: str = field(metadata=_rng(1, 100))
    ensemble_k: int = field(metadata=_rng(0, MAX_MODELS))
    external_data: str = field(metadata=_rng(0, MAX_TEXT))
    class_map: str = field(metadata=_rng(0, MAX_TEXT))
    target_sensitivity: float = field(metadata=_rng(0.0, 1.0))
    data_version: str = field(metadata=_rng(0, MAX_TEXT))
    champion_uri: str = field(metadata=_rng(0, MAX_TEXT))
    promotion_margin: float = field(metadata=_rng(0.0, 0.99))
    robustness: bool = field(metadata=_rng())
    robustness_samples: int = field(metadata=_rng(0, MAX_COUNT))
    tta: bool = field(metadata=_rng())
    deployment_prevalence: float = field(metadata=_rng(0.001, 0.999, zero=True))
    target_data: str = field(metadata=_rng(0, MAX_TEXT))


_HINTS = typing.get_type_hints(PipelineParams)
FIELDS = {f.name: f for f in fields(PipelineParams)}


def _type_ok(value: Any, hint: Any) -> bool:
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if typing.get_origin(hint) is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(v, item) for v in value)
    return False


def _type_word(hint: Any) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(
        hint, "a list of strings")


def check_range(name: str, value: Any, lo: float | None, hi: float | None,
                zero: bool = False, unit: str = "") -> None:
    """Refuse ``value`` (a number, or the length of a string or list) outside [lo, hi]."""
    size = len(value) if isinstance(value, str | list) else value
    if isinstance(size, float) and not math.isfinite(size):
        raise ConfigError(f"{name} must be a finite number, got {quote(value)}")
    if zero and size == 0:
        return
    low_ok = lo is None or size >= lo
    high_ok = hi is None or size <= hi
    if low_ok and high_ok:
        return
    what = unit or ("characters" if isinstance(value, str) else
                    "items" if isinstance(value, list) else "")
    span = (f"between {lo} and {hi}" if lo is not None and hi is not None
            else f">= {lo}" if lo is not None else f"<= {hi}")
    extra = " (or 0 for the default)" if zero else ""
    shown = f"{size} {what}" if what else quote(value)
    raise ConfigError(f"{name} must be {span}{(' ' + what) if what else ''}{extra}, "
                      f"got {shown}")


def check_pipeline_params(params: Mapping[str, Any], limits: Limits = DEFAULT) -> None:
    """Types and ranges of the given run parameters (absent ones keep their checked defaults);
    unknown names are left to the caller, which knows the compiled pipeline."""
    for name, value in params.items():
        spec = FIELDS.get(name)
        if spec is None:
            continue
        hint = _HINTS[name]
        if not _type_ok(value, hint):
            raise ConfigError(f"parameter {name} must be {_type_word(hint)}, got "
                              f"{type(value).__name__} {quote_repr(value, 80)}")
        meta = spec.metadata
        if meta["choices"]:
            if value not in meta["choices"]:
                raise ConfigError(f"parameter {name} must be one of "
                                  f"{', '.join(meta['choices'])}, got {quote(value)}")
            continue
        hi = limits.max_image_size if name == "image_size" else meta["hi"]
        if meta["lo"] is not None or hi is not None:
            check_range(f"parameter {name}", value, meta["lo"], hi, zero=meta["zero"])
    if "base_models" in params:
        check_model_names(params["base_models"], "parameter base_models")
    check_sites(params)
    check_locations(params)


def check_sites(params: Mapping[str, Any]) -> None:
    """``sites`` (NAME=SOURCE,...) and ``holdout_site``: names usable and distinct, the main
    source's site (named after data_source) included, and a held-out site one of several."""
    from lungxray import sites as siting

    extra, holdout = params.get("sites", ""), params.get("holdout_site", "")
    if not extra and not holdout:
        return
    source = params.get("data_source", DEFAULT_DATA_SOURCE)
    named = siting.parse_sites(extra, "parameter sites")
    names = [siting.default_name(source if isinstance(source, str) else ""),
             *(name for name, _ in named)]
    siting.check_request(names, holdout or None, "parameter sites")


def check_locations(params: Mapping[str, Any], local_run: bool = False) -> None:
    """champion_uri and target_data, used only at the end of a run, checked now: a local path
    or gs:// URI that can be used (:mod:`lungxray.uris`), the champion a folder that holds a
    champion or nothing, neither of them the data source. ``local_run`` (``make local``): a
    local target_data must exist, as this machine reads it."""
    from lungxray import champion_store, uris
    from lungxray.errors import LungxrayError

    source = params.get("data_source")
    source = source if isinstance(source, str) else ""
    champion, target = params.get("champion_uri"), params.get("target_data")
    try:
        if isinstance(champion, str) and champion:
            champion_store.check_uri(champion, "parameter champion_uri")
            uris.check_apart(champion, source, "parameter champion_uri", "the data_source")
        if isinstance(target, str) and target:
            uris.check_location(target, "parameter target_data", must_exist=local_run)
            uris.check_distinct(target, source, "parameter target_data", "the data_source")
    except LungxrayError as err:  # e.g. a ModelError: "not a champion folder"
        raise ConfigError(str(err)) from None


def check_model_names(names: list[str], where: str) -> None:
    """Every name a registered backbone (`lungxray models`), none twice."""
    from lungxray.backbones import REGISTRY  # the Keras-free registry

    for name in names:
        if name not in REGISTRY:
            raise ConfigError(f"{where}: unknown model {quote(name, 60)}; `lungxray models` "
                              f"lists the {len(REGISTRY)} valid names")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{where}: {', '.join(twice)} listed more than once")


def check_seed(seed: int) -> None:
    check_range("--seed", seed, 0, MAX_SEED)


def check_training(*, epochs: int, batch_size: int, seed: int, patience: int | None = None,
                   max_trials: int | None = None, train_samples: int | None = None) -> None:
    """train/tune command-line settings, with the pipeline's ranges."""
    check_range("--epochs", epochs, 1, MAX_EPOCHS)
    check_range("--batch-size", batch_size, 1, MAX_BATCH)
    check_seed(seed)
    if patience is not None:
        check_range("--patience", patience, 0, MAX_EPOCHS)
    if max_trials is not None:
        check_range("--max-trials", max_trials, 1, MAX_TRIALS)
    if train_samples is not None:
        check_range("--train-samples", train_samples, 0, MAX_COUNT)


# Hyperparameters train understands (best_hparams.json or --hparams): type and range.
HPARAM_RULES: dict[str, tuple[type, float, float]] = {
    "learning_rate": (float, 1e-10, 10.0),
    "dropout": (float, 0.0, 0.99),
    "dense_units": (int, 0, 65_536),
    "label_smoothing": (float, 0.0, 0.99),
    "augment": (float, 0.0, 10.0),
    "unfreeze": (float, 0.0, 1.0),
    "fine_tune_learning_rate": (float, 1e-12, 10.0),
    "class_weighting": (bool, 0, 1),
    "intensity_augment": (float, 0.0, 10.0),
    "randaugment": (float, 0.0, 1.0),
    "augmix": (float, 0.0, 1.0),
    "mixup": (float, 0.0, 10.0),
    "cutmix": (float, 0.0, 1.0),
    "standardize": (bool, 0, 1),
    "ema": (bool, 0, 1),
}


def check_hparams(hparams: Mapping[str, Any], where: str) -> None:
    """Types and ranges of hyperparameters; unknown names are the caller's to refuse."""
    for name, value in hparams.items():
        rule = HPARAM_RULES.get(name)
        if rule is None:
            continue
        kind, lo, hi = rule
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)  # 64.0 written by hand still means 64 units
        if not _type_ok(value, kind) or (kind is int and isinstance(value, float)):
            raise ConfigError(f"{where}: hyperparameter {name} must be {_type_word(kind)}, "
                              f"got {type(value).__name__} {quote_repr(value, 80)}")
        if kind is not bool:
            check_range(f"{where}: hyperparameter {name}", value, lo, hi)
