"""The ``lungxray`` command: one thin subcommand per pipeline step."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from lungxray import quiet
from lungxray.artifacts import THRESHOLD_RULES
from lungxray.schema import DEFAULTS, TUNE_ALGORITHMS

WEIGHTS_HELP = ("'imagenet' (Keras download + cache), 'none' (train from scratch) or a local or "
                "gs:// weights file (.h5 / .weights.h5)")


def add_preprocess_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray preprocess``, run by :func:`_preprocess`."""
    p = sub.add_parser("preprocess", help="prepare splits and manifest.json from a source",
                       description="Prepare a dataset: SRC is a MedMNIST-style .npz, an image "
                       "folder <root>/[train|val|test/]<CLASS>/* (PNG, JPEG, DICOM, ...), a CSV "
                       "manifest path,label[,split][,patient_id] with paths relative to its "
                       "folder, any of them on gs://, or 'pneumoniamnist[_64|_128|_224]' "
                       "(downloaded, checksum-verified, cached). Missing val/test splits are "
                       "carved from train, stratified, seeded, grouped by duplicate image and "
                       "patient. Writes manifest.json, files.csv and data_report.html/.md.")
    p.add_argument("--source", required=True, help="npz file, image folder, CSV file, gs:// URI "
                   "of any of them, or 'pneumoniamnist[_SIZE]'")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    p.add_argument("--image-size", type=int, default=None,
                   help="square side in pixels, at most 1024 (default: the npz's own size up "
                   "to 1024, 224 for folders)")
    p.add_argument("--channels", type=int, choices=[1, 3], default=None,
                   help="1 = grey, 3 = RGB (default: as the source; folders grey)")
    p.add_argument("--val-fraction", type=float, default=0.1,
                   help="share of train carved as val when the source has none (default 0.1)")
    p.add_argument("--test-fraction", type=float, default=0.1,
                   help="share of train carved as test when the source has none (default 0.1)")
    p.add_argument("--shifted-test-fraction", type=float,
                   default=DEFAULTS.shifted_test_fraction,
                   help="share of train held out first as 'test_shifted': whole k-means "
                   "clusters of image statistics, a proxy for another machine's images "
                   f"(default {DEFAULTS.shifted_test_fraction}, as the pipeline; 0: none)")
    p.add_argument("--shift-fold", type=_fold, default=None, metavar="I/K",
                   help="make test_shifted fold I of K image-statistics folds instead of one "
                   "carved region: preparing with 1/K .. K/K holds every training image out "
                   "once (bench/folds.py)")
    p.add_argument("--max-per-split", type=int, default=DEFAULTS.max_per_split,
                   help="keep at most N images per split, stratified (0 = all; for quick runs)")
    p.add_argument("--skip-bad", action="store_true", help="skip unusable files (corrupt, empty, "
                   "not an image, too small) and list them in the report, instead of failing")
    p.add_argument("--keep-aspect", action="store_true",
                   help="keep the aspect ratio: scale the long side and pad with black")
    p.add_argument("--min-size", type=int, default=8,
                   help="refuse images whose smaller side is below N px (default 8, the minimum)")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding threads (default 0: one per CPU, at most 8)")
    p.add_argument("--max-image-pixels", type=int, default=None, metavar="N",
                   help="refuse source images above N pixels, checked before decoding "
                   "(default 40000000; a mammogram is ~23 MP)")
    p.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                   help="set one reader limit, e.g. max_image_size=2048 or max_classes=5000 "
                   "(repeatable; docs/limits.md lists every limit and its default)")
    p.add_argument("--site", action="append", default=[], metavar="NAME=SOURCE",
                   help="another site prepared into the same splits, e.g. "
                   "nih=../shared/data/nih_cxr_1000/manifest.csv (repeatable; each site is "
                   "carved on its own, grouped by patient, and recorded per image)")
    p.add_argument("--site-name", default=None, metavar="NAME",
                   help="the site name of --source when there are --site's (default: "
                   "'pneumoniamnist' for its files and names, else 'main')")
    p.add_argument("--holdout-site", default=None, metavar="NAME",
                   help="put every image of this site into test_site_NAME: never trained, "
                   "tuned, thresholded or selected on (the off-site estimate)")
    _common(p)
    p.set_defaults(func=_preprocess)


