#!/usr/bin/env bash
# GPU benchmark: the three seed models at 224 px through the pipeline's own code (preprocess and
# train CLIs), recording per-epoch time, images/s and GPU utilisation.
#   bench/gpu.sh [DATA] [OUT]      e.g. bench/gpu.sh ../shared/data/pneumoniamnist_28_trainval.npz
# WEIGHTS=imagenet uses ImageNet weights when Keras has them cached (or pre-baked); the default
# trains from scratch. EPOCHS (default 3), BATCH_SIZE (default 32), MODELS, IMAGE_SIZE (default
# 224) and MAX_PER_SPLIT (default 0 = all images) override the run. KERAS_BACKEND=jax trains on
# JAX instead of TensorFlow (for a machine with JAX but no TensorFlow GPU build); PY picks the
# Python. XLA_FLAGS passes through to XLA and is recorded in the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-../shared/data/pneumoniamnist_28_trainval.npz}
OUT=${2:-bench/gpu}
WEIGHTS=${WEIGHTS:-none}
EPOCHS=${EPOCHS:-3}
BATCH_SIZE=${BATCH_SIZE:-32}
MODELS=${MODELS:-VGG16 ResNet152V2 InceptionV3}
IMAGE_SIZE=${IMAGE_SIZE:-224}
MAX_PER_SPLIT=${MAX_PER_SPLIT:-0}
PY=${PY:-.venv/bin/python}
command -v nvidia-smi >/dev/null || { echo "bench/gpu.sh: nvidia-smi not found: no NVIDIA GPU here" >&2; exit 2; }
mkdir -p "$OUT"
rm -f "$OUT/summary.json"  # a summary is only ever this run's
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$OUT/gpu.csv"
DATA_DIR="$OUT/data$IMAGE_SIZE"
"$PY" -m lungxray.cli preprocess --source "$DATA" --output "$DATA_DIR" \
  --image-size "$IMAGE_SIZE" --max-per-split "$MAX_PER_SPLIT" > /dev/null  # never a stale copy
monitor=
trap '[ -z "$monitor" ] || kill "$monitor" 2>/dev/null || true' EXIT  # no orphaned sampler
done_models=()
for model in $MODELS; do
  nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used --format=csv,noheader,nounits -l 1 > "$OUT/$model.util.csv" &
  monitor=$!
  "$PY" -m lungxray.cli train --data "$DATA_DIR" --model "$model" --output "$OUT/$model" \
    --epochs "$EPOCHS" --batch-size "$BATCH_SIZE" --weights "$WEIGHTS" --patience 99 > "$OUT/$model.log" 2>&1 \
    || { echo "bench/gpu.sh: training $model failed; the end of $OUT/$model.log:" >&2
         tail -20 "$OUT/$model.log" >&2; exit 1; }
  kill "$monitor" 2>/dev/null || true; monitor=
  done_models+=("$model")
  # Rewritten after every model, so a run cut short still leaves the models it finished.
  "$PY" bench/gpu_summary.py "$OUT" "$DATA_DIR" "${done_models[@]}"
done
[ ! -f "$OUT/summary.json" ] || cat "$OUT/summary.json"
