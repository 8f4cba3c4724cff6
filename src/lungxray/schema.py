"""The one schema of the pipeline's run parameters and of train/tune's settings: type, default,
range or choices and description of each, checked before any step runs (``make local``, compile,
submit and schedule through ``pipelines.params.check_values``; ``lungxray train``/``tune``
before any state is written), and the locations a run writes or reads at its end
(champion_uri, target_data).

:class:`PipelineParams` (pydantic, strict: no "3" -> 3, a bool is not a number) owns every
run parameter's default: the pipeline's signature, the CLI's options and the library read
``DEFAULTS``. Its JSON Schema is docs/params.schema.json (``python -m lungxray.schema``
rewrites it; a test keeps it current).
"""

import json
import math
import sys
import typing
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lungxray.artifacts import (
    DEFAULT_ENSEMBLE_K,
    DEFAULT_SELECT_METRIC,
    DEFAULT_THRESHOLD_RULE,
    THRESHOLD_RULES,
)
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
# The main site's name, when sites are given without a data_source, is derived from it.
DEFAULT_DATA_SOURCE = "pneumoniamnist"
# SmallCNN: the from-scratch baseline that says whether transfer learning earns its cost.
DEFAULT_MODELS = ("VGG16", "ResNet152V2", "InceptionV3", "SmallCNN")


def _zero_or(kind: type, lo: float, hi: float) -> Any:
    """0 (meaning "the default" or "none") or a value in [lo, hi]."""
    return (Annotated[kind, Field(ge=0, le=0)]
            | Annotated[kind, Field(ge=lo, le=hi)])


def _text(lo: int = 0, hi: int = MAX_TEXT) -> Any:
    return Annotated[str, Field(min_length=lo, max_length=hi)]