def _preprocess(args: argparse.Namespace) -> dict:
    from lungxray import limits as limiting
    from lungxray import prepare

    # --limit and --max-image-pixels go over the LUNGXRAY_<LIMIT> environment (docs/limits.md).
    pairs = [*args.limit, *([f"max_image_pixels={args.max_image_pixels}"]
                            if args.max_image_pixels is not None else [])]
    limits = limiting.with_overrides(limiting.from_env(), pairs)
    return prepare.preprocess(args.source, args.output, image_size=args.image_size,
                              seed=args.seed, val_fraction=args.val_fraction,
                              test_fraction=args.test_fraction, max_per_split=args.max_per_split,
                              channels=args.channels, cache_dir=args.cache_dir,
                              skip_bad=args.skip_bad, keep_aspect=args.keep_aspect,
                              min_size=args.min_size, workers=args.workers, limits=limits,
                              shifted_test_fraction=args.shifted_test_fraction,
                              sites=_sites(args.site), site_name=args.site_name,
                              holdout_site=args.holdout_site, shift_fold=args.shift_fold)


def _fold(text: str) -> tuple[int, int]:
    """``I/K`` as (I, K)."""
    i, sep, k = text.partition("/")
    if not (sep and i.strip().isdigit() and k.strip().isdigit()):
        raise argparse.ArgumentTypeError(f"expected I/K (e.g. 1/4), got {text!r}")
    return int(i), int(k)


def _sites(entries: list[str]) -> list[tuple[str, str]]:
    from lungxray import sites

    return [sites.parse_entry(text) for text in entries]


def add_tune_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray tune``, run by :func:`_tune`."""
    p = sub.add_parser("tune", help="keras-tuner search, objective validation AUC")
    _training(p, epochs=DEFAULTS.tune_epochs)
    p.add_argument("--max-trials", type=int, default=DEFAULTS.tune_trials,
                   help=f"trials to run (default {DEFAULTS.tune_trials})")
    p.add_argument("--train-samples", type=int, default=DEFAULTS.tune_train_samples,
                   help="fit each trial on a stratified subset of N training images (0 = all, "
                   "the default)")
    p.add_argument("--algorithm", choices=TUNE_ALGORITHMS, default=DEFAULTS.tune_algorithm,
                   help=f"keras-tuner search (default {DEFAULTS.tune_algorithm})")
    p.add_argument("--hyperband-factor", type=int, default=DEFAULTS.tune_hyperband_factor,
                   help=f"Hyperband's reduction factor (default {DEFAULTS.tune_hyperband_factor})")
    p.add_argument("--fine-tune-trials", type=int, default=DEFAULTS.tune_fine_tune_trials,
                   help="pretrained weights: full-model trials searching the fine-tuning after "
                   f"the head (default {DEFAULTS.tune_fine_tune_trials})")
    p.add_argument("--state-dir", type=_local_path, default=None, help="tuner state, resumed when "
                   "the same search runs again (default: the output directory)")
    p.add_argument("--feature-cache", type=_local_path, default=None,
                   help="cached backbone features "
                   "(default <cache-dir>/features with --cache-dir, else <state>/features)")
    p.set_defaults(func=_tune)


def _tune(args: argparse.Namespace) -> dict:
    from lungxray import tune

    return tune.tune(args.data, args.model, args.output, max_trials=args.max_trials,
                     epochs=args.epochs, weights=args.weights, batch_size=args.batch_size,
                     seed=args.seed, train_samples=args.train_samples, cache_dir=args.cache_dir,
                     algorithm=args.algorithm, hyperband_factor=args.hyperband_factor,
                     fine_tune_trials=args.fine_tune_trials, state_dir=args.state_dir,
                     feature_cache=args.feature_cache)


def add_train_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray train``, run by :func:`_train`."""
    p = sub.add_parser("train", help="train a backbone + head (two phases when pretrained)",
                       description="Train; re-running with the same --output after a kill "
                       "resumes from the last finished epoch.")
    _training(p, epochs=DEFAULTS.epochs)
    p.add_argument("--hparams", type=_local_path, default=None,
                   help="best_hparams.json from `lungxray tune` (default: built-in defaults)")
    p.add_argument("--patience", type=int, default=3,
                   help="epochs without validation-AUC gain before stopping (default 3)")
    p.add_argument("--target-sensitivity", type=float, default=None, help="choose the decision "
                   "threshold on validation to reach this sensitivity (default: --threshold-rule)")
    _threshold_rule(p, "the decision threshold")
    p.add_argument("--mixed-precision", action=argparse.BooleanOptionalAction, default=None,
                   help="float16 compute (default: on with a GPU, off on CPU)")
    p.add_argument("--xla", action=argparse.BooleanOptionalAction, default=None,
                   help="XLA-compile the training step (default: on with a GPU, off on CPU)")
    p.set_defaults(func=_train)


