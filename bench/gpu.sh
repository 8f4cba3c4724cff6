#!/usr/bin/env bash
# GPU benchmark: the three seed models at 224 px through the pipeline's own code (preprocess and
# train CLIs), recording per-epoch time, images/s and GPU utilisation.
#   bench/gpu.sh [DATA] [OUT]      e.g. bench/gpu.sh ../shared/data/pneumoniamnist_28_trainval.npz
# WEIGHTS=imagenet uses ImageNet weights when Keras has them cached (or pre-baked); the default
# trains from scratch. EPOCHS (default 3) and MODELS override the run.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/pneumoniamnist_28_trainval.npz}
OUT=${2:-bench/gpu}
WEIGHTS=${WEIGHTS:-none}
EPOCHS=${EPOCHS:-3}
MODELS=${MODELS:-VGG16 ResNet152V2 InceptionV3}
PY=${PY:-.venv/bin/python}
command -v nvidia-smi >/dev/null || { echo "bench/gpu.sh: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv"
[ -d "$OUT/data224" ] || "$PY" -m lungxray.cli preprocess --source "$DATA" --output "$OUT/data224" --image-size 224 > /dev/null
for model in $MODELS; do
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/$model.util.csv" &
  monitor=$!
  "$PY" -m lungxray.cli train --data "$OUT/data224" --model "$model" --output "$OUT/$model" \
    --epochs "$EPOCHS" --weights "$WEIGHTS" --patience 99 > "$OUT/$model.log" 2>&1
  kill "$monitor"
done
"$PY" - "$OUT" $MODELS <<'PY'
import csv, json, sys
from pathlib import Path
out, models = Path(sys.argv[1]), sys.argv[2:]
n_train = json.loads((out / "data224" / "manifest.json").read_text())["splits"]["train"]["n"]
summary = {"gpu": (out / "gpu.csv").read_text().splitlines()[-1], "train_images": n_train, "models": {}}
for model in models:
    info = json.loads((out / model / "model_info.json").read_text())
    seconds = json.loads((out / model / "history.json").read_text())["history"]["epoch_seconds"]
    util = [float(r[1]) for r in csv.reader((out / f"{model}.util.csv").open()) if len(r) > 2]
    summary["models"][model] = {
        "epoch_seconds": [round(s, 1) for s in seconds],
        "images_per_s": [round(n_train / s, 1) for s in seconds],
        "gpu_util_mean": round(sum(util) / max(len(util), 1), 1), "devices": info["devices"]}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
print(json.dumps(summary, indent=2))
PY
