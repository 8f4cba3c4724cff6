"""The hostile corpus of issue 34 for the entry points that use a model: predict, export,
evaluate, challenge, promote and train, each case run as the installed CLI in a subprocess under
a time limit and a memory watch (process group killed past 3 GiB).

``python -m tests.fuzz.hostile_entrypoints WORKDIR [NAME-SUBSTRING ...]`` prepares a 32 px
subset of ../shared's PneumoniaMNIST, trains a one-epoch SmallCNN, runs every case (or those
whose name contains a substring) and prints a row per case: OK or BAD with the reason (exit
code, stderr lines, traceback, staging left, peak RSS), then the count. The full-disk cases
mount a 300 KiB tmpfs (root only; skipped elsewhere). The regression tests for each row are
in tests/test_predict_bad_input.py, test_model_loader.py, test_promotion.py, test_resume.py,
test_disk_full.py and test_uris.py; this corpus is the measurement README.md quotes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fuzz import hostile

ROOT = Path(__file__).resolve().parents[2]
SHARED_NPZ = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"
KILL_RSS = 3 << 30
MAX_RSS_MB = 2048  # the bound at the default limits
Result = dict


def _tree_rss(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "--ppid", str(pid), "-p", str(pid)],
                         capture_output=True, text=True).stdout
    return sum(int(x) for x in out.split()) * 1024


def cli(*args: object, timeout: float = 60, signal_after: float | None = None) -> Result:
    """Run ``lungxray ARGS`` (this interpreter): exit code, seconds, peak RSS, stderr."""
    start = time.time()
    process = subprocess.Popen([sys.executable, "-m", "lungxray.cli", *map(str, args)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               start_new_session=True)
    peak, killed = 0, None
    while process.poll() is None:
        peak = max(peak, _tree_rss(process.pid))
        elapsed = time.time() - start
        if signal_after is not None and elapsed > signal_after and killed is None:
            os.killpg(process.pid, signal.SIGTERM)
            killed = "sigterm"
        if peak > KILL_RSS or elapsed > timeout:
            os.killpg(process.pid, signal.SIGKILL)
            killed = "memory" if peak > KILL_RSS else "timeout"
        time.sleep(0.1)
    _, err = process.communicate()
    return {"rc": process.returncode, "seconds": round(time.time() - start, 1),
            "rss_mb": peak >> 20, "killed": killed, "stderr": err.decode("utf-8", "replace")}


def judge(name: str, result: Result, expect_ok: bool = False,
          staging: tuple[Path, str] | None = None) -> bool:
    """Print the case's row; True when it behaved as issue 34 asks."""
    lines = [line for line in result["stderr"].splitlines() if line.strip()]
    problems = []
    if result["killed"] in ("memory", "timeout"):
        problems.append(result["killed"])
    if "Traceback" in result["stderr"]:
        problems.append("traceback")
    if expect_ok and result["rc"] != 0:
        problems.append(f"exit {result['rc']}")
    if not expect_ok and result["killed"] is None:
        if result["rc"] == 0:
            problems.append("accepted")
        if len(lines) != 1:
            problems.append(f"{len(lines)} stderr lines")
    if staging and list(staging[0].glob(staging[1])):
        problems.append("staging left")
    if result["rss_mb"] > MAX_RSS_MB:
        problems.append(f"{result['rss_mb']} MB")
    last = lines[-1][:140] if lines else ""
    print(f"{'BAD' if problems else 'OK '} {name:<32} rc={result['rc']:<4} "
          f"{result['seconds']:>5}s {result['rss_mb']:>5}MB {problems or ''} | {last}",
          flush=True)
    return not problems


def _pngs(folder: Path, n: int = 4, side: int = 40) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(np.full((side, side), i * 40 % 256, np.uint8)).save(folder / f"i{i}.png")
    return folder


def _model_copy(model: Path, where: Path, mutate: Callable[[Path], None]) -> Path:
    shutil.copytree(model, where)
    mutate(where)
    return where


def _to_dev_zero(folder: Path) -> None:
    (folder / "model.keras").unlink()
    os.symlink("/dev/zero", folder / "model.keras")


def _to_fifo(folder: Path) -> None:
    (folder / "model.keras").unlink()
    os.mkfifo(folder / "model.keras")


def _promoted(model: Path, data: Path, home: Path, run_id: str, out: Path) -> Path:
    cli("challenge", "--model", model, "--data", data, "--champion", home, "--run-id", run_id,
        "--output", out)
    cli("promote", "--model", model, "--decision", out / "decision.json", "--champion", home)
    return out / "decision.json"