def _train(args: argparse.Namespace) -> dict:
    from lungxray import train
    from lungxray.hparams import read_best_hparams

    hparams = read_best_hparams(args.hparams, args.model) if args.hparams else {}
    return train.train(args.data, args.model, args.output, hparams, epochs=args.epochs,
                       weights=args.weights, batch_size=args.batch_size, seed=args.seed,
                       patience=args.patience, target_sensitivity=args.target_sensitivity,
                       threshold_rule=args.threshold_rule,
                       mixed_precision=args.mixed_precision, jit_compile=args.xla,
                       cache_dir=args.cache_dir)


def _model_checked(model_dir: Path) -> None:
    """The model folder checked (files, sizes, archive) before TensorFlow is imported: a bad
    one fails in a second, not after the framework's start-up."""
    from lungxray import model_loader

    model_loader.open_folder(model_dir)


def add_evaluate_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray evaluate``, run by :func:`_evaluate`."""
    p = sub.add_parser("evaluate", help="metrics and plots at the model's validation threshold")
    p.add_argument("--model", type=_local_path, required=True,
                   help="`lungxray train` output directory")
    p.add_argument("--data", required=True, help="prepared dataset dir, or a raw source "
                   "(npz, folder, gs://) prepared with the model's own settings")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    p.add_argument("--split", nargs="+", default=["test"], help="split(s) to evaluate "
                   "(default test); each goes to <output>/<split>/")
    p.add_argument("--class-map", default=None, metavar="SRC=CLASS,...",
                   help="map the source's class names onto the model's, e.g. "
                   "'COVID-19=pneumonia,NORMAL=normal'; SRC=- leaves a class out "
                   "(default: the classes must match)")
    p.add_argument("--external-data", default=None, metavar="SOURCE",
                   help="another labelled source (folder, npz, CSV, gs://) evaluated after the "
                   "splits as one more split, 'external', in the same report (default: none)")
    p.add_argument("--external-class-map", default=None, metavar="SRC=CLASS,...",
                   help="--class-map for --external-data (default: the classes must match)")
    p.add_argument("--no-gradcam", action="store_true",
                   help="skip the Grad-CAM grid (true/false positives, false negatives)")
    p.add_argument("--robustness", action=argparse.BooleanOptionalAction,
                   default=DEFAULTS.robustness,
                   help="AUC under 11 simulated acquisition shifts x 3 severities (default on)")
    p.add_argument("--robustness-samples", type=int, default=DEFAULTS.robustness_samples,
                   metavar="N", help="stratified images per split for the robustness suite "
                   f"(default {DEFAULTS.robustness_samples}; 0 = all)")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=DEFAULTS.tta,
                   help="also report the AUC of test-time augmentation (shifts, zoom; no flips)")
    p.add_argument("--deployment-prevalence", type=float,
                   default=DEFAULTS.deployment_prevalence, metavar="P",
                   help="also report the Bayes operating point and PPV/NPV at this prevalence, "
                   "from scores calibrated on validation (default 0: not computed)")
    p.add_argument("--reference", type=_local_path, default=None, metavar="EVAL_DIR",
                   help="an earlier evaluation whose val/predictions.csv calibrates the scores "
                   "when val is not among --split (default: --output's, if any)")
    _common(p, seed=False)
    p.set_defaults(func=_evaluate)


def _evaluate(args: argparse.Namespace) -> dict:
    _model_checked(args.model)
    from lungxray import evaluate

    options = evaluate.EvalOptions(
        robustness=args.robustness, robustness_samples=args.robustness_samples, tta=args.tta,
        deployment_prevalence=args.deployment_prevalence, reference=args.reference)
    return evaluate.evaluate(args.model, args.data, args.output, splits=args.split,
                             cache_dir=args.cache_dir, class_map=args.class_map,
                             explain=not args.no_gradcam, options=options,
                             external=args.external_data,
                             external_class_map=args.external_class_map)


def add_compare_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray compare``, run by :func:`_compare`."""
    p = sub.add_parser("compare", help="table, charts, report.html and best_model/",
                       description="Compare trials. Each trial DIR holds model/ (train output), "
                       "eval/ (evaluate output with val/ and test/) and optionally tune/.")
    p.add_argument("--trials", type=_local_path, nargs="+", required=True, help="trial directories")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    p.add_argument("--select-metric", default=DEFAULTS.select_metric,
                   help="validation metric that picks the best model (default "
                   f"{DEFAULTS.select_metric})")
    p.add_argument("--ensemble-k", type=int, default=DEFAULTS.ensemble_k,
                   help="also compare the mean-probability ensemble of the top K models on the "
                   f"selection metric (default {DEFAULTS.ensemble_k}; 0 = none)")
    p.add_argument("--target-sensitivity", type=float, default=None,
                   help="choose the ensemble's threshold as the highest reaching this "
                   "validation sensitivity (default: as its members, else --threshold-rule)")
    _threshold_rule(p, "the ensemble's threshold")
    p.set_defaults(func=_compare)


