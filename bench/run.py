"""`make bench`: measure speed and accuracy side by side on this machine.

Writes bench/results.json and bench/RESULTS.md. Each section records its settings; the machine
is recorded once at the top. Sections: preprocess, tuning (cached features vs naive), input
pipeline, training throughput per model, `make local` end to end (wall time, peak RSS) and the
accuracy of every model and of the pipeline's pick on validation and on the carved test split.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lungxray import artifacts
from pipelines.profiles import PROFILES

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "pneumoniamnist_28_trainval.npz"
# MedMNIST v2 (Yang et al., Scientific Data 2023), PneumoniaMNIST official test split.
PUBLISHED = [
    {"method": "ResNet-18 (28)", "accuracy": 0.854, "roc_auc": 0.944},
    {"method": "ResNet-50 (224)", "accuracy": 0.884, "roc_auc": 0.962},
    {"method": "auto-sklearn", "accuracy": 0.855, "roc_auc": 0.942},
    {"method": "AutoKeras", "accuracy": 0.878, "roc_auc": 0.947},
    {"method": "Google AutoML Vision", "accuracy": 0.946, "roc_auc": 0.991},
]

# Class counts of that official test split (MedMNIST v2): it holds more normal images (37.5%) than
# train/val (26%), one part of its shift that the carved test split can be re-weighted to.
OFFICIAL_TEST_COUNTS = {"normal": 234, "pneumonia": 390}


def machine() -> dict:
    """What produced the numbers."""
    import tensorflow as tf

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "tensorflow": tf.__version__, "gpus": len(tf.config.list_physical_devices("GPU")),
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_local(profile: str, data: Path, weights: str, pipeline_root: Path,
              sites: str = "") -> dict:
    """`make local` as a user runs it (``sites``: its SITES, more sites beside ``data``): wall
    time and peak RSS of its largest process (each run in its own wrapper process, so one
    run's peak never leaks into the next one's)."""
    command = ["make", "-C", str(ROOT), "local", f"PROFILE={profile}", f"DATA={data}",
               f"WEIGHTS={weights}", f"PIPELINE_ROOT={pipeline_root}", f"SITES={sites}"]
    wrapper = ("import resource, subprocess, sys\n"
               "subprocess.run(sys.argv[1:], check=True)\n"
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    started = time.time()
    start_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(started))
    done = subprocess.run([sys.executable, "-c", wrapper, *command], check=True,
                          stdout=subprocess.PIPE, text=True)
    wall = time.time() - started
    sys.stdout.write(done.stdout)
    peak_kib = int(done.stdout.strip().splitlines()[-1])
    runs = sorted(pipeline_root.glob("lungxray-*"), key=lambda p: p.stat().st_mtime)
    return {"profile": profile, "weights": weights, "data": os.path.relpath(data, ROOT),
            "sites": sites, "params": PROFILES[profile], "started": start_utc,
            "wall_seconds": round(wall, 1),
            "peak_rss_mib": round(peak_kib / 1024),
            "run_dir": str(runs[-1])}


def official_mix_accuracy(metrics: dict) -> float | None:
    """Accuracy at the split's threshold if its classes came in the official test split's
    proportions: sensitivity and specificity weighted by those counts (label shift only)."""
    names = metrics.get("class_names")
    if names != list(OFFICIAL_TEST_COUNTS) or metrics.get("sensitivity") is None:
        return None
    normal, pneumonia = OFFICIAL_TEST_COUNTS["normal"], OFFICIAL_TEST_COUNTS["pneumonia"]
    return (pneumonia * metrics["sensitivity"] + normal * metrics["specificity"]) / (
        normal + pneumonia)


def _split_row(metrics: dict) -> dict:
    ci = metrics.get("ci", {}).get("roc_auc")
    return {"acc_at_0.5": metrics.get("accuracy_at_0.5"), "acc": metrics["accuracy"],
            "acc_official_mix": official_mix_accuracy(metrics),
            "auc": metrics["roc_auc"], "auc_ci": ci, "n": metrics["n"],
            "robust_auc": metrics.get("robust_auc"),
            "worst_corrupted_auc": metrics.get("worst_corrupted_auc"),
            "worst_corruption": (metrics.get("robustness") or {}).get("worst_corruption")}


# The random carved test and the shift proxy; both recorded, neither used to choose anything.
EVAL_SPLITS = ("val", "test", "test_shifted")


def accuracy(run_dir: Path, workdir: Path) -> dict:
    """Per model and for the pipeline's pick (an ensemble included): ACC at 0.5, ACC at the
    validation threshold and ROC AUC (95% bootstrap CI) on val, the carved test split and the
    shift proxy ``test_shifted``, with the AUC under the corruption suite. The pick is
    re-evaluated from ``compare/best_model`` exactly as a user would."""
    from lungxray import evaluate

    rows, suite = [], None
    for iteration in sorted(run_dir.glob("for-loop-*-iteration-*")):
        info = json.loads((iteration / "train" / "model" / artifacts.INFO_FILE).read_text())
        evaluation = iteration / "evaluate" / "evaluation"
        measured = {split: json.loads(path.read_text()) for split in EVAL_SPLITS
                    if (path := evaluation / split / artifacts.METRICS_FILE).is_file()}
        suite = suite or measured["val"].get("robustness")
        splits = {split: _split_row(m) for split, m in measured.items()}
        rows.append({"model": info["model_name"], "threshold": info["threshold"],
                     "epochs": info.get("epochs"), "train_seconds": info.get("train_seconds"),
                     **splits})
    best_dir = run_dir / "compare" / "best_model"
    best = json.loads((best_dir / artifacts.INFO_FILE).read_text())
    dataset = run_dir / "preprocess" / "dataset"
    splits = [s for s in evaluate.dataset_splits(dataset) if s in EVAL_SPLITS]
    # The corruption suite as the run's evaluate steps ran it, so the pick's numbers match.
    options = evaluate.EvalOptions(robustness=suite is not None,
                                   robustness_samples=(suite or {}).get("samples", 0),
                                   seed=(suite or {}).get("seed", 0))
    picked = evaluate.evaluate(best_dir, str(dataset), workdir / "pick", splits, explain=False,
                               options=options)
    pick = {"model": best["model_name"], "threshold": best["threshold"],
            **{split: _split_row(picked[split]) for split in splits}}
    result = {"models": rows, "pick": pick, "published_test": PUBLISHED}
    shipped_dir = run_dir / "refit" / "model"
    if (shipped_dir / artifacts.INFO_FILE).is_file():
        # The shipped model (the pick refit on train + test_shifted), on what it never saw.
        info = json.loads((shipped_dir / artifacts.INFO_FILE).read_text())
        unseen = [s for s in splits if s not in artifacts.trained_splits(info)]
        scored = evaluate.evaluate(shipped_dir, str(dataset), workdir / "shipped", unseen,
                                   explain=False, options=options)
        refit = bool((info.get("refit") or {}).get("refit"))
        result["shipped"] = {"model": f"{info['model_name']} ({'refit' if refit else 'as picked'})",
                             "threshold": info["threshold"],
                             **{split: _split_row(scored[split]) for split in unseen}}
    return result


def _fmt(value, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _auc(split: dict) -> str:
    ci = split.get("auc_ci")
    return _fmt(split["auc"]) + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


def _rows(section: dict) -> list[dict]:
    """Every model, the pick as measured, and the model shipped (when the run refit it)."""
    rows = [*section["models"], {**section["pick"],
                                 "model": f"**pick: {section['pick']['model']}**"}]
    if "shipped" in section:
        rows.append({**section["shipped"], "model": f"**shipped: {section['shipped']['model']}**"})
    return rows


def accuracy_markdown(section: dict) -> list[str]:
    """One table: every model, the pick, then the published official-test numbers."""
    lines = ["| model | val ACC@0.5 | val ACC@thr | val AUC [95% CI] | test ACC@0.5 | "
             "test ACC@thr | test ACC@thr, official mix | test AUC [95% CI] | threshold |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    pick = section["pick"]
    for row in _rows(section):
        v, t = row["val"], row["test"]
        lines.append(f"| {row['model']} | {_fmt(v['acc_at_0.5'])} | {_fmt(v['acc'])} | "
                     f"{_auc(v)} | {_fmt(t['acc_at_0.5'])} | {_fmt(t['acc'])} | "
                     f"{_fmt(t.get('acc_official_mix'))} | {_auc(t)} | "
                     f"{_fmt(row['threshold'])} |")
    for ref in section["published_test"]:
        lines.append(f"| published: {ref['method']} (official test) | | | | "
                     f"{ref['accuracy']:.3f} | | | {ref['roc_auc']:.3f} | |")
    n_val, n_test = pick["val"]["n"], pick["test"]["n"]
    counts = OFFICIAL_TEST_COUNTS
    return lines + ["", f"val n={n_val} (selection and threshold happen here); carved test "
                        f"n={n_test} (stratified, seeded, carved from train; never used to choose "
                        "anything). The published rows are on the official test split (n=624), "
                        "which is shifted from train/val and not available here. *Official mix*: "
                        "the carved test's sensitivity and specificity weighted to that split's "
                        f"{counts['normal']} normal / {counts['pneumonia']} pneumonia images: "
                        "its class balance, not its other differences."]


def shift_markdown(section: dict) -> list[str]:
    """The shift evidence: clean vs corrupted AUC on val, and the random carved test vs the
    shift proxy. Selection used val only; the two test columns are never used to choose."""
    lines = ["| model | val AUC | val AUC, mean corrupted | val AUC, worst corruption | "
             "test AUC | test_shifted AUC | test_shifted ACC@thr |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    pick = section["pick"]
    empty: dict = {}
    for row in _rows(section):
        v, t, s = row["val"], row.get("test", empty), row.get("test_shifted", empty)
        worst = _fmt(v.get("worst_corrupted_auc"))
        if v.get("worst_corruption"):
            worst += f" ({v['worst_corruption']})"
        lines.append(f"| {row['model']} | {_fmt(v['auc'])} | {_fmt(v.get('robust_auc'))} | "
                     f"{worst} | {_fmt(t.get('auc'))} | {_fmt(s.get('auc'))} | "
                     f"{_fmt(s.get('acc'))} |")
    shifted = pick.get("test_shifted", empty).get("n")
    return lines + ["", "Mean corrupted: the mean ROC AUC over the corruption suite (11 "
                        "acquisition shifts x 3 severities, `lungxray.robustness`) on a seeded "
                        "stratified subset of val. test_shifted "
                        f"(n={shifted if shifted else '—'}): whole k-means clusters of image "
                        "statistics held out of train (`lungxray.shift`), the development "
                        "proxy for another site's images."]


def markdown(results: dict) -> str:
    """RESULTS.md from results.json: a table per section, settings beside each."""
    m = results["machine"]
    lines = ["# Benchmarks", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, {m['gpus']} GPU(s); Python "
             f"{m['python']}, TensorFlow {m['tensorflow']}; {m['date']}. "
             "Produced by `make bench` (bench/run.py); raw numbers in results.json. Machine and "
             "date are those of the latest invocation; each `make local` section has its own "
             "start.",
             ""]
    if "preprocess" in results:
        p = results["preprocess"]
        lines += ["## Preprocess", "",
                  f"`lungxray preprocess` of {p['images']} generated PNGs: "
                  f"**{p['images_per_s']} images/s** ({p['seconds']} s). Settings: "
                  f"`{json.dumps(p['settings'])}`.",
                  ""]
    if "tuning" in results:
        from bench.tuning_bench import markdown as tuning_markdown

        lines += ["## Tuning: cached features vs naive keras-tuner loop", "",
                  tuning_markdown(results["tuning"]), ""]
    if "input_pipeline" in results:
        i = results["input_pipeline"]
        lines += ["## Input pipeline", "",
                  f"{i['model']} at {i['image_size']} px, batch {i['batch_size']}, "
                  f"{i['steps']} steps, tracing excluded.", "",
                  "| delivered images/s (tf.data alone) | consumed images/s (train step) | "
                  "share of step time waiting for input |", "|---:|---:|---:|",
                  f"| {i['delivered_images_per_s']} | {i['consumed_images_per_s']} | "
                  f"{i['input_wait_share']:.1%} |", ""]
    if "train_throughput" in results:
        lines += ["## Training throughput (whole network trainable, tracing excluded)", "",
                  "| model | prepared px | model input px | batch | images/s |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['model']} | {r['image_size']} | {r['input_size']} | "
                  f"{r['batch_size']} | {r['images_per_s']} |"
                  for r in results["train_throughput"]]
        lines.append("")
    for profile, run in results.get("make_local", {}).items():
        sites = f" SITES={run['sites']}" if run.get("sites") else ""
        lines += [f"## `make local PROFILE={profile} WEIGHTS={run['weights']}{sites}`", "",
                  f"Started {run.get('started', '?')}. "
                  f"Wall time **{run['wall_seconds'] / 60:.1f} min** ({run['wall_seconds']} s), "
                  f"peak RSS of the largest process **{run['peak_rss_mib']} MiB**. "
                  f"Data: `{run['data']}`. "
                  f"Profile parameters: `{json.dumps(run['params'])}`.", ""]
        if profile in results.get("accuracy", {}):
            lines += accuracy_markdown(results["accuracy"][profile]) + [""]
            lines += ["Off the training distribution:", "",
                      *shift_markdown(results["accuracy"][profile]), ""]
    return "\n".join(lines)


SECTIONS = ("preprocess", "tuning", "input", "training", "local")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="PneumoniaMNIST .npz")
    parser.add_argument("--only", nargs="+", default=list(SECTIONS), choices=SECTIONS,
                        metavar="SECTION",
                        help=f"sections to run (default all: {' '.join(SECTIONS)})")
    parser.add_argument("--profiles", nargs="+", default=["quick", "full"],
                        choices=["quick", "full"],
                        help="profiles of the `make local` runs (default quick full)")
    parser.add_argument("--weights", default="none", help="weights of the `make local` runs")
    parser.add_argument("--sites", default="", metavar="NAME=SOURCE,...",
                        help="more sites in the `make local` runs (make local's SITES), e.g. "
                        "nih=../shared/data/nih_cxr_1000/manifest.csv")
    parser.add_argument("--output", type=Path, default=BENCH)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep the runs and prepared data here (default: a temporary "
                        "folder, removed at the end)")
    args = parser.parse_args(argv)
    wanted = set(args.only)
    results_path = args.output / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    results["machine"] = machine()
    args.output.mkdir(parents=True, exist_ok=True)

    def save() -> None:  # after every section, so a late failure keeps the earlier numbers
        results_path.write_text(json.dumps(results, indent=2))
        (args.output / "RESULTS.md").write_text(markdown(results))

    from lungxray import prepare

    with (contextlib.nullcontext(str(args.workdir)) if args.workdir
          else tempfile.TemporaryDirectory(prefix="lungxray-bench-")) as tmp:
        work = Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        prepared = work / "data32"
        if wanted & {"input", "training"}:
            prepare.preprocess(str(args.data), prepared, image_size=32)
        if "preprocess" in wanted:
            from bench.preprocess_bench import bench_preprocess

            results["preprocess"] = bench_preprocess(3000, 512, work / "preprocess")
            save()
        if "tuning" in wanted:
            from bench.tuning_bench import bench_tuning

            results["tuning"] = bench_tuning_default(bench_tuning, args.data, work)
            save()
        if "input" in wanted:
            from bench.training_bench import bench_input_pipeline

            results["input_pipeline"] = bench_input_pipeline(prepared)
            save()
        if "training" in wanted:
            from bench.training_bench import bench_train_throughput

            results["train_throughput"] = bench_train_throughput(prepared, workdir=work)
            save()
        if "local" in wanted:
            for profile in args.profiles:
                local = run_local(profile, args.data, args.weights, work / f"runs-{profile}",
                                  args.sites)
                results.setdefault("make_local", {})[profile] = {
                    k: v for k, v in local.items() if k != "run_dir"}
                results.setdefault("accuracy", {})[profile] = accuracy(
                    Path(local["run_dir"]), work / f"accuracy-{profile}")
                save()
    print(f"wrote {results_path} and {args.output / 'RESULTS.md'}")
    return 0


def bench_tuning_default(bench_tuning, source: Path, work: Path) -> dict:
    """The tuning comparison at a realistic CPU size, with a weights file as the frozen
    backbone (no ImageNet download here)."""
    import keras

    from lungxray import prepare

    prepared = work / "data64"
    prepare.preprocess(str(source), prepared, image_size=64, max_per_split=2000)
    weights = work / "vgg16_notop.weights.h5"
    keras.applications.VGG16(weights=None, include_top=False,
                             input_shape=(64, 64, 3)).save_weights(weights)
    return bench_tuning(prepared, "VGG16", weights, 5, 2, work / "tuning")


if __name__ == "__main__":
    sys.exit(main())