def cases(model: Path, data: Path, d: Path) -> list[tuple[str, Callable[[], bool]]]:
    """(name, run) for every case; ``d`` is an empty scratch folder."""
    imgs = _pngs(d / "imgs")
    os.mkfifo(d / "fifo")
    (d / "a_file").write_text("x")
    npz = hostile.write_npz_stream(d / "big.npz", "images", hostile.npy_header(
        (2, 30000, 30000), "|u1"), 1 << 20, {})
    header_1e12 = hostile.write_npz(d / "h.npz", {
        "images": hostile.npy_header((10**12, 28, 28), "|u1")})
    dev_zero = _model_copy(model, d / "m_dev_zero", _to_dev_zero)
    fifo = _model_copy(model, d / "m_fifo", _to_fifo)
    truncated = _model_copy(model, d / "m_cut", lambda m: (m / "model.keras").write_bytes(
        (m / "model.keras").read_bytes()[:5000]))
    deep_info = _model_copy(model, d / "m_deep", lambda m: (m / "model_info.json").write_text(
        "[" * 100_000))
    odd = d / "odd"
    _pngs(odd)
    (odd / os.fsdecode(b"\xff\xfe.png")).write_bytes(hostile.small_png(9))
    (odd / os.fsdecode(b"bad\xff.png")).write_bytes(b"not a png")
    big = d / "big"
    big.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (6300, 6300), np.uint8)).save(
        big / "big.png")
    (d / "missing.csv").write_text("path\n" + "".join(f"gone/{i}.png\n"
                                                      for i in range(2_000_000)))
    many = _pngs(d / "many", n=8000, side=64)
    (d / "deep.json").write_text("[" * 200_000 + "]" * 200_000)
    os.symlink("/dev/zero", d / "decision_link")

    def predict(source: Path, *extra: object, **kw) -> Result:
        return cli("predict", "--model", kw.pop("model", model), "--source", source,
                   "--output", kw.pop("output", d / "out"), *extra, **kw)

    def edited_decision() -> bool:
        home = d / "champ_edit"
        _promoted(model, data, home, "r1", d / "c1")
        cli("challenge", "--model", model, "--data", data, "--champion", home, "--run-id", "r2",
            "--output", d / "c2")
        record = json.loads((d / "c2" / "decision.json").read_text())
        (d / "c2" / "decision.json").write_text(json.dumps({**record, "decision": "promote"}))
        return judge("promote_edited_decision", cli(
            "promote", "--model", model, "--decision", d / "c2" / "decision.json",
            "--champion", home))

    def other_model() -> bool:
        home = d / "champ_other"
        cli("challenge", "--model", model, "--data", data, "--champion", home, "--run-id", "r1",
            "--output", d / "c3")
        other = _model_copy(model, d / "m_other", lambda m: (m / "model_info.json").write_text(
            json.dumps({**json.loads((m / "model_info.json").read_text()),
                        "class_names": ["cat", "dog"]})))
        return judge("promote_other_model", cli("promote", "--model", other, "--decision",
                                                d / "c3" / "decision.json", "--champion", home))

    def champion_model_dev_zero() -> bool:
        home = d / "champ_zero"
        _promoted(model, data, home, "r1", d / "c4")
        _to_dev_zero(next(home.glob("history/r1/model")))
        return judge("challenge_champion_dev_zero", cli(
            "challenge", "--model", model, "--data", data, "--champion", home, "--run-id", "r2",
            "--output", d / "c5"))

    def challenge(champion: object, **kw) -> Result:
        args = {"model": model, "data": data, "champion": champion, "run-id": "r1",
                "output": d / "c6", **kw}
        return cli("challenge", *[x for k, v in args.items() for x in (f"--{k}", v)],
                   timeout=30)

    def train_rerun() -> bool:
        out = d / "t_kill"
        cli("train", "--data", data, "--model", "SmallCNN", "--output", out, "--epochs", "2",
            signal_after=8)
        ok = judge("train_rerun_other_epochs", cli(
            "train", "--data", data, "--model", "SmallCNN", "--output", out, "--epochs", "3",
            timeout=180), expect_ok=True)
        return ok and json.loads((out / "model_info.json").read_text())["epochs"] == 3

    def full_disk() -> bool | None:
        mount = d / "tiny"
        mount.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", mount],
                          capture_output=True).returncode:
            print("SKIP full disk: cannot mount a tmpfs here (not counted)")
            return None
        try:
            return all([
                judge("preprocess_full_disk", cli(
                    "preprocess", "--source", SHARED_NPZ, "--output", mount / "p",
                    "--image-size", "64"), staging=(mount, ".prepare-*")),
                judge("train_full_disk", cli("train", "--data", data, "--model", "VGG16",
                                             "--output", mount / "t", "--epochs", "1",
                                             timeout=180)),
                judge("export_full_disk", cli("export", "--model", model, "--output",
                                              mount / "e", timeout=120),
                      staging=(mount / "e", ".export-*"))])
        finally:
            subprocess.run(["umount", mount], check=False)

    def card_dev_zero() -> bool:
        cli("challenge", "--model", model, "--data", data, "--champion", d / "champ_card",
            "--run-id", "r1", "--output", d / "c7")
        return judge("promote_card_dev_zero", cli(
            "promote", "--model", model, "--decision", d / "c7" / "decision.json",
            "--champion", d / "champ_card", "--model-card", "/dev/zero"))

    return [
        ("predict_npz_30000", lambda: judge("predict_npz_30000", predict(npz))),
        ("predict_npz_header_1e12", lambda: judge("predict_npz_header_1e12",
                                                  predict(header_1e12))),
        ("predict_model_dev_zero", lambda: judge("predict_model_dev_zero",
                                                 predict(imgs, model=dev_zero))),
        ("export_model_dev_zero", lambda: judge("export_model_dev_zero", cli(
            "export", "--model", dev_zero, "--output", d / "e1"))),
        ("evaluate_model_dev_zero", lambda: judge("evaluate_model_dev_zero", cli(
            "evaluate", "--model", dev_zero, "--data", data, "--output", d / "ev"))),
        ("predict_model_fifo", lambda: judge("predict_model_fifo",
                                             predict(imgs, model=fifo, timeout=30))),
        ("export_model_fifo", lambda: judge("export_model_fifo", cli(
            "export", "--model", fifo, "--output", d / "e2", timeout=30))),
        ("predict_model_truncated", lambda: judge("predict_model_truncated",
                                                  predict(imgs, model=truncated))),
        ("export_info_deep_json", lambda: judge("export_info_deep_json", cli(
            "export", "--model", deep_info, "--output", d / "e3"))),
        ("challenge_champion_dev_zero", champion_model_dev_zero),
        ("predict_gradcam_6300", lambda: judge("predict_gradcam_6300", predict(
            big, "--gradcam", output=d / "o_big", timeout=120), expect_ok=True)),
        ("predict_non_utf8_skip", lambda: judge("predict_non_utf8_skip", predict(
            odd, "--skip-bad", output=d / "o_odd"), expect_ok=True)),
        ("predict_non_utf8", lambda: judge("predict_non_utf8", predict(odd, output=d / "o2"))),
        ("predict_csv_2m_missing", lambda: judge("predict_csv_2m_missing", predict(
            d / "missing.csv", timeout=60))),
        ("predict_sigterm", lambda: judge("predict_sigterm", predict(
            many, output=d / "o_term", signal_after=6), staging=(d / "o_term", ".predict-*"))),
        ("export_sigterm", lambda: judge("export_sigterm", cli(
            "export", "--model", model, "--output", d / "e_term", signal_after=6),
            staging=(d / "e_term", ".export-*"))),
        ("predict_source_fifo", lambda: judge("predict_source_fifo", predict(d / "fifo"))),
        ("predict_source_dev_zero", lambda: judge("predict_source_dev_zero",
                                                  predict(Path("/dev/zero")))),
        ("predict_output_is_file", lambda: judge("predict_output_is_file",
                                                 predict(imgs, output=d / "a_file"))),
        ("predict_output_in_source", lambda: judge("predict_output_in_source",
                                                   predict(imgs, output=imgs / "out"))),
        ("predict_batch_size_huge", lambda: judge("predict_batch_size_huge",
                                                  predict(imgs, "--batch-size", 10**8))),
        ("export_version_huge", lambda: judge("export_version_huge", cli(
            "export", "--model", model, "--output", d / "e4", "--version", 10**20))),
        ("promote_edited_decision", edited_decision),
        ("promote_other_model", other_model),
        ("promote_card_dev_zero", card_dev_zero),
        ("promote_decision_dev_zero", lambda: judge("promote_decision_dev_zero", cli(
            "promote", "--model", model, "--decision", d / "decision_link", "--champion",
            d / "champ_edit"))),
        ("promote_decision_deep", lambda: judge("promote_decision_deep", cli(
            "promote", "--model", model, "--decision", d / "deep.json", "--champion",
            d / "champ_edit"))),
        *[(f"challenge_champion_{i}", lambda uri=uri, i=i: judge(
            f"challenge_champion_{i}[{str(uri)[:16]}]", challenge(uri)))
          for i, uri in enumerate(["s3://bucket/x", "/dev/zero", "http://x/y", "gs://",
                                   data / "manifest.json", d / "fifo"])],
        ("challenge_margin_nan", lambda: judge("challenge_margin_nan", challenge(
            d / "champ_nan", margin="nan"))),
        ("challenge_data_fifo", lambda: judge("challenge_data_fifo", challenge(
            d / "champ_fifo", data=d / "fifo"))),
        ("challenge_run_id_climbs", lambda: judge("challenge_run_id_climbs", challenge(
            d / "champ_id", **{"run-id": "../x"}))),
        ("train_rerun_other_epochs", train_rerun),
        ("full_disk", full_disk),
    ]


def main(workdir: Path, only: list[str]) -> int:
    data, model = workdir / "data", workdir / "model"
    if not (model / "model_info.json").is_file():
        for args in (["preprocess", "--source", SHARED_NPZ, "--output", data, "--image-size",
                      "32", "--max-per-split", "64"],
                     ["train", "--data", data, "--model", "SmallCNN", "--output", model,
                      "--epochs", "1"]):
            subprocess.run([sys.executable, "-m", "lungxray.cli", *map(str, args)], check=True,
                           capture_output=True)
    scratch = workdir / "cases"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(parents=True)
    outcomes = [outcome for name, run in cases(model, data, scratch)
                if not only or any(part in name for part in only)
                for outcome in [run()] if outcome is not None]  # None: skipped here
    print(f"{sum(outcomes)} of {len(outcomes)} cases OK")
    return 0 if all(outcomes) else 1


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]).resolve(), sys.argv[2:]))