def _threshold_rule(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--threshold-rule", choices=THRESHOLD_RULES, default=DEFAULTS.threshold_rule,
                   help=f"how {what} is chosen without a target sensitivity: youden (Youden's J "
                   "on validation), balanced (0.5, the class-weighted training's balanced "
                   "point), platt (where the validation-fitted Platt posterior is 0.5) or "
                   "worst_group (the highest lowest balanced accuracy over validation's site x "
                   "image-statistics-cluster groups); "
                   f"default {DEFAULTS.threshold_rule}")


def _compare(args: argparse.Namespace) -> dict:
    from lungxray import report

    return report.compare(args.trials, args.output, select_metric=args.select_metric,
                          ensemble_k=args.ensemble_k, target_sensitivity=args.target_sensitivity,
                          threshold_rule=args.threshold_rule)


def add_crossfold_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray crossfold``, run by :func:`_crossfold`."""
    p = sub.add_parser("crossfold", help="the model's recipe on K image-statistics folds: "
                       "out-of-fold predictions as the split shift_folds",
                       description="Train a model's recipe (network, hyperparameters, weights, "
                       "seed, threshold rule) once per fold of train + test_shifted cut into K "
                       "image-statistics folds, each predicting the fold it left out; writes "
                       "OUTPUT/shift_folds/ as an evaluated split (put it beside `lungxray "
                       "evaluate`'s splits; compare breaks ties on it first).")
    p.add_argument("--data", type=_local_path, required=True, help="prepared dataset directory")
    p.add_argument("--model", type=_local_path, required=True,
                   help="a trained model directory (one network)")
    p.add_argument("--folds", type=int, required=True, help="K, 2..10 (0: nothing to do)")
    p.add_argument("--output", type=_local_path, required=True,
                   help="evaluation directory to add shift_folds/ to")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                   help=f"epochs per fold, as the model's training (default {DEFAULTS.epochs})")
    _common(p, seed=False)  # the model's own seed
    p.set_defaults(func=_crossfold)


def _crossfold(args: argparse.Namespace) -> dict:
    from lungxray import crossfold, fold_report

    result = crossfold.crossfold(args.data, args.model, args.folds, args.output,
                                 epochs=args.epochs, cache_dir=args.cache_dir)
    written = str(args.output / crossfold.SPLIT) if result else None  # --folds 0: nothing
    return {"output": written, **fold_report.scalar_metrics(result)}


def add_refit_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray refit``, run by :func:`_refit`."""
    p = sub.add_parser("refit", help="train the pick again with the carved test_shifted back in",
                       description="Train a `lungxray compare` output's best_model again (each "
                       "ensemble member, the same settings and seed) on train + test_shifted, "
                       "score it beside the pick on the splits neither trained on, and write "
                       "the compare layout with a refit section added to the report and card.")
    p.add_argument("--data", type=_local_path, required=True, help="prepared dataset directory")
    p.add_argument("--compare", type=_local_path, required=True,
                   help="a `lungxray compare` output directory")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=DEFAULTS.epochs,
                   help=f"epochs planned, as the pick's training (default {DEFAULTS.epochs})")
    p.add_argument("--refit", action=argparse.BooleanOptionalAction, default=DEFAULTS.refit,
                   help="--no-refit ships the pick as measured (the report says so); default "
                   f"{'on' if DEFAULTS.refit else 'off'}")
    p.add_argument("--external-data", default=None,
                   help="another labelled source to score the pick and the refit on")
    p.add_argument("--external-class-map", default=None, metavar="SRC=CLASS,...",
                   help="relabel --external-data's classes")
    _common(p, seed=False)  # the pick's own seed
    p.set_defaults(func=_refit)


