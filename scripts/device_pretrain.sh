#!/usr/bin/env bash
# Pre-trains on a lent GPU machine (the `device` tool), where the scans and SimpleITK are absent:
# the data travel prepared (`pretrain --prepare-only`, see scripts/pretrain_ct_model.sh) in
# .devdata/ct and MONAI as a wheel in .whl. METHOD=hybridmim (default: the shipped CT model), mim or hpm.
#   first call:  [METHOD=…] scripts/device_pretrain.sh start SECONDS  (benchmark, then train; stops at SECONDS)
#   next calls:  [METHOD=…] scripts/device_pretrain.sh resume SECONDS
# Outputs (model, curve, logs, benchmark) go to $OUT; the resume state stays in runs/ on the machine.
set -uo pipefail
mode=$1; budget=$2
source "$(dirname "${BASH_SOURCE[0]}")/_device.sh"
METHOD=${METHOD:-hybridmim}
backbone=$([ "$METHOD" = hybridmim ] && echo cnn || echo hybrid)
RUN=runs/ct/ct-$METHOD-$backbone.safetensors
RECIPE=scripts/recipes/pretrain-$METHOD-$backbone-ct.json
crops=$(python3 -c "import json; t=json.load(open('$RECIPE'))['train']
print(t['volumes_per_step'] * t['crops_per_volume'])")
if [ "$mode" = start ]; then
  python3 scripts/bench_pretrain_step.py --data .devdata/ct --batch 2 --steps 10 --warmup 3 \
    -o "$OUT/bench_gpu_batch2.json"
  if [ "$METHOD" = hybridmim ]; then which=(--backbones cnn --methods); else which=(--backbones --methods "$METHOD"); fi
  python3 scripts/bench_pretrain_step.py --data .devdata/ct "${which[@]}" --batch "$crops" --steps 5 --warmup 3 \
    -o "$OUT/bench_gpu_$METHOD.json"
  # As many steps as two calls of this length hold, at the measured speed (+15% for data and checkpoints).
  steps=$(python3 -c "import json; r=json.load(open('$OUT/bench_gpu_$METHOD.json'))['rows'][0]
print(int(($budget - $SECONDS + ${3:-450}) / (1.15 * r['seconds_per_step'])))")
  echo "training for $steps steps"
  timeout -s TERM $((budget - SECONDS)) python3 -m hybridmim pretrain --data .devdata/ct --recipe $RECIPE -o $RUN \
    --steps "$steps" --overwrite --progress json > "$OUT/train_start.jsonl" 2> "$OUT/train_start.err"
else
  timeout -s TERM $((budget - SECONDS)) python3 -m hybridmim pretrain --data .devdata/ct -o $RUN --resume \
    --progress json > "$OUT/train_resume.jsonl" 2> "$OUT/train_resume.err"
fi
cp "$RUN" "${RUN%.safetensors}.curve.png" "$OUT/"
grep '"metric"' "$OUT"/train_*.jsonl | tail -2
grep '"done"\|"error"' "$OUT"/train_*.jsonl | tail -1
tail -3 "$OUT"/train_*.err
