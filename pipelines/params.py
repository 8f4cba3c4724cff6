"""Runtime parameters of a compiled pipeline: load them from a file and check them against the spec.

KFP itself only rejects a wrong parameter after the run exists (or, for a recurring run, at the
first trigger at night). Checking names and types against the compiled package first turns that
into an immediate, one-line error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from lungxray import safeio, schema
from lungxray.errors import ConfigError, quote, quote_repr
from lungxray.limits import DEFAULT as LIMITS


class ParamsError(ConfigError):
    """A parameter file, a parameter or the pipeline package is not usable; message is one line."""


class _Loader(safeio.SafeLoader):
    """Bounded SafeLoader (no aliases, limited depth) that also reads `1e-3` as a float.

    PyYAML follows YAML 1.1, where a float needs a dot (`1.0e-3`); `lr: 1e-3` would otherwise
    arrive as the string "1e-3" and fail the NUMBER_DOUBLE check for no good reason.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_value(text: str, name: str = "value") -> Any:
    """One parameter value given as text (``--set name=value``): 5 is an int, 1e-3 a float,
    [a, b] a list, as in a PARAMS file."""
    try:
        return safeio.loads_yaml(text, f"{name}={quote(text, 60)}", LIMITS, _Loader)
    except ConfigError as exc:
        raise ParamsError(str(exc)) from None


def apply_sets(params: Mapping[str, Any], sets: list[str]) -> dict[str, Any]:
    """``params`` with each ``--set name=value`` applied, the value parsed like a PARAMS
    file's (a later one wins)."""
    merged = dict(params)
    for item in sets:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ParamsError(f"--set expects name=value, got {quote(item)}")
        merged[name] = parse_value(value, name)
    return merged


def load_params(path: str | Path) -> dict[str, Any]:
    """Read pipeline arguments from a YAML or JSON file holding one mapping (empty file = none)."""
    path = Path(path)
    what = f"PARAMS file {quote(str(path))}"
    if str(path) == os.devnull:
        return {}  # PARAMS=/dev/null: no parameters (other devices and FIFOs are refused)
    try:
        # Sized before reading; aliases and deep nesting refused before anything is built.
        content = safeio.read_bounded(path, "PARAMS file", LIMITS.max_json_bytes, ParamsError)
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ParamsError(f"{what} is not UTF-8 text (byte {exc.start})") from None
        data = (safeio.loads_json(text, what, LIMITS, ParamsError, "YAML/JSON")
                if path.suffix == ".json"
                else safeio.loads_yaml(text, what, LIMITS, _Loader, "YAML/JSON"))
    except ConfigError as exc:
        raise ParamsError(str(exc)) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ParamsError(
            f"{what} must hold a mapping of parameter names to values, "
            f"not a {_type_name(data)}"
        )
    bad_keys = [k for k in data if not isinstance(k, str)]
    if bad_keys:
        raise ParamsError(f"{what}: parameter names must be strings, got "
                          f"{quote_repr(bad_keys, 80)}")
    return data


def read_pipeline_spec(package_path: str | Path) -> dict[str, Any]:
    """Return the PipelineSpec (first YAML document) of a compiled pipeline package."""
    path = Path(package_path)
    if path.suffix not in (".yaml", ".yml"):
        raise ParamsError(f"pipeline package {path} must be a compiled .yaml file")
    try:
        with path.open(encoding="utf-8") as fh:
            # The second document, if any, is the platform (Kubernetes) spec.
            spec = next(yaml.safe_load_all(fh), None)
    except FileNotFoundError:
        raise ParamsError(f"pipeline package {path} does not exist; run `make compile`") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"pipeline package {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict) or "root" not in spec or "pipelineInfo" not in spec:
        raise ParamsError(f"{path} is not a compiled KFP pipeline (no root/pipelineInfo)")
    return spec


