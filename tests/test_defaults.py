"""One owner per default (issue 35): every run parameter's default is lungxray.schema's
``DEFAULTS``; the pipeline's signature reads it, and a CLI option or a component parameter that
is the same parameter must have the same default, so a drifted copy fails here."""

from __future__ import annotations

import argparse
import inspect
import typing

import pytest
import yaml
from kfp import compiler

import components
from lungxray import cli, schema
from pipelines.pipeline import build_pipeline
from pipelines.profiles import pipeline_defaults

# Each subcommand option that is a pipeline run parameter: (command, option dest) -> parameter.
SAME_PARAMETER = {
    ("preprocess", "source"): "data_source",
    ("preprocess", "site"): "sites",
    ("preprocess", "holdout_site"): "holdout_site",
    ("preprocess", "image_size"): "image_size",
    ("preprocess", "keep_aspect"): "keep_aspect",
    ("preprocess", "skip_bad"): "skip_bad",
    ("preprocess", "shifted_test_fraction"): "shifted_test_fraction",
    ("preprocess", "max_per_split"): "max_per_split",
    ("preprocess", "seed"): "seed",
    ("tune", "weights"): "weights",
    ("tune", "epochs"): "tune_epochs",
    ("tune", "max_trials"): "tune_trials",
    ("tune", "train_samples"): "tune_train_samples",
    ("tune", "algorithm"): "tune_algorithm",
    ("tune", "hyperband_factor"): "tune_hyperband_factor",
    ("tune", "fine_tune_trials"): "tune_fine_tune_trials",
    ("tune", "batch_size"): "batch_size",
    ("tune", "seed"): "seed",
    ("train", "weights"): "weights",
    ("train", "epochs"): "epochs",
    ("train", "batch_size"): "batch_size",
    ("train", "seed"): "seed",
    ("train", "target_sensitivity"): "target_sensitivity",
    ("train", "threshold_rule"): "threshold_rule",
    ("evaluate", "external_data"): "external_data",
    ("evaluate", "external_class_map"): "class_map",  # the pipeline's class_map is external's
    ("evaluate", "robustness"): "robustness",
    ("evaluate", "robustness_samples"): "robustness_samples",
    ("evaluate", "tta"): "tta",
    ("evaluate", "deployment_prevalence"): "deployment_prevalence",
    ("compare", "select_metric"): "select_metric",
    ("compare", "ensemble_k"): "ensemble_k",
    ("compare", "target_sensitivity"): "target_sensitivity",
    ("compare", "threshold_rule"): "threshold_rule",
    ("crossfold", "folds"): "shift_folds",
    ("crossfold", "epochs"): "epochs",
    ("refit", "refit"): "refit",
    ("refit", "epochs"): "epochs",
    ("refit", "external_data"): "external_data",
    ("refit", "external_class_map"): "class_map",
    ("predict", "skip_bad"): "skip_bad",
    ("challenge", "champion"): "champion_uri",
    ("challenge", "margin"): "promotion_margin",
    ("challenge", "seed"): "seed",
    ("promote", "champion"): "champion_uri",
}
# A command's own options (paths, caches, settings the pipeline does not expose).
OWN_OPTIONS = {
    "preprocess": {"output", "channels", "val_fraction", "test_fraction", "min_size", "workers",
                   "max_image_pixels", "limit", "site_name", "shift_fold", "cache_dir"},
    "tune": {"data", "model", "output", "state_dir", "feature_cache", "cache_dir"},
    "train": {"data", "model", "output", "hparams", "patience", "mixed_precision", "xla",
              "cache_dir"},
    "evaluate": {"model", "data", "output", "split", "class_map", "no_gradcam", "reference",
                 "cache_dir"},
    "compare": {"trials", "output"},
    "crossfold": {"data", "model", "output", "cache_dir"},
    "refit": {"data", "compare", "output", "cache_dir"},
    "predict": {"model", "source", "output", "batch_size", "gradcam", "workers", "cache_dir",
                "site"},
    "export": {"model", "output", "version", "force"},
    "challenge": {"model", "data", "run_id", "model_card", "output", "cache_dir"},
    "promote": {"model", "decision", "model_card"},
    "models": set(),
}
# Deliberately different, and why (the README's parameter table says so too).
DIFFERENT = {
    ("tune", "weights"): "a command runs offline unless asked: no ImageNet download",
    ("train", "weights"): "a command runs offline unless asked: no ImageNet download",
}
UNSET = (None, [])  # an option left out: the pipeline's empty or 0 value


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _options(command: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in command._actions if a.dest not in ("help", "verbose")}


def test_every_option_is_a_run_parameter_or_the_commands_own():
    # A new option must be placed: the same parameter as the pipeline's, or the command's own.
    for name, command in _commands().items():
        mapped = {dest for cmd, dest in SAME_PARAMETER if cmd == name}
        assert set(_options(command)) == mapped | OWN_OPTIONS[name], name
    assert set(SAME_PARAMETER.values()) <= set(schema.FIELDS)


