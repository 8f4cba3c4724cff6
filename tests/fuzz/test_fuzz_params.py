"""Property-based fuzzing of the parameter files and the JSON files we read back (issue 26,
part B): whatever comes in, a reader returns or raises the project's one-line error, within a
time bound, and the checks accept exactly what the schema allows."""

from __future__ import annotations

import json
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lungxray import champion_store, safeio, schema, uris
from lungxray.errors import LungxrayError
from lungxray.hparams import DEFAULT_HPARAMS, merge_hparams, read_best_hparams
from lungxray.limits import Limits
from pipelines.params import ParamsError, check_values, load_params, parse_value

SMALL = Limits(max_json_bytes=20_000, max_json_depth=8, max_model_config_bytes=20_000,
               max_model_folder_bytes=100_000)
SECONDS = 5.0

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=30)

yaml_tokens = st.sampled_from(["a", ": ", "- ", "[", "]", "{", "}", ", ", "&x ", "*x", "\n",
                               "  ", "!!str ", "!!python/object:os.system ", "'", '"', "1e-3",
                               "epochs", "base_models", "VGG16", ".nan", "-5", "<<: ", "?",
                               "%YAML 1.1\n", "---\n", "|\n", "9" * 30, "\t", "\x00", "é"])


def _assert_project_error(err: BaseException) -> None:
    assert isinstance(err, LungxrayError), repr(err)
    text = str(err)
    assert "\n" not in text and len(text) < 2000, text[:300]


def _load_text(text: str, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"params{suffix}"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        started = time.monotonic()
        try:
            params = load_params(path)
            assert isinstance(params, dict)
            check_values(params)
        except ParamsError as err:
            _assert_project_error(err)
        assert time.monotonic() - started < SECONDS


@given(st.lists(yaml_tokens, max_size=60).map("".join))
def test_yaml_token_soup_is_read_or_refused_in_one_line(text):
    _load_text(text, ".yaml")


@given(st.text(max_size=300))
def test_any_text_params_file_is_read_or_refused(text):
    _load_text(text.replace("\ud800", ""), ".yaml")
    _load_text(text.replace("\ud800", ""), ".json")


@given(st.dictionaries(st.sampled_from(sorted(schema.FIELDS)), json_values, max_size=6))
def test_any_parameter_values_pass_the_schema_or_are_refused(params):
    try:
        schema.check_pipeline_params(params)
        check_values(params)
    except LungxrayError as err:
        _assert_project_error(err)
        return
    # Accepted: every value has the schema's type (bool is never an int here).
    for name, value in params.items():
        assert schema._type_ok(value, schema._HINTS[name]), (name, value)


@given(st.text(max_size=60))
def test_any_set_value_parses_or_is_refused(text):
    try:
        parse_value(text, "epochs")
    except ParamsError as err:
        _assert_project_error(err)


@given(st.binary(max_size=400) | json_values.map(lambda v: json.dumps(v).encode()))
def test_any_json_bytes_are_read_within_limits_or_refused(content):
    try:
        value = safeio.loads_json(content, "metrics.json", SMALL)
    except LungxrayError as err:
        _assert_project_error(err)
        return
    assert safeio.depth(value) <= SMALL.max_json_depth


@given(json_values)
def test_any_hparams_file_is_usable_or_refused(content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "best_hparams.json"
        path.write_text(json.dumps(content))
        try:
            hparams = read_best_hparams(path, "VGG16")
        except LungxrayError as err:
            _assert_project_error(err)
            return
        merged = merge_hparams(hparams)
        assert set(merged) == set(DEFAULT_HPARAMS)


@given(st.dictionaries(st.sampled_from(["config.json", "metadata.json", "model.weights.h5",
                                        "x"]),
                       st.binary(max_size=300) | json_values.map(
                           lambda v: json.dumps(v).encode()), max_size=3),
       st.booleans())
@example(members={"config.json": b"\x00\x00\x00\x00\x01\x02\x00\x00\x00\x00\x00\x03\x00\x00"
                                 b"\x02\x00\x04\x00\x05\x06&\x00\x00\x08\x00\x00\x0b&\x00\x00"
                                 b"\x01\x00\x00\x0e\x00\x00\x12\x01\x02\x16\x1a"},
         corrupt=True)  # found by fuzzing: zlib.error escaped as a traceback
def test_any_keras_archive_is_checked_or_refused(members, corrupt):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, body in members.items():
                archive.writestr(name, body)
        if corrupt:
            raw = bytearray(path.read_bytes())
            raw[len(raw) // 2] ^= 0xFF
            path.write_bytes(bytes(raw))
        try:
            safeio.check_keras_archive(path, SMALL)
        except LungxrayError as err:
            _assert_project_error(err)


@pytest.mark.parametrize("depth", [1, 8, 9, 1000, 100_000])
def test_depth_limit_edges(depth):
    text = "[" * depth + "]" * depth
    if depth <= SMALL.max_json_depth:
        assert safeio.depth(safeio.loads_json(text, "x", SMALL)) == depth
    else:
        with pytest.raises(LungxrayError, match="nested|more than the limit of 20000"):
            safeio.loads_json(text, "x", SMALL)


location_tokens = st.sampled_from(["gs://", "s3://", "http://", "GS://", "file:", "/", "//",
                                   "..", ".", "a", "b-1", "my-bucket", "\x00", "\n", ":", "dev",
                                   "zero", "null", "é", "\udcff", "\ud800", "~", " ", "_B"])


@given(st.lists(location_tokens, max_size=12).map("".join) | st.text(max_size=40))
@example(text="gs://my-bucket/a/../b")
@example(text="/dev/null")
def test_any_location_is_a_path_or_gs_uri_or_refused_in_one_line(text):
    """Issue 34: whatever is given as champion_uri / --champion, the check returns it or gives
    the project's one-line error, quickly; what it accepts is a gs:// URI without '.'/'..'
    parts or a local path without a scheme, control characters or a climb out."""
    started = time.monotonic()
    try:
        value = champion_store.check_uri(text, "champion_uri")
    except LungxrayError as err:
        _assert_project_error(err)
        return
    finally:
        assert time.monotonic() - started < SECONDS
    assert value == text and not any(ord(c) < 32 for c in text)
    if uris.is_gcs(text):
        uris.parse_gcs(text)
        assert ".." not in text.split("/")[3:]
    else:
        assert "://" not in text and not uris._climbs_out(text)