def declared_parameters(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Root inputs of the pipeline: name -> {parameterType, defaultValue?, isOptional?}."""
    return dict(spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {}) or {})


def _type_name(value: Any) -> str:
    return type(value).__name__


def _is_number(value: Any) -> bool:
    # bool is a subclass of int in Python; a YAML `true` is never a number here.
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_value(name: str, ptype: str, value: Any) -> None:
    """Raise ParamsError if value does not fit the KFP parameterType."""
    expected = {
        "STRING": ("a string", lambda v: isinstance(v, str)),
        "NUMBER_INTEGER": ("an integer", lambda v: isinstance(v, int) and not isinstance(v, bool)),
        "NUMBER_DOUBLE": ("a number", _is_number),
        "BOOLEAN": ("true or false", lambda v: isinstance(v, bool)),
        "LIST": ("a list", lambda v: isinstance(v, list)),
        "STRUCT": ("a mapping", lambda v: isinstance(v, dict)),
    }
    if ptype not in expected:
        raise ParamsError(f"parameter {name!r} has type {ptype} that this tool does not know")
    what, ok = expected[ptype]
    if not ok(value):
        hint = ""
        if ptype == "STRING" and not isinstance(value, str):
            hint = " (quote it in YAML)"
        elif ptype == "LIST" and isinstance(value, str):
            hint = f" (write a list: [{quote(value, 60)[1:-1]}])"
        raise ParamsError(
            f"parameter {name!r} must be {what} ({ptype}), got {_type_name(value)} "
            f"{quote_repr(value, 80)}{hint}"
        )
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamsError(f"parameter {name!r} must be a finite number, got {value!r}")
    try:
        # LIST/STRUCT travel as JSON: no dates, sets or NaN inside.
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ParamsError(f"parameter {name!r} is not JSON-serialisable: "
                          f"{quote(str(exc), 80)}") from None


def validate_params(spec: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """Check names, types and required parameters against the spec; return the params as a dict."""
    declared = declared_parameters(spec)
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise ParamsError(
            f"unknown pipeline parameter(s) {', '.join(quote(n, 60) for n in unknown[:10])}"
            f"{f' and {len(unknown) - 10} more' if len(unknown) > 10 else ''}; "
            f"the pipeline takes: {', '.join(sorted(declared)) or 'none'}"
        )
    for name, value in params.items():
        _check_value(name, declared[name].get("parameterType", ""), value)
    missing = sorted(
        name
        for name, decl in declared.items()
        if name not in params and not decl.get("isOptional") and "defaultValue" not in decl
    )
    if missing:
        raise ParamsError(f"missing required pipeline parameter(s): {', '.join(missing)}")
    check_values(params)
    return dict(params)


def check_values(params: Mapping[str, Any]) -> None:
    """Values the steps would refuse only hours into a run (compare runs last), refused now:
    types and ranges against the one schema (lungxray.schema), base_models against the model
    registry, the selection metric and the target sensitivity."""
    try:
        schema.check_pipeline_params(params)
    except ConfigError as exc:
        raise ParamsError(str(exc)) from None
    if "select_metric" in params:
        from lungxray.selection import check_select_metric

        try:
            check_select_metric(params["select_metric"])
        except ValueError as exc:
            raise ParamsError(str(exc)) from None
    target = params.get("target_sensitivity", 0.0)
    if _is_number(target) and not 0.0 <= target <= 1.0:
        raise ParamsError(f"parameter 'target_sensitivity' must be in [0, 1] (0 = Youden's J), "
                          f"got {target!r}")


def executor_images(spec: Mapping[str, Any]) -> set[str]:
    """Container images of all executors in the compiled pipeline."""
    executors = spec.get("deploymentSpec", {}).get("executors", {}) or {}
    return {
        ex["container"]["image"]
        for ex in executors.values()
        if isinstance(ex, dict) and "image" in ex.get("container", {})
    }


def _repository(image: str) -> str:
    """Image reference without tag or digest: `host:5001/a/b:tag@sha256:x` -> `host:5001/a/b`."""
    name = image.split("@", 1)[0]
    slash = name.rfind("/")
    colon = name.rfind(":")
    return name[:colon] if colon > slash else name


def check_image(spec: Mapping[str, Any], expected: str) -> None:
    """Fail if the package was compiled for another tag of the expected image.

    KFP caches steps on the image string, and a stale build/pipeline.yaml would silently run
    (or reuse cached results of) an older image than the one just built and pushed.
    """
    images = executor_images(spec)
    stale = sorted(i for i in images if _repository(i) == _repository(expected) and i != expected)
    if stale or expected not in images:
        found = ", ".join(sorted(images)) or "no container images"
        raise ParamsError(
            f"pipeline package was compiled for {found}, not {expected}; run `make compile`"
        )
