"""Issue 26 (part B): parameter files are read within limits and checked against one schema
before any step runs; bounded JSON reading; one-line errors with cut values."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from lungxray import safeio, schema
from lungxray.errors import ConfigError, DataError, LungxrayError, quote_repr
from lungxray.limits import Limits
from pipelines.params import ParamsError, check_values, load_params, parse_value
from pipelines.profiles import pipeline_defaults
from tests.fuzz import hostile_state


def _load(tmp_path: Path, name: str, text: str) -> dict:
    path = tmp_path / name
    path.write_text(text)
    started = time.monotonic()
    try:
        params = load_params(path)
        check_values(params)
        return params
    finally:
        assert time.monotonic() - started < 10


def _assert_one_line(err: BaseException, limit: int = 600) -> None:
    text = str(err)
    assert "\n" not in text and len(text) < limit, text[:300]


def test_schema_names_are_the_pipelines_parameters():
    # One schema: a parameter added to the pipeline without a rule here fails this test.
    assert set(schema.FIELDS) == set(pipeline_defaults())


def test_the_schema_owns_the_pipelines_defaults():
    assert pipeline_defaults() == schema.DEFAULTS.model_dump()
    schema.check_pipeline_params(schema.DEFAULTS.model_dump())  # its defaults pass its rules


@pytest.mark.parametrize("params, message", [
    ({"epochs": "3"}, "parameter epochs must be an integer, got str '3'"),
    ({"epochs": 3.0}, "parameter epochs must be an integer, got float 3.0"),
    ({"image_size": False}, "parameter image_size must be an integer, got bool False"),
    ({"target_sensitivity": True}, "parameter target_sensitivity must be a number, got bool"),
    ({"robustness": 1}, "parameter robustness must be true or false, got int 1"),
    ({"base_models": ("VGG16",)}, "parameter base_models must be a list of strings, got tuple"),
    ({"deployment_prevalence": 0.0005}, "parameter deployment_prevalence must be between 0.001 "
                                        "and 0.999 (or 0 for the default), got 0.0005"),
    ({"image_size": 4}, "parameter image_size must be between 8 and 1024 (or 0 for the "
                        "default), got 4"),
    ({"holdout_site": "x" * 41}, "parameter holdout_site must be between 0 and 40 characters, "
                                 "got 41 characters"),
    ({"shifted_test_fraction": 0.6}, "parameter shifted_test_fraction must be between 0.0 and "
                                     "0.5, got 0.6"),
    ({"threshold_rule": "median"}, "parameter threshold_rule must be one of youden, balanced, "
                                   "platt, worst_group, got 'median'"),
    # The first refused one in the order given, not in the schema's order.
    ({"seed": -1, "epochs": 0}, "parameter seed must be between 0"),
])
def test_strict_types_and_declared_ranges(params, message):
    with pytest.raises(ConfigError) as err:
        schema.check_pipeline_params(params)
    assert message in str(err.value)
    _assert_one_line(err.value)


def test_zero_means_the_default_where_declared():
    schema.check_pipeline_params({"image_size": 0, "deployment_prevalence": 0, "epochs": 1,
                                  "target_sensitivity": 1, "unknown_name": object()})


def test_a_raised_image_size_limit_widens_the_range():
    schema.check_pipeline_params({"image_size": 2048}, Limits(max_image_size=4096))
    with pytest.raises(ConfigError, match="between 8 and 4096 .* got 5000"):
        schema.check_pipeline_params({"image_size": 5000}, Limits(max_image_size=4096))


def test_the_docs_json_schema_is_current():
    # Rewrite with: python -m lungxray.schema > docs/params.schema.json
    path = Path(__file__).resolve().parents[1] / "docs" / "params.schema.json"
    assert path.read_text() == schema.json_schema_text()
    properties = json.loads(path.read_text())["properties"]
    assert properties["epochs"]["default"] == 6 and properties["epochs"]["maximum"] == 10_000
    assert properties["tune_algorithm"]["enum"] == list(schema.TUNE_ALGORITHMS)
    assert all(p.get("description") for p in properties.values())


def test_the_pipeline_defaults_and_profiles_pass_the_schema():
    from pipelines.profiles import PROFILES, resolve_params

    for profile in PROFILES:
        check_values(resolve_params(profile))


def test_yaml_alias_bomb_is_refused_before_it_expands(tmp_path):
    # Issue 26: 401 bytes of aliases in base_models -> a 2.1 GB log line, 6.4 GB, killed.
    text = hostile_state.alias_bomb_yaml()
    assert len(text) < 600
    with pytest.raises(ParamsError, match=r"YAML aliases \(\*a0\) are not allowed") as err:
        _load(tmp_path, "bomb.yaml", text)
    _assert_one_line(err.value)
    with pytest.raises(ParamsError, match="aliases"):
        parse_value("[&x a, *x]", "base_models")


@pytest.mark.parametrize("name, text", [
    ("deep.yaml", hostile_state.deep_yaml()),
    ("deep.json", hostile_state.deep_json()),
    ("deepmap.yaml", "".join(" " * i + f"k{i}:\n" for i in range(200)) + " " * 200 + "x: 1\n"),
])
def test_deep_nesting_is_one_line(tmp_path, name, text):
    with pytest.raises(ParamsError, match="nested") as err:
        _load(tmp_path, name, text)
    _assert_one_line(err.value)


@pytest.mark.parametrize("text, message", [
    ("epochs: -5\n", "parameter epochs must be between 1 and 10000, got -5"),
    ("batch_size: 0\n", "parameter batch_size must be between 1 and 65536, got 0"),
    ("image_size: 100000\n", "parameter image_size must be between 8 and 1024 (or 0 for the "
                             "default), got 100000"),
    ("seed: -1\n", "parameter seed must be between 0"),
    ("tune_hyperband_factor: 1\n", "parameter tune_hyperband_factor must be between 2 and 100"),
    ("ensemble_k: -1\n", "parameter ensemble_k must be between 0 and 100"),
    ("epochs: true\n", "parameter epochs must be an integer, got bool True"),
    ("target_sensitivity: .nan\n", "target_sensitivity must be a finite number"),
    ("base_models: [VGG16, Nope]\n", "parameter base_models: unknown model 'Nope'"),
    ("base_models: [VGG16, VGG16]\n", "VGG16 listed more than once"),
    ("base_models: [VGG16, 3]\n", "parameter base_models must be a list of strings"),
    ("data_source: ''\n", "parameter data_source must be between 1 and 4096 characters, got 0"),
    ("seed: " + "9" * 5000 + "\n", "is not valid YAML/JSON: Exceeds the limit (4300 digits)"),
    ("{[a]: 1}\n", "is not valid YAML"),
    ("epochs: !!python/object:os.system x\n", "is not valid YAML"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, text, message):
    with pytest.raises(ParamsError) as err:
        _load(tmp_path, "p.yaml", text)
    assert message in str(err.value)
    _assert_one_line(err.value)


def test_a_long_value_is_cut_and_its_length_stated(tmp_path):
    with pytest.raises(ParamsError) as err:
        _load(tmp_path, "p.yaml", "base_models: [" + "x" * 100_000 + "]\n")
    assert "... (100000 characters)" in str(err.value)
    _assert_one_line(err.value)
    assert quote_repr(list(range(1000)), 20).endswith("... (4890 characters)")


def test_params_file_size_and_kind_are_checked_before_reading(tmp_path):
    big = tmp_path / "big.yaml"
    with big.open("wb") as fh:
        fh.truncate(17 << 20)
    with pytest.raises(ParamsError, match="more than the limit"):
        load_params(big)
    with pytest.raises(ParamsError, match="is not a regular file"):
        load_params(Path("/dev/zero"))
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "missing.yaml")
    (tmp_path / "latin.yaml").write_bytes(b"data_source: \xff\n")
    with pytest.raises(ParamsError, match="not UTF-8"):
        load_params(tmp_path / "latin.yaml")


def test_valid_params_files_still_load(tmp_path):
    params = _load(tmp_path, "ok.yaml", "epochs: 3\nlr_like: 1e-3\nbase_models: [VGG16]\n"
                   "anchor_only: &a 5\n")
    assert params == {"epochs": 3, "lr_like": 1e-3, "base_models": ["VGG16"],
                      "anchor_only": 5}


@pytest.mark.parametrize("text, message", [
    (hostile_state.deep_json(5000), "nested"),
    ("[" * 65 + "]" * 65, "nested more than 64 levels"),
    ('{"a": ', "not valid JSON"),
    (b"\xff\xfe{", "not valid JSON"),
])
def test_bounded_json(tmp_path, text, message):
    path = tmp_path / "x.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(DataError, match=message) as err:
        safeio.load_json(path, "manifest")
    _assert_one_line(err.value)
    assert safeio.load_json(_write(tmp_path, "[[1]]"), "manifest") == [[1]]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "ok.json"
    path.write_text(text)
    return path


def test_json_size_limit_is_checked_before_reading(tmp_path):
    path = tmp_path / "big.json"
    path.write_text("[" + "0," * 600 + "0]")
    with pytest.raises(ConfigError, match="1203 bytes, more than the limit of 1000"):
        safeio.load_json(path, "metrics", Limits(max_json_bytes=1000), ConfigError)


def test_keras_archive_sizes_are_checked_on_the_zip_directory(tmp_path):
    bomb = hostile_state.keras_bomb(tmp_path / "bomb.keras", 5_000_000)
    with pytest.raises(LungxrayError, match="config.json inflates to 5000000 bytes"):
        safeio.check_keras_archive(bomb, Limits(max_model_config_bytes=1_000_000))
    with pytest.raises(LungxrayError, match="inflates to 50000"):
        safeio.check_keras_archive(bomb, Limits(max_model_folder_bytes=1_000_000))
    safeio.check_keras_archive(bomb)  # within the defaults: a valid (empty) JSON object
    (tmp_path / "junk.keras").write_bytes(b"PK\x03\x04junk")
    with pytest.raises(LungxrayError, match="not a valid .keras archive"):
        safeio.check_keras_archive(tmp_path / "junk.keras")


def test_hparams_are_typed_and_ranged():
    schema.check_hparams({"dropout": 0.5, "dense_units": 64.0, "class_weighting": False}, "x")
    for hparams, message in [({"dropout": "x"}, "dropout must be a number, got str"),
                             ({"dropout": 5}, "dropout must be between 0.0 and 0.99"),
                             ({"dense_units": 1.5}, "dense_units must be an integer"),
                             ({"learning_rate": float("inf")}, "finite"),
                             ({"class_weighting": 1}, "true or false")]:
        with pytest.raises(ConfigError, match=message):
            schema.check_hparams(hparams, "x")


def test_model_info_json_is_bounded(tmp_path):
    from lungxray import artifacts, model_loader

    (tmp_path / artifacts.INFO_FILE).write_text(hostile_state.deep_json(100_000, "model_name"))
    with pytest.raises(LungxrayError, match="nested"):
        model_loader.read_model_info(tmp_path)
    (tmp_path / artifacts.INFO_FILE).write_text(json.dumps([1]))
    with pytest.raises(LungxrayError, match="must hold a JSON object"):
        model_loader.read_model_info(tmp_path)