def _refit(args: argparse.Namespace) -> dict:
    from lungxray import refit

    return refit.refit_compare_output(args.data, args.compare, args.output, enabled=args.refit,
                                      epochs=args.epochs, cache_dir=args.cache_dir,
                                      external=args.external_data,
                                      external_class_map=args.external_class_map)


def add_predict_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray predict``, run by :func:`_predict`."""
    p = sub.add_parser("predict", help="apply a model to unlabeled images: predictions.csv",
                       description="Predict unlabeled images with a `lungxray train` output or "
                       "best_model/ (single or ensemble), preprocessed as the model was trained. "
                       "Writes <output>/predictions.csv (path, prob_<class>..., predicted_index, "
                       "predicted_class at the model's saved threshold), bad_files.csv with "
                       "--skip-bad, and gradcam/ with --gradcam. For a two-class model saved "
                       "with its validation calibration, prevalence.json: the images' "
                       "prevalence estimated by EM (95%% bootstrap interval) and the threshold "
                       "the model would use at it. Streams in batches; progress on stderr.")
    p.add_argument("--model", type=_local_path, required=True,
                   help="`lungxray train` output directory or compare's best_model/")
    p.add_argument("--source", required=True, help="image folder (any layout; PNG, JPEG, DICOM), "
                   "CSV with a 'path' column (relative to its folder), .npz with 'images' or "
                   "'<split>_images', or a gs:// URI of any of them")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images decoded and predicted per step (default 64)")
    p.add_argument("--skip-bad", action="store_true", help="list unreadable files in "
                   "bad_files.csv and go on, instead of failing")
    p.add_argument("--gradcam", action="store_true", help="also write a Grad-CAM overlay of "
                   "each image's predicted class at the image's own resolution (gradcam/)")
    p.add_argument("--workers", type=int, default=0,
                   help="decoding threads (default 0: one per CPU, at most 8)")
    p.add_argument("--site", default=None,
                   help="decide at this training site's own validation threshold "
                   "(model_info.json's site_thresholds) instead of the pooled one")
    _common(p, seed=False)
    p.set_defaults(func=_predict)


def _predict(args: argparse.Namespace) -> dict:
    from lungxray import predict

    return predict.predict(args.model, args.source, args.output, batch_size=args.batch_size,
                           skip_bad=args.skip_bad, explain=args.gradcam,
                           cache_dir=args.cache_dir, workers=args.workers, site=args.site)


def add_export_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray export``, run by :func:`_export`."""
    p = sub.add_parser("export", help="TensorFlow SavedModel for TF Serving / KServe",
                       description="Write <output>/<version>/ (saved_model.pb, variables/): "
                       "signatures serving_default (float pixels), predict_uint8 (uint8 pixels) "
                       "and predict_image_bytes (encoded PNG/JPEG), each returning "
                       "probabilities, class_index and class_name. An ensemble is exported as "
                       "the mean of its members.")
    p.add_argument("--model", type=_local_path, required=True,
                   help="`lungxray train` output directory or compare's best_model/")
    p.add_argument("--output", type=_local_path, required=True,
                   help="model base directory (TF Serving's model_base_path)")
    p.add_argument("--version", type=int, default=1, help="version subdirectory (default 1)")
    p.add_argument("--force", action="store_true", help="replace an existing version")
    p.set_defaults(func=_export)


