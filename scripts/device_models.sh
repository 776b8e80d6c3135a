#!/usr/bin/env bash
# One lent GPU machine (the `device` tool) trains the three shipped models and the six arms of the
# label-efficiency study side by side: the processes share the GPU, and each sizes itself to MINUTES
# with --max-minutes. The runs outlive the call (setsid), so later calls only watch and collect.
#   here, once:  scripts/carry_prepared.py pack .devdata/prepared .devdata/carry/prepared.tar.xz
#   first call:  scripts/device_models.sh launch MINUTES SECONDS   (carry .devdata/carry and .whl; the
#                checkout travels too, 64 MiB in all: move the models the runs do not start from, all
#                but ct-hybridmim-cnn, out of it for the calls)
#   next calls:  scripts/device_models.sh watch SECONDS            (while the machine is still warm; carry
#                .whl again: a call that does not name it finds it gone)
# Each call ends when SECONDS have passed or no run is left, and copies what there is so far to $OUT:
# the three models and runs.tar.gz (progress logs, curves, the study's per-arm results). Then, here:
# evaluate the models (hybridmim evaluate) and write the study's summary (scripts/label_efficiency.py
# over runs/study with the arms' .result.json files in it: finished arms are not run again).
set -uo pipefail
mode=$1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_device.sh
export OMP_NUM_THREADS=2  # nine processes on one machine's cores; their CPU work is sampling crops
logs=runs/logs; study=runs/study; device=${DEVICE:-cuda}
train=.devdata/prepared/sarcoma-train; val=.devdata/prepared/sarcoma-val
runs="hybridmim finetune|label_efficiency.py"

case $mode in
  launch)
    minutes=$2; budget=$3
    python3 scripts/carry_prepared.py unpack .devdata/carry/prepared.tar.xz .devdata/prepared || exit 1
    rm -rf runs/sarcoma-ct runs/abdomen-ct runs/brain-tumor-mr $study $logs; mkdir -p $logs $study
    for name in sarcoma-ct abdomen-ct brain-tumor-mr; do
      setsid scripts/finetune_model.sh $name --device $device --progress json --overwrite --max-minutes "$minutes" \
        > $logs/$name.jsonl 2> $logs/$name.err < /dev/null &
    done
    for size in 3 10 35; do
      for init in ct-hybridmim-cnn scratch; do
        setsid python3 scripts/label_efficiency.py --train $train --val $val -o $study --sizes $size \
          --inits $init --max-minutes "$minutes" --device $device > $logs/study-$init-$size.out 2>&1 < /dev/null &
      done
    done ;;
  watch) budget=$2 ;;
  *) echo "error: launch or watch, not $mode" >&2; exit 2 ;;
esac

wait_for_runs "$runs" "$budget"
report_runs $logs/*.jsonl $study/*.log.jsonl
tail -n 2 $logs/*.err $logs/*.out 2>/dev/null | grep -v '^$'
for name in sarcoma-ct abdomen-ct brain-tumor-mr; do cp runs/$name/$name.safetensors "$OUT/" 2>/dev/null; done
tar -czf "$OUT/runs.tar.gz" $logs runs/*/*.curve.png $study/*.json $study/*.log.jsonl $study/*.png 2>/dev/null
pgrep -f "$runs" > /dev/null && echo "runs still going" || echo "no run left"
