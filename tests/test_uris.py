"""Issue 34: champion_uri, target_data and --champion are a local path or gs://, checked before
any step runs or any file is written; one validator (lungxray.uris) for the CLI and the
pipeline's parameter schema."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest

from lungxray import champion_store, cli, uris
from lungxray.errors import ConfigError
from pipelines.params import ParamsError, check_values
from tests.champion_helpers import decision, fake_model

HOSTILE = [
    ("s3://bucket/x", "the scheme 's3://' is not supported"),
    ("http://example.com/champion", "the scheme 'http://' is not supported"),
    ("file:///tmp/champion", "the scheme 'file://' is not supported"),
    ("GS://bucket/x", "the scheme 'GS://' is not supported"),
    ("../../etc", "climbs out of the working folder"),
    ("runs/../../x", "climbs out of the working folder"),
    ("/../etc", "climbs out of the root"),
    ("/dev/zero", "is a character device"),
    ("champion\x00.json", "holds a NUL byte at position 8"),
    ("line\nbreak", "holds a control character"),
    ("gs://", "no bucket name"),
    ("gs:///x", "no bucket name"),
    ("gs://Bad_Bucket/x", "is not a valid bucket name"),
    ("gs://bucket//x", "an object path has no empty, '.' or '..' parts"),
    ("gs://bucket/a/../b", "an object path has no empty, '.' or '..' parts"),
    ("\ud800", "cannot be encoded as a file name"),
]


@pytest.mark.parametrize("value, message", HOSTILE)
def test_hostile_locations_are_refused_in_one_line(value, message):
    with pytest.raises(ConfigError, match="^--champion .*" + message.replace("(", r"\(")) as err:
        uris.check_location(value, "--champion")
    assert "\n" not in str(err.value)


def test_special_files_and_odd_paths_are_refused(tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    data = tmp_path / "data.npz"
    data.write_bytes(b"x")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    to_zero = tmp_path / "zero"
    to_zero.symlink_to("/dev/zero")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock"))
        cases = {fifo: "is a FIFO", to_zero: "is a character device",
                 tmp_path / "sock": "is a socket", broken: "is a link to nothing",
                 data / "champion": "a part of the path is a file"}
        for path, message in cases.items():
            with pytest.raises(ConfigError, match=message):
                uris.check_location(str(path), "target_data")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        uris.check_location(str(data), "champion_uri", folder=True)
    with pytest.raises(ConfigError, match="does not exist"):
        uris.check_location(str(tmp_path / "missing"), "target_data", must_exist=True)


@pytest.mark.parametrize("value", ["champions/lx", "gs://my-bucket/lungxray/champion",
                                   "gs://my-bucket", "gs://my-bucket/x/", "runs/../champion",
                                   "/tmp/new-champion-folder", "./x"])
def test_usable_locations_pass(value):
    assert uris.check_location(value, "champion_uri", folder=True) == value


def test_apart_and_distinct(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for champion_uri, relation in ((data, "is"), (data / "champion", "is inside"),
                                   (tmp_path, "holds")):
        with pytest.raises(ConfigError, match=f"champion_uri .* {relation} the data_source"):
            uris.check_apart(str(champion_uri), str(data), "champion_uri", "the data_source")
    uris.check_apart(str(tmp_path / "champion"), str(data), "champion_uri", "the data_source")
    with pytest.raises(ConfigError, match="is inside"):
        uris.check_apart("gs://b-1/data/champion", "gs://b-1/data/", "champion_uri", "data")
    uris.check_apart("gs://b-1/champion", "gs://b-1/data", "champion_uri", "data")
    link = tmp_path / "link.npz"
    link.symlink_to(data)
    with pytest.raises(ConfigError, match="is the data_source itself"):
        uris.check_distinct(str(link), str(data), "target_data", "the data_source")
    uris.check_distinct(str(tmp_path / "site"), str(data), "target_data", "the data_source")


# --------------------------------------------------------------------------- pipeline


def _params_error(params: dict) -> str:
    started = time.monotonic()
    with pytest.raises(ParamsError) as err:
        check_values(params)
    assert time.monotonic() - started < 5
    assert "\n" not in str(err.value)
    return str(err.value)


@pytest.mark.parametrize("name", ["champion_uri", "target_data"])
@pytest.mark.parametrize("value, message", [
    ("s3://bucket/x", "scheme 's3://' is not supported"),
    ("../../etc", "climbs out"),
    ("/dev/zero", "character device"),
    ("a\x00b", "NUL byte"),
    ("gs:///x", "no bucket name"),
])
def test_the_pipeline_schema_refuses_them_before_any_step(name, value, message):
    assert message in _params_error({name: value})
    assert _params_error({name: value}).startswith(f"parameter {name} ")


def test_the_data_source_itself_is_neither_champion_nor_target(tmp_path):
    source = tmp_path / "data.npz"
    source.write_bytes(b"x")
    folder = tmp_path / "images"
    folder.mkdir()
    assert "is a file, not a folder" in _params_error({"data_source": str(source),
                                                       "champion_uri": str(source)})
    assert "is inside the data_source" in _params_error({"data_source": str(folder),
                                                         "champion_uri": str(folder / "c")})
    assert "is the data_source itself" in _params_error({"data_source": str(source),
                                                         "target_data": str(source)})
    check_values({"data_source": str(source), "champion_uri": str(tmp_path / "champion"),
                  "target_data": str(folder)})


def test_a_local_run_needs_a_target_that_exists(tmp_path):
    from lungxray import schema

    with pytest.raises(ConfigError, match="target_data .* does not exist"):
        schema.check_locations({"target_data": str(tmp_path / "site")}, local_run=True)
    schema.check_locations({"target_data": str(tmp_path / "site")})  # a pod may have it
    schema.check_locations({"target_data": "gs://bucket/site"}, local_run=True)


def test_make_local_refuses_a_bad_champion_before_compiling_a_run(capsys):
    from pipelines import local

    assert local.main(["--set", "champion_uri=s3://bucket/x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "scheme 's3://' is not supported" in err


# --------------------------------------------------------------------------- CLI


@pytest.mark.parametrize("command", ["challenge", "promote"])
@pytest.mark.parametrize("value, message", [
    ("s3://bucket/x", "scheme 's3://' is not supported"),
    ("/dev/zero", "is a character device"),
    ("../../etc", "climbs out"),
])
def test_the_cli_refuses_them_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys,
                                                             command, value, message):
    monkeypatch.chdir(tmp_path)
    model = fake_model(tmp_path / "model")
    args = {"challenge": ["--data", "data", "--run-id", "r1", "--output", "out"],
            "promote": ["--decision", "decision.json"]}[command]
    assert cli.main([command, "--model", str(model), "--champion", value, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lungxray {command}: error: --champion ") and message in err
    assert err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no ./s3:/, no out/


def test_the_cli_keeps_the_champion_out_of_the_model_and_the_data(tmp_path, capsys):
    model = fake_model(tmp_path / "model")
    (tmp_path / "decision.json").write_text("{}")
    assert cli.main(["promote", "--model", str(model), "--champion", str(model / "champion"),
                     "--decision", str(tmp_path / "decision.json")]) == 2
    assert "--champion" in capsys.readouterr().err and not (model / "champion").exists()
    assert cli.main(["challenge", "--model", str(model), "--data", str(tmp_path),
                     "--champion", str(tmp_path / "c"), "--run-id", "r1",
                     "--output", str(tmp_path / "out")]) == 2
    assert "is inside --data" in capsys.readouterr().err


def test_a_valid_champion_still_promotes_through_the_cli(tmp_path, capsys):
    import json

    model = fake_model(tmp_path / "model")
    home = tmp_path / "champion"
    (tmp_path / "decision.json").write_text(json.dumps(decision(model, home, "r1")))
    assert cli.main(["promote", "--model", str(model), "--champion", str(home),
                     "--decision", str(tmp_path / "decision.json")]) == 0
    assert json.loads(capsys.readouterr().out)["history_entry"] == str(home / "history" / "r1")
    assert Path(champion_store.read_champion(home)) == home / "history" / "r1" / "model"
