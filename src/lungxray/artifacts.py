"""The contract between steps: the files one step writes and another reads, the trial that model
selection works on, and the metric names with their labels and direction.

Every name here is on disk (a file, a folder, a key of ``metrics.json``): changing one changes
what earlier runs' outputs mean. The modules that write or read these files import the names
from here, so a writer and its reader cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pandas only for the annotations: this module stays import-light
    import pandas as pd

# --------------------------------------------------------------------------- prepared dataset
# preprocess -> tune, train, evaluate (lungxray.data and lungxray.prepare write it)
MANIFEST_FILE = "manifest.json"
FILES_INDEX = "files.csv"
DATA_REPORT_HTML = "data_report.html"
DATA_REPORT_MD = "data_report.md"

# --------------------------------------------------------------------------- model folder
# train -> evaluate, compare, predict, export, champion
MODEL_FILE = "model.keras"
INFO_FILE = "model_info.json"
HISTORY_FILE = "history.json"  # {"history": {metric: [per epoch]}, "phases": [...]}
CURVES_FILE = "curves.png"
# A saved ensemble (compare's best_model/ when an ensemble wins) has no MODEL_FILE: ENSEMBLE_FILE
# (its spec, also written as INFO_FILE) and one model folder per member in MEMBERS_DIR/<name>/.
ENSEMBLE_FILE = "ensemble.json"
MEMBERS_DIR = "members"
ENSEMBLE_KIND = "mean_probability"

# --------------------------------------------------------------------------- tuning folder
# tune -> train (the hyperparameters), compare (pairs a tuning run with its model by name)
BEST_HPARAMS_FILE = "best_hparams.json"

# --------------------------------------------------------------------------- evaluation folder
# evaluate -> compare, champion: one <split>/ folder per split with these files, and
# EVAL_REPORT_FILE beside them.
METRICS_FILE = "metrics.json"
PREDICTIONS_FILE = "predictions.csv"  # y_true, prob_<class>... one row per image
ROC_FILE = "roc_curve.json"  # two classes only
ROBUSTNESS_FILE = "robustness_predictions.csv"  # with the corruption suite only
SPLIT_PLOTS = ("confusion_matrix", "roc", "pr", "reliability", "robustness", "gradcam")
PLOT_FILES = tuple(f"{name}.png" for name in SPLIT_PLOTS)
EVAL_REPORT_FILE = "report.html"
VAL_SPLIT = "val"  # where models and thresholds are chosen
TEST_SPLIT = "test"

# --------------------------------------------------------------------------- trial folder
# compare's input: <trial>/model, <trial>/eval and optionally <trial>/tune (pair_trials links
# KFP's separate step outputs into this layout)
TRIAL_MODEL_DIR = "model"
TRIAL_EVAL_DIR = "eval"
TRIAL_TUNE_DIR = "tune"

# --------------------------------------------------------------------------- comparison folder
# compare -> the pipeline's outputs, challenge, the user
RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
REPORT_HTML = "report.html"
REPORT_MD = "report.md"
MODEL_CARD_FILE = "model_card.md"
SUMMARY_FILE = "summary.json"
REFIT_SECTION_TITLE = "Refit: the shipped model"  # report.md, model card (lungxray.refit)
BEST_MODEL_DIR = "best_model"  # a model folder: a copy of the winner's, or a saved ensemble
ENSEMBLE_EVAL_DIR = "ensemble"  # the ensemble candidate's <split>/ files, as evaluate writes
# Files whose presence marks an existing directory as an earlier comparison that may be replaced.
REPORT_MARKERS = (SUMMARY_FILE, REPORT_HTML)

# --------------------------------------------------------------------------- predict output
# predict -> the user, make local (pipelines.local prints the target site's estimate)
PREVALENCE_FILE = "prevalence.json"  # EM estimate of the predicted images' prevalence

# --------------------------------------------------------------------------- champion folder
# promote -> the next run's challenge
CHAMPION_MODEL_DIR = "model"
DECISION_FILE = "decision.json"
# challenge's output folder (the CLI's --output, the component's decision artifact): DECISION_FILE,
# the "Champion vs challenger" section and, given compare's card, that card with the section.
CHALLENGE_SECTION_FILE = "champion.md"
CHAMPION_FILE = "champion.json"  # written last: which run's files are the current champion
CHAMPION_HISTORY_DIR = "history"


# Out-of-fold predictions of image-statistics folds (lungxray.crossfold): one more evaluated
# split, and its metrics.json block of per-fold figures.
FOLDS_SPLIT = "shift_folds"
FOLDS_KEY = "folds"


def split_order(name: str) -> tuple[int, str]:
    """Sort key of split names: val first, then test, then any other split alphabetically."""
    return ({VAL_SPLIT: 0, TEST_SPLIT: 1}.get(name, 2), name)


# How a binary model's decision threshold is chosen (model_info.json's ``threshold_method``,
# unless a target sensitivity wins: ``sensitivity>=X``). youden: Youden's J on validation;
# balanced: 0.5, the class-weighted training's balanced-prior point; platt: where the
# validation-fitted Platt posterior is 0.5; worst_group: the highest lowest balanced accuracy
# over validation's groups (site x image-statistics cluster, lungxray.shift.val_groups).
THRESHOLD_RULES = ("youden", "balanced", "platt", "worst_group")
DEFAULT_THRESHOLD_RULE = "youden"  # the schema's default; changed only on measured evidence
# predictions.csv of val: each row's group for the worst_group rule (absent: one group)
GROUP_COLUMN = "group"


def target_sensitivity_of(info: dict) -> float | None:
    """The target sensitivity a model's threshold was chosen for (train records it in
    ``threshold_method`` as ``sensitivity>=X``), or None for Youden's J."""
    if info.get("target_sensitivity") is not None:
        return float(info["target_sensitivity"])
    method = str(info.get("threshold_method") or "")
    return float(method.split(">=", 1)[1]) if method.startswith("sensitivity>=") else None


