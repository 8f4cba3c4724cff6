"""pipelines.params: reading PARAMS files and checking them against a compiled pipeline spec."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from pipelines.params import (
    ParamsError,
    check_image,
    declared_parameters,
    load_params,
    read_pipeline_spec,
    validate_params,
)

SPEC = {
    "pipelineInfo": {"name": "p"},
    "root": {
        "inputDefinitions": {
            "parameters": {
                "name": {"parameterType": "STRING"},
                "epochs": {
                    "parameterType": "NUMBER_INTEGER",
                    "defaultValue": 2.0,
                    "isOptional": True,
                },
                "lr": {"parameterType": "NUMBER_DOUBLE", "defaultValue": 0.1, "isOptional": True},
                "flag": {"parameterType": "BOOLEAN", "defaultValue": False, "isOptional": True},
                "models": {"parameterType": "LIST", "defaultValue": [], "isOptional": True},
                "extra": {"parameterType": "STRUCT", "defaultValue": {}, "isOptional": True},
            }
        }
    },
}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_yaml_mapping_reads_exponent_floats(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "lr: 1e-3\nepochs: 4\nmodels: [VGG16, InceptionV3]\n")
    assert load_params(path) == {"lr": 0.001, "epochs": 4, "models": ["VGG16", "InceptionV3"]}


def test_load_json(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", '{"lr": 1e-3, "flag": true, "extra": {"a": 1}}')
    assert load_params(path) == {"lr": 0.001, "flag": True, "extra": {"a": 1}}


def test_empty_file_means_no_params(tmp_path: Path) -> None:
    assert load_params(write(tmp_path, "p.yaml", "")) == {}


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("list.yaml", "- a\n- b\n", "must hold a mapping"),
        ("scalar.yaml", "just words", "must hold a mapping"),
        ("broken.yaml", "a: [1, 2\n", "not valid YAML/JSON"),
        ("broken.json", '{"a": }', "not valid YAML/JSON"),
        ("intkeys.yaml", "1: a\n", "must be strings"),
    ],
)
def test_load_rejects_non_mappings(tmp_path: Path, name: str, text: str, needle: str) -> None:
    with pytest.raises(ParamsError, match=needle) as err:
        load_params(write(tmp_path, name, text))
    assert "\n" not in str(err.value)


def test_load_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="does not exist"):
        load_params(tmp_path / "nope.yaml")


def test_declared_parameters_of_compiled_package(tiny_package: Path) -> None:
    declared = declared_parameters(read_pipeline_spec(tiny_package))
    assert declared["message"] == {"parameterType": "STRING"}
    assert declared["epochs"]["parameterType"] == "NUMBER_INTEGER"
    assert declared["epochs"]["isOptional"] is True


@pytest.mark.parametrize(
    "params",
    [
        {"name": "x"},
        {"name": "x", "epochs": 5, "lr": 3, "flag": True, "models": ["A"], "extra": {"k": [1]}},
        {"name": "", "lr": 0.5},
    ],
)
def test_valid_params_pass(params: dict) -> None:
    assert validate_params(SPEC, params) == params


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"name": "x", "epoch": 5}, "unknown pipeline parameter(s) 'epoch'"),
        ({"name": "x", "epochs": "five"}, "'epochs' must be an integer (NUMBER_INTEGER), got str"),
        ({"name": "x", "epochs": 2.5}, "'epochs' must be an integer"),
        ({"name": "x", "epochs": True}, "'epochs' must be an integer"),
        ({"name": "x", "lr": "fast"}, "'lr' must be a number (NUMBER_DOUBLE)"),
        ({"name": "x", "lr": False}, "'lr' must be a number"),
        ({"name": "x", "lr": math.nan}, "finite number"),
        ({"name": "x", "flag": "yes"}, "'flag' must be true or false (BOOLEAN)"),
        ({"name": "x", "models": "VGG16"}, "'models' must be a list (LIST)"),
        ({"name": "x", "extra": [1]}, "'extra' must be a mapping (STRUCT)"),
        ({"name": 42}, "'name' must be a string (STRING), got int 42 (quote it in YAML)"),
        ({"name": "x", "models": [{1, 2}]}, "not JSON-serialisable"),
        ({"epochs": 1}, "missing required pipeline parameter(s): name"),
    ],
)
def test_invalid_params_fail_with_one_line(params: dict, needle: str) -> None:
    with pytest.raises(ParamsError) as err:
        validate_params(SPEC, params)
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_read_pipeline_spec_rejects_non_pipelines(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match="not a compiled KFP pipeline"):
        read_pipeline_spec(write(tmp_path, "x.yaml", "a: 1\n"))
    with pytest.raises(ParamsError, match="make compile"):
        read_pipeline_spec(tmp_path / "missing.yaml")
    with pytest.raises(ParamsError, match=r"\.yaml"):
        read_pipeline_spec(write(tmp_path, "x.json", "{}"))


def _spec_with_images(*images: str) -> dict:
    executors = {f"exec-{i}": {"container": {"image": img}} for i, img in enumerate(images)}
    return {"deploymentSpec": {"executors": executors}}


def test_check_image_accepts_the_expected_tag() -> None:
    check_image(_spec_with_images("localhost:5001/lungxray:abc"), "localhost:5001/lungxray:abc")
    # Other images (e.g. a helper step) are fine as long as ours is the expected tag.
    check_image(
        _spec_with_images("localhost:5001/lungxray:abc", "busybox:1.37.0"),
        "localhost:5001/lungxray:abc",
    )


@pytest.mark.parametrize(
    "images",
    [
        ("localhost:5001/lungxray:old",),
        ("localhost:5001/lungxray:abc", "localhost:5001/lungxray:old"),
        ("busybox:1.37.0",),
    ],
)
def test_check_image_rejects_stale_packages(images: tuple[str, ...]) -> None:
    with pytest.raises(ParamsError, match="run `make compile`"):
        check_image(_spec_with_images(*images), "localhost:5001/lungxray:abc")
