"""Train's hyperparameters: defaults (pretrained, from scratch, per model), the merge of a run's
choice over them, reading a tuning result, and that none of it loads a framework."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lungxray import hparams
from lungxray.errors import ConfigError
from lungxray.hparams import (
    DEFAULT_HPARAMS,
    classifier_options,
    defaults_for,
    merge_hparams,
    read_best_hparams,
)


def test_defaults_pretrained_from_scratch_and_per_model():
    assert defaults_for() == DEFAULT_HPARAMS and defaults_for() is not DEFAULT_HPARAMS
    assert defaults_for(pretrained=True, model_name="SmallCNN") == DEFAULT_HPARAMS
    scratch = defaults_for(pretrained=False, model_name="VGG16")
    assert scratch == {**DEFAULT_HPARAMS, "learning_rate": 1e-4}
    assert defaults_for(False, "SmallCNN")["learning_rate"] == 1e-3  # BatchNorm throughout
    assert defaults_for(False)["learning_rate"] == hparams.SCRATCH_DEFAULTS["learning_rate"]


def test_merge_overrides_the_defaults_and_keeps_every_name():
    merged = merge_hparams({"dropout": 0.4, "ema": True})
    assert set(merged) == set(DEFAULT_HPARAMS)
    assert merged == {**DEFAULT_HPARAMS, "dropout": 0.4, "ema": True}
    assert merge_hparams(None, pretrained=False, model_name="VGG16")["learning_rate"] == 1e-4
    # An explicit choice wins over the scratch default.
    assert merge_hparams({"learning_rate": 3e-3}, False, "VGG16")["learning_rate"] == 3e-3


@pytest.mark.parametrize("bad, message", [
    ({"learnig_rate": 1e-3}, "unknown hyperparameters 'learnig_rate'; known: augment, "),
    ({f"x{i:02d}": 1 for i in range(12)}, r"'x00', .*'x09' and 2 more; known: "),
    ({"mixup": -1.0}, "mixup"),
    ({"dense_units": 1.5}, "dense_units must be an integer"),
    ({"standardize": "yes"}, "standardize"),
    ({"learning_rate": float("inf")}, "finite"),
])
def test_merge_refuses_unknown_names_and_bad_values(bad, message):
    with pytest.raises(ConfigError, match=message):
        merge_hparams(bad)


def test_read_best_hparams_from_a_tuning_result_or_a_plain_file(tmp_path):
    best = tmp_path / "best_hparams.json"
    best.write_text(json.dumps({"model_name": "VGG16", "hparams": {"dropout": 0.3}}))
    assert read_best_hparams(best) == {"dropout": 0.3}
    assert read_best_hparams(best, "VGG16") == {"dropout": 0.3}
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"learning_rate": 1e-4, "augment": 0.5}))
    assert read_best_hparams(plain, "ResNet50") == {"learning_rate": 1e-4, "augment": 0.5}


@pytest.mark.parametrize("content, message", [
    ({"model_name": "VGG16", "hparams": {}}, "tuned for 'VGG16', not ResNet50"),
    ({"hparams": [0.1]}, "'hparams' must be a JSON object"),
    ({"hparams": {"droput": 0.1}}, "unknown hyperparameters 'droput'"),
    ({"dropout": 2.0}, "dropout"),
    ([1, 2], "must hold a JSON object"),
])
def test_read_best_hparams_refuses_bad_files(tmp_path, content, message):
    path = tmp_path / "best.json"
    path.write_text(json.dumps(content))
    with pytest.raises(ConfigError, match=message):
        read_best_hparams(path, "ResNet50")


def test_a_missing_or_broken_hparams_file_is_a_config_error(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="broken.json"):
        read_best_hparams(broken)
    with pytest.raises(ConfigError, match="missing.json.* does not exist"):
        read_best_hparams(tmp_path / "missing.json")


def test_classifier_options_are_the_model_builders_share_of_the_hparams():
    options = classifier_options({**DEFAULT_HPARAMS, "dense_units": 64.0, "standardize": 1})
    assert options == {"dropout": 0.2, "dense_units": 64, "augment": 1.0,
                       "intensity_augment": 0.0, "standardize": True, "randaugment": 0.0,
                       "augmix": 0.0}
    assert isinstance(options["dense_units"], int)


def test_the_hparams_spaces_and_tuning_report_load_no_framework():
    """Reading defaults must not cost a TensorFlow start-up (schema checks, the CLI's help)."""
    code = ("import sys, lungxray.hparams, lungxray.spaces, lungxray.tune_report; "
            "print(sorted({m.split('.')[0] for m in sys.modules} "
            "& {'tensorflow', 'keras', 'keras_tuner', 'jax'}))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"