@pytest.mark.parametrize(("command", "dest"), sorted(SAME_PARAMETER))
def test_every_cli_default_is_the_pipelines(command, dest):
    action = _options(_commands()[command])[dest]
    pipeline = pipeline_defaults()[SAME_PARAMETER[command, dest]]
    if action.required:
        return  # no default to drift
    if (command, dest) in DIFFERENT:
        assert action.default != pipeline, f"{command} --{dest} no longer differs: drop it"
        return
    if action.default in UNSET:
        assert pipeline in ("", 0) and not isinstance(pipeline, bool), (command, dest, pipeline)
    else:
        assert action.default == pipeline and type(action.default) is type(pipeline), \
            (command, dest, action.default, pipeline)
    if action.choices is not None:  # the schema's choices, all of them
        assert tuple(action.choices) == typing.get_args(
            schema.FIELDS[SAME_PARAMETER[command, dest]].annotation), (command, dest)


def test_the_cli_reads_the_schemas_defaults_for_the_drifted_ones():
    options = {name: _options(command) for name, command in _commands().items()}
    assert options["preprocess"]["shifted_test_fraction"].default == 0.1
    assert options["evaluate"]["robustness_samples"].default == 500
    assert options["train"]["epochs"].default == schema.DEFAULTS.epochs == 6


def _component_inputs(tmp_path) -> list[tuple[str, str, str]]:
    """(component, its parameter, the pipeline parameter fed to it), from the compiled DAG."""
    package = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(build_pipeline(), str(package))
    spec = next(yaml.safe_load_all(package.read_text()))
    found = []

    def walk(dag: dict) -> None:
        for task in dag["tasks"].values():
            ref = task["componentRef"]["name"]
            if "dag" in spec["components"][ref]:
                walk(spec["components"][ref]["dag"])
                continue
            for name, given in task.get("inputs", {}).get("parameters", {}).items():
                source = given.get("componentInputParameter", "")
                source = source.removeprefix("pipelinechannel--")
                if source in schema.FIELDS:
                    found.append((ref.removeprefix("comp-"), name, source))

    walk(spec["root"]["dag"])
    return found


def test_every_component_default_is_the_schemas(tmp_path):
    # Components ship as source text, so they hold literals; the pipeline passes every one of
    # them, and a literal that is not the schema's default fails here.
    inputs = _component_inputs(tmp_path)
    checked = set()
    for component, name, parameter in inputs:
        default = inspect.signature(components.FUNCTIONS[component]).parameters[name].default
        if default is not inspect.Parameter.empty:
            assert default == getattr(schema.DEFAULTS, parameter), (component, name, parameter)
            checked.add((component, name))
    assert {("preprocess", "shifted_test_fraction"), ("evaluate", "robustness_samples"),
            ("tune", "hyperband_factor"), ("tune", "fine_tune_trials")} <= checked
    assert len(checked) >= 20


def test_the_library_reads_the_schemas_defaults():
    from lungxray import robustness

    assert schema.DEFAULTS.robustness_samples == robustness.DEFAULT_SAMPLES
    assert pipeline_defaults() == schema.DEFAULTS.model_dump()


# The library function each component calls, and the library defaults that differ on purpose.
LIBRARY = {"preprocess": ("lungxray.prepare", "preprocess"), "tune": ("lungxray.tune", "tune"),
           "train": ("lungxray.train", "train"), "evaluate": ("lungxray.evaluate", "evaluate"),
           "compare": ("lungxray.report", "compare"), "refit": ("lungxray.refit", "refit"),
           "crossfold": ("lungxray.crossfold", "crossfold"),
           "challenge": ("lungxray.champion", "run_challenge"),
           "promote": ("lungxray.promotion", "promote"), "predict": ("lungxray.predict", "predict")}
LIBRARY_DIFFERENT = {
    ("preprocess", "shifted_test_fraction"): "a library call carves no shift proxy unless asked",
    ("tune", "weights"): "a library call never downloads ImageNet weights unasked",
    ("train", "weights"): "a library call never downloads ImageNet weights unasked",
}


def test_every_library_default_is_the_schemas(tmp_path):
    # What a component passes under a parameter's name, the library function it calls takes
    # under the same name: its default must be the run parameter's (or differ on purpose).
    import importlib

    checked = set()
    for component, name, parameter in _component_inputs(tmp_path):
        module, function = LIBRARY[component]
        signature = inspect.signature(getattr(importlib.import_module(module), function))
        given = signature.parameters.get(name)
        if given is None or given.default is inspect.Parameter.empty:
            continue
        want = getattr(schema.DEFAULTS, parameter)
        # None in the library is the pipeline's unset value, "" or 0 (e.g. target_sensitivity)
        same = given.default == want or (given.default is None and want in ("", 0)
                                          and not isinstance(want, bool))
        assert same != ((component, name) in LIBRARY_DIFFERENT), (component, name, want)
        checked.add((component, name))
    assert {("train", "epochs"), ("tune", "hyperband_factor"), ("tune", "fine_tune_trials"),
            *LIBRARY_DIFFERENT} <= checked
