#!/usr/bin/env bash
# Fine-tunes a shipped model (sarcoma-ct, abdomen-ct or brain-tumor-mr) on a lent GPU machine, from the
# cases prepared here by scripts/finetune_model.sh (carry .devdata/prepared/DATA-{train,val} and .whl).
#   first call:  scripts/device_finetune.sh NAME start SECONDS MINUTES   (the run is sized to MINUTES of
#                training; the call stops cleanly after SECONDS, and a resume state stays on the machine)
#   next calls:  scripts/device_finetune.sh NAME resume SECONDS            (while the machine is still warm)
# The model, its curve and the progress log go to $OUT; evaluate the model here afterwards (the scans
# are not on the machine): hybridmim evaluate --model $OUT/NAME.safetensors --data .devdata/datasets/DATA/val
set -uo pipefail
name=$1; mode=$2; budget=$3
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_device.sh
case $mode in
  start) extra=(--overwrite --max-minutes "$4"); rm -rf "runs/$name" ;;  # nothing stale reaches $OUT
  resume) extra=() ;;
  *) echo "error: start or resume, not $mode" >&2; exit 2 ;;
esac
timeout -s TERM $((budget - SECONDS)) scripts/finetune_model.sh "$name" --device "${DEVICE:-cuda}" --progress json \
  "${extra[@]}" > "$OUT/$name-$mode.jsonl" 2> "$OUT/$name-$mode.err"
cp runs/$name/$name.safetensors runs/$name/$name.curve.png "$OUT/" 2>/dev/null
grep '"message"' "$OUT/$name-$mode.jsonl" | tail -3; grep '"metric"' "$OUT/$name-$mode.jsonl" | tail -2 | cut -c1-300
grep '"done"\|"error"' "$OUT/$name-$mode.jsonl" | tail -1; tail -3 "$OUT/$name-$mode.err"