def trained_splits(info: dict) -> set[str]:
    """The splits of its dataset a model learnt from: train, and what a refit added
    (``train_splits``, or an ensemble's ``refit.added_splits``). A score there is no estimate."""
    found = {"train", *(info.get("train_splits") or [])}
    refit = info.get("refit")
    if isinstance(refit, dict) and isinstance(refit.get("added_splits"), dict):
        found.update(refit["added_splits"])
    return found


# --------------------------------------------------------------------------- trials


@dataclass
class EvalSplit:
    """One evaluated split of a trial: ``<eval>/<split>/`` read back (``dir`` is None for an
    ensemble candidate until its files are written)."""

    name: str
    metrics: dict[str, Any]  # metrics.json
    predictions: pd.DataFrame  # predictions.csv
    robustness: pd.DataFrame | None = None  # robustness_predictions.csv, when measured
    dir: Path | None = None


@dataclass
class Trial:
    """A candidate model that selection ranks: a trained model with its evaluation (read from a
    trial folder) or, as :class:`Ensemble`, a mean of several of them.

    ``splits`` run val, test, then the others (:func:`split_order`). ``model_info`` is
    ``model_info.json`` as train wrote it.
    """

    model_info: dict[str, Any]
    splits: dict[str, EvalSplit]
    model_dir: Path | None = None
    trial_dir: Path | None = None
    eval_dir: Path | None = None
    tune_dir: Path | None = None
    history: dict[str, list] | None = None  # history.json's "history"
    phases: list[dict[str, Any]] = field(default_factory=list)

    @property
    def model_name(self) -> str:
        return str(self.model_info["model_name"])

    @property
    def class_names(self) -> list[str]:
        return list(self.model_info["class_names"])

    @property
    def members(self) -> list[str]:
        """The names of the models averaged; empty for a single model."""
        return []


@dataclass
class Ensemble(Trial):
    """The mean probability of ``member_names`` (single trials), with its own threshold chosen on
    validation. It has no model folder until saved: then ``model_info`` becomes ENSEMBLE_FILE
    (and INFO_FILE), and each member's folder is copied to MEMBERS_DIR/<name>/."""

    member_names: list[str] = field(default_factory=list)

    @property
    def members(self) -> list[str]:
        return list(self.member_names)


def model_size_mb(trial: Trial) -> float | None:
    """The trial's MODEL_FILE in MB; for an ensemble, the ``size_mb`` its model_info records."""
    if trial.members:
        return trial.model_info.get("size_mb")
    if trial.model_dir is None:
        return None
    path = Path(trial.model_dir) / MODEL_FILE
    return round(path.stat().st_size / 1e6, 3) if path.is_file() else None