class PipelineParams(BaseModel):
    """Every run parameter of the pipeline: type, default, range and description (the
    description is the parameter's help in the Kubeflow UI). A test keeps the names equal to
    the pipeline's."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True, allow_inf_nan=False,
                              title="lungxray pipeline parameters")

    data_source: _text(1) = Field(
        DEFAULT_DATA_SOURCE,
        description="MedMNIST-style .npz, image folder, CSV manifest, a gs:// URI of any of "
                    "them, or pneumoniamnist (downloaded and checksummed).")
    sites: _text() = Field(
        "",
        description="More sources prepared into the same splits, NAME=SOURCE,... (e.g. "
                    "nih=../shared/data/nih_cxr_1000/manifest.csv); each is carved on its own, "
                    "grouped by patient, and scored per site. data_source is the site named "
                    "pneumoniamnist for its files, else main. Empty = one site.")
    holdout_site: _text(0, 40) = Field(
        "",
        description="A site whose images all go to test_site_<name>: never trained, tuned, "
                    "thresholded or selected on, the off-site estimate. Empty = none.")
    base_models: Annotated[list[str], Field(min_length=1, max_length=MAX_MODELS)] = Field(
        list(DEFAULT_MODELS),
        description="Keras Applications names or SmallCNN (the from-scratch baseline); one "
                    "trial each.")
    image_size: _zero_or(int, 8, DEFAULT.max_image_size) = Field(
        0,
        description="Side in pixels of the prepared images; 0 keeps the npz size (224 for "
                    "folders).")
    keep_aspect: bool = Field(
        False, description="Pad images to square instead of stretching them.")
    skip_bad: bool = Field(
        False, description="Leave unusable image files out and list them, instead of failing.")
    shifted_test_fraction: Annotated[float, Field(ge=0.0, le=0.5)] = Field(
        0.1,
        description="Share of train held out as test_shifted, whole clusters of image "
                    "statistics: the shift proxy that breaks ties on val AUC; only the refit "
                    "trains on it; 0 = none.")
    shift_folds: _zero_or(int, 2, 10) = Field(
        0,
        description="K >= 2: each model's recipe is also trained K times, each time holding "
                    "out one of K image-statistics folds of train + test_shifted and predicting "
                    "it: the split shift_folds, every image held out once. Its out-of-fold AUC "
                    "breaks ties first, select_metric=shift_folds_roc_auc selects on it; K "
                    "more trainings per model. 0 = none.")
    refit: bool = Field(
        True,
        description="After the pick is chosen, train it again (each ensemble member, the same "
                    "settings) on train + test_shifted and ship that; the report scores both "
                    "on the splits neither trained on. Off: ship the pick as measured.")
    weights: _text(1) = Field(
        "imagenet",
        description="imagenet, none (from scratch) or a local or gs:// weights file.")
    epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = Field(
        6, description="Training epochs; pretrained: half head, half fine-tuning.")
    tune_trials: Annotated[int, Field(ge=1, le=MAX_TRIALS)] = Field(
        3, description="keras-tuner trials per model.")
    tune_epochs: Annotated[int, Field(ge=1, le=MAX_EPOCHS)] = Field(
        2, description="Epochs per tuning trial.")
    tune_train_samples: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        0,
        description="Fit each trial on a stratified subset of N training images; 0 = all.")
    tune_algorithm: Literal[TUNE_ALGORITHMS] = Field(
        "hyperband", description="keras-tuner search: hyperband, bayesian or random.")
    tune_hyperband_factor: Annotated[int, Field(ge=2, le=100)] = Field(
        3, description="Hyperband's reduction factor.")
    tune_fine_tune_trials: Annotated[int, Field(ge=0, le=MAX_TRIALS)] = Field(
        2,
        description="Pretrained weights: full-model trials searching the fine-tune settings.")
    batch_size: Annotated[int, Field(ge=1, le=MAX_BATCH)] = Field(32, description="Batch size.")
    max_per_split: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        0, description="Keep at most N images per split, stratified; 0 = all.")
    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = Field(
        42, description="Seed for splits, subsets, initialisation and tuning.")
    select_metric: _text(1, 100) = Field(
        DEFAULT_SELECT_METRIC,
        description="Metric that picks the best model: val_*, or shift_folds_* with "
                    "shift_folds (test_* is refused).")
    ensemble_k: Annotated[int, Field(ge=0, le=MAX_MODELS)] = Field(
        DEFAULT_ENSEMBLE_K,
        description="The ensemble candidate averages the top-k models; 0 or 1 = none.")
    external_data: _text() = Field(
        "",
        description="Another labelled dataset every trial is also evaluated on; empty = none.")
    class_map: _text() = Field(
        "",
        description="Maps the external set's class names to the model's, e.g. "
                    "COVID-19=pneumonia,NORMAL=normal (- drops a class).")
    target_sensitivity: Annotated[float, Field(ge=0.0, le=1.0)] = Field(
        0.0,
        description="0 = threshold by threshold_rule; else the highest threshold whose val "
                    "sensitivity reaches it.")
    threshold_rule: Literal[THRESHOLD_RULES] = Field(
        DEFAULT_THRESHOLD_RULE,
        description="How each model's and the ensemble's threshold is chosen when "
                    "target_sensitivity is 0: youden (Youden's J on val), balanced (0.5, the "
                    "class-weighted training's balanced-prior point), platt (where the "
                    "val-fitted Platt posterior is 0.5) or worst_group (the highest lowest "
                    "balanced accuracy over val's site x image-statistics-cluster groups).")
    data_version: _text() = Field(
        "",
        description="Not read; part of the cache key: change it when the data behind "
                    "data_source changes.")
    champion_uri: _text() = Field(
        "",
        description="Folder or gs:// prefix of the model in use; empty = no "
                    "champion/challenger.")
    promotion_margin: Annotated[float, Field(ge=0.0, le=0.99)] = Field(
        0.0,
        description="The pick replaces the champion only if its val AUC is higher by more "
                    "than this, with 95% confidence.")
    robustness: bool = Field(
        True,
        description="Evaluate every split under the seeded acquisition-shift corruption suite.")
    robustness_samples: Annotated[int, Field(ge=0, le=MAX_COUNT)] = Field(
        500,
        description="Stratified images per split for the corruption suite; 0 = all.")
    tta: bool = Field(False, description="Also report the AUC with test-time augmentation.")
    deployment_prevalence: _zero_or(float, 0.001, 0.999) = Field(
        0.0,
        description="0 = none; else the Bayes threshold and PPV/NPV at this prevalence, from "
                    "val-calibrated scores.")
    target_data: _text() = Field(
        "",
        description="Unlabelled images of the site the model will serve (folder, CSV, npz or "
                    "gs://); the pick predicts them and estimates their prevalence by EM, with "
                    "the threshold it implies; empty = none.")


DEFAULTS = PipelineParams()  # every run parameter's default, read by the pipeline and the CLI
FIELDS = PipelineParams.model_fields


def json_schema() -> dict:
    """The JSON Schema of the run parameters (docs/params.schema.json)."""
    return PipelineParams.model_json_schema()


def json_schema_text() -> str:
    """The JSON Schema as docs/params.schema.json holds it."""
    return json.dumps(json_schema(), indent=2) + "\n"


def pipeline_docstring(summary: str) -> str:
    """``summary`` and an Args section of every parameter's description: KFP reads it from the
    pipeline function into the compiled package (the parameters' help in the Kubeflow UI)."""
    # One line each: the package then holds each description as written, without line breaks.
    lines = [summary, "", "Args:", *(f"    {name}: {info.description}"
                                     for name, info in FIELDS.items())]
    return "\n".join(lines) + "\n"


def _rule(prop: Mapping[str, Any]) -> tuple[Any, Any, bool, tuple]:
    """(lo, hi, zero, choices) of one property of the JSON Schema: what the messages say is
    what the schema declares."""
    members = prop.get("anyOf")
    if members:  # _zero_or: {0} or [lo, hi]
        prop = next(m for m in members if (m.get("minimum"), m.get("maximum")) != (0, 0))
    lo = prop.get("minimum", prop.get("minLength", prop.get("minItems")))
    hi = prop.get("maximum", prop.get("maxLength", prop.get("maxItems")))
    return lo, hi, bool(members), tuple(prop.get("enum", ()))


def _hint(prop: Mapping[str, Any]) -> Any:
    kind = prop.get("type") or prop["anyOf"][-1]["type"]
    return {"integer": int, "number": float, "boolean": bool, "string": str,
            "array": list[str]}[kind]


_PROPERTIES = json_schema()["properties"]
_HINTS = {name: _hint(prop) for name, prop in _PROPERTIES.items()}
_RULES = {name: _rule(prop) for name, prop in _PROPERTIES.items()}


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
    """Types, ranges and choices of the given run parameters (absent ones keep their checked
    defaults), by :class:`PipelineParams`; the first refused one, in the order given, is said
    in one line. Unknown names are left to the caller, which knows the compiled pipeline."""
    known = {name: value for name, value in params.items() if name in FIELDS}
    # A raised max_image_size widens image_size's declared range: checked here instead.
    size = known.pop("image_size", None) if limits != DEFAULT else None
    try:
        PipelineParams.model_validate(known)
    except ValidationError as err:
        refused = {str(e["loc"][0]) for e in err.errors()}
        name = next(n for n in known if n in refused)
        _refuse(name, known[name])
        said = next(e["msg"] for e in err.errors() if str(e["loc"][0]) == name)
        raise ConfigError(f"parameter {name}: {' '.join(said.split())}, got "
                          f"{type(known[name]).__name__} {quote_repr(known[name], 80)}") from None
    if size is not None:
        _refuse("image_size", size, limits.max_image_size)
    if "base_models" in params:
        check_model_names(params["base_models"], "parameter base_models")
    check_sites(params)
    check_locations(params)


def _refuse(name: str, value: Any, max_image_size: int | None = None) -> None:
    """Raise the one-line ConfigError that says why ``value`` does not fit ``name``'s type,
    choices or range as the schema declares them; return if it fits them."""
    hint = _HINTS[name]
    if not _type_ok(value, hint):
        raise ConfigError(f"parameter {name} must be {_type_word(hint)}, got "
                          f"{type(value).__name__} {quote_repr(value, 80)}")
    lo, hi, zero, choices = _RULES[name]
    if choices:
        if value not in choices:
            raise ConfigError(f"parameter {name} must be one of {', '.join(choices)}, got "
                              f"{quote(value)}")
        return
    if max_image_size is not None:
        hi = max_image_size
    if lo is not None or hi is not None:
        check_range(f"parameter {name}", value, lo, hi, zero=zero)


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
    "site_weighting": (bool, 0, 1),
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


if __name__ == "__main__":  # python -m lungxray.schema > docs/params.schema.json
    sys.stdout.write(json_schema_text())
