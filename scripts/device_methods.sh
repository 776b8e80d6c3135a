#!/usr/bin/env bash
# The training work of issues 4 and 6 in one call of a lent GPU machine (the `device` tool), sized for its
# 15 minutes of device time: sarcoma-ct trains on from the shipped model at a lower learning rate, twice (as
# trained, finetune-sarcoma-ct-continue.json, and with mirrored crops, …-continue-flips.json); beside them MiM
# and SelfMedHPM self pre-train on the sarcoma training cases (the prepared STS_001-035, labels unused), and when
# both are done the label-efficiency study's arms for them and for the hybrid network from scratch (3, 10 and 35
# cases) run side by side, each fitted to the same minutes and at most the U-Net arms' 16 epochs.
#   here, once:  scripts/device_methods.sh pack   (prepares the sarcoma folders, packs them into
#                .devdata/carry/sarcoma.tar.xz, and puts MONAI's wheel in .whl)
#   the call:    scripts/device_methods.sh run SECONDS   (carry .devdata/carry/sarcoma.tar.xz and .whl; the
#                checkout travels too, 64 MiB in all: move every model but sarcoma-ct out of it)
#   if runs are left and time is too:  scripts/device_methods.sh watch SECONDS   (carry .whl)
# SECONDS: the call's time; the runs' minutes are cut from it (printed). The call ends when SECONDS have passed
# or no run is left, and copies to $OUT what there is: the sarcoma models and runs.tar.gz (logs, curves, the
# arms' results). Then, here: hybridmim evaluate the sarcoma models, and write the study's summary with
# scripts/label_efficiency.py over the arms' .result.json files. METHODS, SIZES: a part of the work.
set -uo pipefail
mode=$1
cd "$(dirname "${BASH_SOURCE[0]}")/.."
carry=.devdata/carry; train=.devdata/prepared/sarcoma-train; val=.devdata/prepared/sarcoma-val
if [ "$mode" = pack ]; then
  source scripts/_venv.sh
  python scripts/link_datasets.py > /dev/null
  for split in train val; do
    python -m hybridmim finetune --init ct-hybridmim-cnn --recipe scripts/recipes/finetune-sarcoma-ct.json \
      --data .devdata/datasets/sarcoma/$split --cache .devdata/prepared/sarcoma-$split --prepare-only || exit 1
  done
  folders=$(mktemp -d); cp -r $train $val "$folders/"
  python scripts/carry_prepared.py pack "$folders" $carry/sarcoma.tar.xz || exit 1
  python -m pip download -q --no-deps -d .whl "monai==$(python -c 'import monai; print(monai.__version__)')" || exit 1
  rm -rf "$folders"; du -h $carry/sarcoma.tar.xz .whl/*
  exit
fi

source scripts/_device.sh
export OMP_NUM_THREADS=2  # several processes on one machine's cores; their CPU work is sampling crops
logs=runs/logs; device=${DEVICE:-cuda}; methods=${METHODS:-mim hpm}
runs="hybridmim pretrain|hybridmim finetune|label_efficiency.py|device_methods.sh study"
variants="continue continue-flips"  # sarcoma-ct trained on: scripts/recipes/finetune-sarcoma-ct-VARIANT.json
pretrained() { echo runs/sts/sts-$1-hybrid.safetensors; }
minutes() { python3 -c "print(round(max($1, 30) / 60, 2))"; }
case $mode in
  run)
    budget=$2
    # The sarcoma runs: all but 3 minutes (unpacking, loading, their validations, collecting). Pre-training:
    # 0.4 of that; the arms: what is left after it less 2.5 minutes (loading, validations, collecting).
    sarcoma=$(minutes "$budget - 180"); pretrain=$(minutes "0.4 * ($budget - 180)")
    arms=$(minutes "$budget - 150 - 0.4 * ($budget - 180)")
    echo "minutes: sarcoma-ct runs $sarcoma, pre-training $pretrain, study arms $arms"
    python3 scripts/carry_prepared.py unpack $carry/sarcoma.tar.xz .devdata/prepared || exit 1
    rm -rf runs/sarcoma-ct-* runs/sts runs/study runs/study-hybrid $logs; mkdir -p runs/sts $logs
    for variant in $variants; do
      setsid python3 -m hybridmim finetune --init sarcoma-ct --data $train --val $val \
        --recipe scripts/recipes/finetune-sarcoma-ct-$variant.json -o runs/sarcoma-ct-$variant/sarcoma-ct.safetensors \
        --max-minutes "$sarcoma" --device $device --progress json \
        > $logs/sarcoma-ct-$variant.jsonl 2> $logs/sarcoma-ct-$variant.err < /dev/null &
    done
    for method in $methods; do
      setsid python3 -m hybridmim pretrain --data $train --recipe scripts/recipes/self-pretrain-$method-sarcoma.json \
        -o "$(pretrained $method)" --max-minutes "$pretrain" --device $device --progress json \
        > $logs/pretrain-$method.jsonl 2> $logs/pretrain-$method.err < /dev/null &
    done
    setsid "$0" study "$arms" > $logs/study.out 2>&1 < /dev/null & ;;
  study)  # started by `run`: waits for pre-training to end, then runs every arm at once
    minutes=$2; budget=0
    sleep 5; while pgrep -f "hybridmim pretrain" > /dev/null; do sleep 5; done
    for size in ${SIZES:-3 10 35}; do
      for method in $methods; do
        python3 scripts/label_efficiency.py --train $train --val $val -o runs/study --sizes $size \
          --inits "$(pretrained $method)" --epochs 16 --max-minutes "$minutes" --device $device \
          > $logs/study-$method-$size.out 2>&1 &
      done
      python3 scripts/label_efficiency.py --train $train --val $val -o runs/study-hybrid --sizes $size --inits scratch \
        --recipe scripts/recipes/label-efficiency-sarcoma-hybrid.json --epochs 16 --max-minutes "$minutes" \
        --device $device > $logs/study-hybrid-scratch-$size.out 2>&1 &
    done
    wait; exit ;;
  watch) budget=$2 ;;
  *) echo "error: pack, run or watch, not $mode" >&2; exit 2 ;;
esac

wait_for_runs "$runs" "$budget"
report_runs $logs/*.jsonl runs/study*/*.log.jsonl
tail -n 2 $logs/*.err $logs/*.out 2>/dev/null | grep -v '^$'
for variant in $variants; do
  cp runs/sarcoma-ct-$variant/sarcoma-ct.safetensors "$OUT/sarcoma-ct-$variant.safetensors" 2>/dev/null
done
tar -czf "$OUT/runs.tar.gz" $logs runs/sts/*.curve.png runs/sarcoma-ct-*/*.curve.png runs/study*/*.json \
  runs/study*/*.log.jsonl runs/study*/*.png 2>/dev/null
pgrep -f "$runs" > /dev/null && echo "runs still going" || echo "no run left"
