#!/usr/bin/env bash
# Re-creates a shipped segmentation model: sarcoma-ct, abdomen-ct or brain-tumor-mr.
#   scripts/finetune_model.sh NAME [finetune options, e.g. --epochs 5 --device cpu]
# 1. Links ../shared/data as dataset folders (scripts/link_datasets.py) and prepares the training
#    and validation cases once into .devdata/prepared/NAME-{train,val}: folders that can travel to
#    a GPU machine, where the scans and SimpleITK are absent (carry them with the `device` tool).
# 2. Fine-tunes with scripts/recipes/finetune-NAME.json into runs/NAME/NAME.safetensors; run it
#    again after an interruption (Ctrl-C, SIGTERM, `timeout`) and it resumes.
# Then: cp runs/NAME/NAME.safetensors HybridMIMSegment/Resources/Models/, record its evaluation
#       (hybridmim evaluate) in the model card, and scripts/update_catalog_hashes.py.
set -euo pipefail
name=$1; shift
if [ -z "${HYBRIDMIM_NO_VENV:-}" ]; then  # GPU machines: set it and put the engine on PYTHONPATH instead
  source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
fi
cd "$(dirname "${BASH_SOURCE[0]}")/.."
case $name in
  sarcoma-ct) init=ct-hybridmim-cnn; data=sarcoma ;;
  abdomen-ct) init=ct-hybridmim-cnn; data=abdomen ;;
  brain-tumor-mr) init=scratch; data=brain ;;
  *) echo "error: unknown model $name (sarcoma-ct, abdomen-ct or brain-tumor-mr)" >&2; exit 2 ;;
esac
recipe=scripts/recipes/finetune-$name.json
prepared=.devdata/prepared/$data
for split in train val; do
  if [ ! -f "$prepared-$split/prepared.json" ]; then
    python3 scripts/link_datasets.py > /dev/null
    python3 -m hybridmim finetune --init $init --recipe $recipe --data .devdata/datasets/$data/$split \
      --cache "$prepared-$split" --prepare-only
  fi
done
run=runs/$name/$name.safetensors
if [ -f "runs/$name/$name.resume.pt" ]; then
  exec python3 -m hybridmim finetune --init $init --data "$prepared-train" --val "$prepared-val" -o $run --resume "$@"
fi
exec python3 -m hybridmim finetune --init $init --recipe $recipe --data "$prepared-train" --val "$prepared-val" \
  -o $run "$@"
