"""How `make local` / `python -m pipelines.local` put the run's parameters together:
defaults < profile < PARAMS file < DATA/WEIGHTS/MODELS (only when given) and --set."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from pipelines.local import cli_params, main
from pipelines.profiles import PROFILES

REPO = Path(__file__).resolve().parents[2]


def test_params_file_then_set_override_the_profile(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("data_source: /data/xrays\nweights: none\ntarget_sensitivity: 9e-1\n")
    params = cli_params("full", params_file, [])
    assert params["epochs"] == PROFILES["full"]["epochs"]
    assert params["data_source"] == "/data/xrays" and params["weights"] == "none"
    assert params["target_sensitivity"] == pytest.approx(0.9)  # 9e-1 is a number, not text
    params = cli_params("full", params_file, ["weights=imagenet", "target_sensitivity=1e-1",
                                              "base_models=[VGG16, MobileNetV2]"])
    assert params["weights"] == "imagenet" and params["data_source"] == "/data/xrays"
    assert params["target_sensitivity"] == pytest.approx(0.1)
    assert params["base_models"] == ["VGG16", "MobileNetV2"]
    params_file.write_text("")  # an empty file sets nothing
    assert cli_params("quick", params_file, []) == cli_params("quick", None, [])


def test_bad_params_exit_with_a_message(tmp_path, capsys):
    params_file = tmp_path / "params.yaml"
    params_file.write_text("- just\n- a list\n")
    assert main(["--params", str(params_file)]) == 2
    assert "must hold a mapping" in capsys.readouterr().err
    assert main(["--set", "epochs"]) == 2
    assert "--set expects name=value, got 'epochs'" in capsys.readouterr().err
    assert main(["--set", "epoch=3"]) == 2
    assert "unknown pipeline parameter(s) 'epoch'; known: " in capsys.readouterr().err
    # Checked as submit checks them, before kfp.local starts anything.
    for item, message in [
        ("base_models=VGG16", "'base_models' must be a list (LIST), got str 'VGG16' (write a "
                              "list: [VGG16])"),
        ("base_models=[VGG16", "base_models='[VGG16' is not valid YAML"),
        ("epochs=2.5", "'epochs' must be an integer"),
        ("select_metric=test_roc_auc", "never select on the test split"),
        ("select_metric=val_auc", "'auc' is not one of"),
        ("target_sensitivity=1.5", "target_sensitivity must be between 0.0 and 1.0, got 1.5"),
        ("epochs=-5", "parameter epochs must be between 1 and 10000, got -5"),
        ("batch_size=0", "parameter batch_size must be between 1 and 65536, got 0"),
        ("image_size=100000", "parameter image_size must be between 8 and 1024"),
        ("seed=-1", "parameter seed must be between 0 and 4294967295, got -1"),
        ("base_models=[VGG16, VGG61]", "unknown model 'VGG61'"),
        ("base_models=[]", "parameter base_models must be between 1 and 100 items, got 0"),
        ("tune_algorithm=grid", "parameter tune_algorithm must be one of hyperband"),
    ]:
        assert main(["--set", item, "--pipeline-root", str(tmp_path / "runs")]) == 2, item
        assert message in capsys.readouterr().err, item
    assert not (tmp_path / "runs").exists()


def test_a_failed_step_ends_in_one_line(tmp_path, capsys):
    code = main(["--set", f"data_source={tmp_path / 'missing.npz'}", "--pipeline-root",
                 str(tmp_path / "runs")])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("pipelines.local: error: Pipeline 'lungxray' finished with status "
                          "FAILURE. Inner task failed: 'preprocess'")
    assert "\x1b[" not in err


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize(("variables", "expected", "absent"), [
    ([], [], ["data_source=", "weights="]),  # a PARAMS file or the profile decides
    (["DATA=x.npz", "WEIGHTS=none", "PARAMS=p.yaml"],
     ["--set 'data_source=x.npz'", "--set 'weights=none'", "--params p.yaml"], []),
])
def test_make_local_passes_only_what_was_given(variables, expected, absent):
    # -n prints the recipe without running it; the venv stamp is taken as up to date.
    command = subprocess.run(["make", "-n", "-o", ".venv/.installed", "local", *variables],
                             cwd=REPO, capture_output=True, text=True, check=True).stdout
    recipe = command.replace("\\\n", " ")  # one command over continued lines
    line = next(x for x in recipe.splitlines() if "pipelines.local" in x)
    for text in expected:
        assert text in line
    for text in absent:
        assert text not in line