def _export(args: argparse.Namespace) -> dict:
    _model_checked(args.model)
    from lungxray import export

    return export.export(args.model, args.output, version=args.version, force=args.force)


def _champion_args(args: argparse.Namespace, *apart: str) -> str:
    """--champion checked before any work: a local folder or gs:// prefix that can hold a
    champion, apart from the inputs named in ``apart`` (never inside the model or the data)."""
    from lungxray import champion_store, uris

    uri = champion_store.check_uri(args.champion, "--champion")
    for name in apart:
        uris.check_apart(uri, str(getattr(args, name)), "--champion", f"--{name}")
    return uri


def add_challenge_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray challenge``, run by :func:`_challenge`."""
    p = sub.add_parser("challenge", help="compare a new model with the champion in use: "
                       "decision.json (promote/keep and why)",
                       description="Paired bootstrap of the ROC AUC difference between the "
                       "champion at --champion and --model on the same images of --data; "
                       "decided on val with --margin, every other split reported. Writes "
                       "<output>/decision.json and <output>/champion.md.")
    p.add_argument("--model", type=_local_path, required=True,
                   help="the challenger: a `lungxray train` output or compare's best_model/")
    p.add_argument("--data", type=_local_path, required=True, help="prepared dataset directory")
    p.add_argument("--champion", required=True,
                   help="champion folder or gs:// prefix (new or empty: no champion yet; '': "
                   "skip the comparison)")
    p.add_argument("--run-id", required=True, help="this run's id (its history/ entry name)")
    p.add_argument("--margin", type=float, default=DEFAULTS.promotion_margin,
                   help="promote only if better by more than this AUC (default "
                   f"{DEFAULTS.promotion_margin:g})")
    p.add_argument("--model-card", type=_local_path, default=None,
                   help="the challenger's model_card.md: also write <output>/model_card.md, the "
                   "card with the challenge section appended (compare's model_card output)")
    p.add_argument("--output", type=_local_path, required=True, help="output directory")
    _common(p)
    p.set_defaults(func=_challenge)


def _challenge(args: argparse.Namespace) -> dict:
    from lungxray import champion

    uri = _champion_args(args, "model", "data", "output") if args.champion else ""
    _model_checked(args.model)
    record = champion.run_challenge(args.model, args.data, uri, args.run_id, args.output,
                                    margin=args.margin, seed=args.seed, cache_dir=args.cache_dir,
                                    model_card=args.model_card)
    return {"decision": record["decision"], "reason": record["reason"],
            "decision_file": str(args.output / champion.DECISION_FILE)}


def add_promote_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray promote``, run by :func:`_promote`."""
    p = sub.add_parser("promote", help="make a model the champion (decision.json must say "
                       "promote)",
                       description="Copy the model, its model card and decision.json to "
                       "<champion>/history/<run id>/ and make it the champion by one swap of "
                       "<champion>/champion.json (on gs:// conditioned on its generation). "
                       "Verified first: the decision's own numbers must say promote, and it "
                       "must be for this model (hash of its files), this champion and its "
                       "classes and input. A promotion that was stopped or killed is finished "
                       "or undone by the next one.")
    p.add_argument("--model", type=_local_path, required=True, help="the model to promote")
    p.add_argument("--decision", type=_local_path, required=True,
                   help="decision.json written by `lungxray challenge`")
    p.add_argument("--champion", required=True, help="champion folder or gs:// prefix")
    p.add_argument("--model-card", type=_local_path, default=None, help="model_card.md to keep")
    p.set_defaults(func=_promote)


