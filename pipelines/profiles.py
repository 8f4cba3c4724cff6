"""Named sets of pipeline parameters.

- ``quick``: the ``make local`` default, sized for a 2-core laptop CPU (32 px, 2 epochs on the
  whole train split, 2 one-epoch tuning trials on 1000 training images per model).
- ``full``: the accuracy run on a CPU: 9 epochs (early stopping on val AUC may end sooner) for
  VGG16, InceptionV3 and SmallCNN (``FULL_MODELS``; measured in bench/RESULTS.md), each with its
  defaults: one tuning trial, the default point (see ``FULL_TUNE_TRIALS``).
- ``cluster``: the pipeline's own defaults, meant for GPUs.

Every profile runs the from-scratch ``SmallCNN`` baseline beside ImageNet backbones, so each
report answers whether transfer learning earns its cost, and the default
``shifted_test_fraction`` (0.1), so each report shows AUC on the shift proxy ``test_shifted``
beside the random ``test``. The CPU profiles run the corruption
suite on fewer images per split (``robustness_samples``) than the cluster's 500: it predicts
every sampled image 35 times, about 25 s per 160 images for VGG16 at 32 px on 2 cores.

No profile sets ``sites`` or ``holdout_site``: a second site is one setting on top of any
profile, ``make local SITES=nih=../shared/data/nih_cxr_1000/manifest.csv`` (``--set
sites=NAME=SOURCE,...``), and ``HOLDOUT_SITE=nih`` (``--set holdout_site=nih``) keeps that site
out of training and selection as the off-site estimate. Every split of more than one site is
then scored per site, and ``select_metric=val_worst_site_auc`` selects on the worst site's
validation AUC.
"""

from __future__ import annotations

import inspect

from lungxray.errors import ConfigError, quote
from pipelines.pipeline import DEFAULT_MODELS, build_pipeline

# The CPU accuracy run leaves out ResNet152V2: from scratch at 32 px it was the slowest model
# (31 images/s against VGG16's 62) and the weakest in every measured run (val AUC 0.926 and
# 0.933; 0.877 on the official test split in an independent check), and without it the run
# fits its hour. The cluster profile (GPUs) keeps all of DEFAULT_MODELS.
FULL_MODELS = [m for m in DEFAULT_MODELS if m != "ResNet152V2"]

# From scratch on a CPU a one-epoch search on 1500 images cannot see which settings end best
# after 9 epochs on all of train. Measured on 2026-12-04 (bench/levers.md): of 3 trials,
# VGG16's and InceptionV3's searches kept their defaults (trial 0) and SmallCNN's picked a
# learning rate of 1.7e-4 with label smoothing, which ended at val AUC 0.978 against its
# defaults' 0.990 (mean corrupted val AUC 0.958 vs 0.986, test_shifted 0.942 vs 0.969). So the
# accuracy run trains the defaults, and the 2 x 3 extra trials (6 minutes) are saved; with
# pretrained weights, --set tune_trials=3 brings back the cheap cached-feature head search.
FULL_TUNE_TRIALS = 1

PROFILES: dict[str, dict] = {
    "quick": {"image_size": 32, "epochs": 2, "tune_trials": 2, "tune_epochs": 1,
              "tune_train_samples": 1000, "tune_fine_tune_trials": 1, "max_per_split": 0,
              "batch_size": 32, "robustness_samples": 100},
    "full": {"image_size": 32, "epochs": 9, "tune_trials": FULL_TUNE_TRIALS, "tune_epochs": 1,
             "tune_train_samples": 1500, "tune_fine_tune_trials": 2, "max_per_split": 0,
             "batch_size": 32, "robustness_samples": 200, "base_models": FULL_MODELS},
    "cluster": {},
}


def pipeline_defaults() -> dict:
    """The pipeline's parameters and their defaults, read from the pipeline function."""
    signature = inspect.signature(build_pipeline().pipeline_func)
    return {name: p.default for name, p in signature.parameters.items()}


def resolve_params(profile: str, overrides: dict | None = None) -> dict:
    """Defaults, then the profile, then ``overrides``; unknown names are an error."""
    defaults = pipeline_defaults()
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(defaults))
    if unknown:
        shown = ", ".join(quote(str(n), 60) for n in unknown[:10])
        more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
        raise ConfigError(f"unknown pipeline parameter(s) {shown}{more}; "
                          f"known: {', '.join(sorted(defaults))}")
    return {**defaults, **PROFILES[profile], **overrides}