# --------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    """A key of ``metrics.json`` (and ``<split>_<name>`` in tables and KFP metrics).

    ``label``: evaluate's tables; ``short``: a column of the comparison's headline table;
    ``card``: a row of the model card. ``selectable``: a score of the model that compare may
    select on (not a size, threshold, prevalence or a figure at a chosen deployment setting).
    """

    name: str
    label: str
    short: str
    card: str
    lower_is_better: bool = False
    selectable: bool = True


def _metric(name: str, label: str | None = None, *, short: str | None = None,
            card: str | None = None, lower: bool = False, selectable: bool = True) -> Metric:
    label = label or name
    return Metric(name, label, short or label, card or label, lower, selectable)


# Every per-split metric, in display order.
METRICS: dict[str, Metric] = {m.name: m for m in (
    _metric("accuracy", card="Accuracy"),
    _metric("balanced_accuracy", short="bal. accuracy", card="Balanced accuracy"),
    _metric("roc_auc", "ROC AUC"),
    _metric("pr_auc", "PR AUC (AP)", short="PR AUC", card="PR AUC (average precision)"),
    _metric("precision", "PPV (precision)", short="PPV"),
    _metric("sensitivity", "sensitivity (recall)", short="sensitivity",
            card="Sensitivity (recall)"),
    _metric("specificity", card="Specificity"),
    _metric("npv", "NPV"),
    _metric("f1", "F1"),
    _metric("mcc", "MCC", card="Matthews correlation"),
    _metric("brier", "Brier", card="Brier score (lower is better)", lower=True),
    _metric("ece", "ECE", card="Expected calibration error (lower is better)", lower=True),
    _metric("accuracy_at_0.5"),
    _metric("threshold", selectable=False),
    _metric("n", selectable=False),
    _metric("latency_ms", "latency ms/image", lower=True, selectable=False),
    _metric("robust_auc", "ROC AUC, mean over corruptions", short="robust AUC"),
    _metric("worst_corrupted_auc", "ROC AUC, worst corruption"),
    _metric("robust_auc_drop", "AUC drop under corruption", short="AUC drop (shift)",
            lower=True),
    _metric("tta_roc_auc", "ROC AUC with TTA"),
    # The lowest ROC AUC over the sites of a split of several sites (lungxray.site_metrics).
    _metric("worst_site_auc", "ROC AUC, worst site", short="worst-site AUC",
            card="ROC AUC at the worst site"),
    _metric("deploy_threshold", "threshold at deployment prevalence", selectable=False),
    _metric("deploy_sensitivity", "sensitivity at deployment threshold", selectable=False),
    _metric("deploy_specificity", "specificity at deployment threshold", selectable=False),
    _metric("deploy_ppv", "PPV at deployment prevalence", selectable=False),
    _metric("deploy_npv", "NPV at deployment prevalence", selectable=False),
    _metric("prevalence", "prevalence (true)", selectable=False),
    _metric("prevalence_em", "prevalence, EM estimate (no labels)", selectable=False),
)}
LOWER_IS_BETTER = frozenset(m.name for m in METRICS.values() if m.lower_is_better)

# Which metrics each place uses, in its order (the order of metrics.json's "ci" and "at_0.5"
# and of every table: changing one changes the files).
# Computed with a bootstrap CI by lungxray.metrics.
CI_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision", "sensitivity",
              "specificity", "npv", "f1", "mcc", "brier", "ece")
# Threshold-dependent metrics repeated at 0.5 under ``at_0.5`` (MedMNIST papers report those).
AT_HALF = ("accuracy", "balanced_accuracy", "precision", "sensitivity", "specificity", "npv",
           "f1", "mcc")
# evaluate's summary table and KFP metrics (<split>_<name>), and those logged with their CI.
EVAL_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision",
                "sensitivity", "specificity", "npv", "f1", "mcc", "brier", "ece", "threshold",
                "latency_ms", "robust_auc", "worst_corrupted_auc", "robust_auc_drop",
                "tta_roc_auc", "worst_site_auc", "deploy_threshold", "deploy_sensitivity",
                "deploy_specificity", "deploy_ppv", "deploy_npv", "prevalence", "prevalence_em")
EVAL_CI_METRICS = ("roc_auc", "sensitivity", "specificity", "prevalence_em")
# The comparison table's <split>_<metric> columns (absent ones are skipped).
TABLE_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "pr_auc", "precision",
                 "sensitivity", "specificity", "npv", "f1", "mcc", "brier", "ece",
                 "accuracy_at_0.5", "threshold", "n", "robust_auc", "worst_corrupted_auc",
                 "robust_auc_drop", "tta_roc_auc", "worst_site_auc", "deploy_threshold",
                 "deploy_sensitivity", "deploy_specificity", "deploy_ppv", "deploy_npv",
                 "prevalence", "prevalence_em")
# The comparison's headline table (each with its 95% CI) and its bar chart.
HEADLINE_METRICS = ("roc_auc", "pr_auc", "sensitivity", "specificity", "precision", "npv",
                    "balanced_accuracy", "f1", "mcc", "brier", "ece", "robust_auc",
                    "robust_auc_drop")
BAR_METRICS = ("accuracy", "balanced_accuracy", "roc_auc", "sensitivity", "specificity", "f1")
# What a model may be selected on.
SELECTABLE = frozenset(m for m in TABLE_METRICS if METRICS[m].selectable)
# What compare selects on, and how many top models its ensemble candidate averages, unless told
# otherwise (pipeline, CLI and library share them).
DEFAULT_SELECT_METRIC = "val_roc_auc"
DEFAULT_ENSEMBLE_K = 2

_unknown = sorted({m for group in (CI_METRICS, AT_HALF, EVAL_METRICS, EVAL_CI_METRICS,
                                   TABLE_METRICS, HEADLINE_METRICS, BAR_METRICS)
                   for m in group} - set(METRICS))
if _unknown:  # pragma: no cover - a typo here would otherwise show only as a KeyError later
    raise ImportError(f"metric groups name metrics missing from METRICS: {_unknown}")


def label(name: str) -> str:
    """evaluate's label of a metric (its name when it has none)."""
    return METRICS[name].label if name in METRICS else name