def _promote(args: argparse.Namespace) -> dict:
    from lungxray import promotion, safeio
    from lungxray.errors import ConfigError

    uri = _champion_args(args, "model")
    record = safeio.load_json_object(args.decision, "decision", error=ConfigError)
    entry = promotion.promote(args.model, uri, record, model_card=args.model_card)
    return {"champion": uri, "history_entry": entry}


def add_models_parser(sub: argparse._SubParsersAction) -> None:
    """The options of ``lungxray models``, run by :func:`_models`."""
    p = sub.add_parser("models", help="list the supported backbones")
    p.set_defaults(func=_models)


def _models(args: argparse.Namespace) -> None:
    from lungxray.backbones import REGISTRY

    print(f"{'name':<20} {'preprocess':<10} {'default':>7} {'min':>4}")
    for spec in REGISTRY.values():
        print(f"{spec.name:<20} {spec.preprocess:<10} {spec.default_size:>7} {spec.min_size:>4}")


def _local_path(text: str) -> Path:
    """A local path argument: ``gs://b/x`` would silently become the local folder ``gs:/b/x``."""
    if "://" in text:
        raise argparse.ArgumentTypeError(f"{text!r} is a URI; this option takes a local path "
                                         "(copy results to a bucket afterwards, e.g. with "
                                         "`gcloud storage cp -r`)")
    return Path(text)


def _common(parser: argparse.ArgumentParser, seed: bool = True) -> None:
    if seed:
        parser.add_argument("--seed", type=int, default=DEFAULTS.seed,
                            help=f"random seed (default {DEFAULTS.seed})")
    parser.add_argument("--cache-dir", type=_local_path, default=None,
                        help="cache for downloads (default ~/.cache/lungxray)")


def _training(parser: argparse.ArgumentParser, epochs: int) -> None:
    parser.add_argument("--data", type=_local_path, required=True,
                        help="prepared dataset directory")
    parser.add_argument("--model", required=True, help="Keras Applications name, e.g. VGG16 "
                        "(`lungxray models` lists them)")
    parser.add_argument("--output", type=_local_path, required=True, help="output directory")
    parser.add_argument("--epochs", type=int, default=epochs, help=f"epochs (default {epochs})")
    parser.add_argument("--weights", default="none", help=WEIGHTS_HELP + " (default none)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help=f"batch size (default {DEFAULTS.batch_size})")
    _common(parser)


# In the order `lungxray --help` lists them.
COMMANDS = (add_preprocess_parser, add_tune_parser, add_train_parser, add_evaluate_parser,
            add_crossfold_parser, add_compare_parser, add_refit_parser, add_predict_parser,
            add_export_parser, add_challenge_parser, add_promote_parser, add_models_parser)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungxray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
    for command in sub.choices.values():
        command.add_argument("--verbose", action="store_true",
                             help="let TensorFlow's native start-up logging through to stderr")
    return parser


MAX_ERROR_LINE = 2000  # characters of an error line; every quoted value in it is cut already


def one_line(err: BaseException) -> str:
    """An error as one line of bounded length (stating the full length when cut)."""
    text = " ".join(str(err).split()) or type(err).__name__
    if len(text) > MAX_ERROR_LINE:
        text = f"{text[:MAX_ERROR_LINE]}... ({len(text)} characters)"
    return text


def main(argv: list[str] | None = None) -> int:
    from lungxray.errors import LungxrayError

    args = build_parser().parse_args(argv)
    if not args.verbose:
        quiet.quiet_native_logs()  # stderr carries the one-line error, not TensorFlow's banner
    try:
        result = args.func(args)
    except (LungxrayError, OSError) as err:
        # Input problems (every LungxrayError, and files that cannot be read or written) are
        # one line; any other exception is a bug and keeps its traceback.
        print(f"lungxray {args.command}: error: {one_line(err)}", file=sys.stderr)
        return 2
    if result is not None:
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
