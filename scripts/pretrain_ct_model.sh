#!/usr/bin/env bash
# Re-creates the shipped pre-trained CT model (ct-hybridmim-cnn) from ../shared/data.
#   scripts/pretrain_ct_model.sh [STEPS]      # default: the recipe's 3000 steps
# 1. Prepares every CT once (labels unused; STS_036-045 and ct_b held out for evaluation)
#    into .devdata/ct, a folder that can travel to a GPU machine (scripts/device_pretrain.sh).
# 2. Pre-trains with scripts/recipes/pretrain-hybridmim-cnn-ct.json (8 volumes × 2 crops a step;
#    the shipped model ran 5880 steps on an H100). Stop with Ctrl-C; run again to resume.
# Then: cp runs/ct/ct-hybridmim-cnn.safetensors HybridMIMSegment/Resources/Models/ &&
#       scripts/update_catalog_hashes.py && scripts/evaluate_reconstruction.py --record …
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
DATA=../shared/data
RECIPE=scripts/recipes/pretrain-hybridmim-cnn-ct.json
RUN=runs/ct/ct-hybridmim-cnn.safetensors
held_out=$(printf 'STS_%03d ' $(seq 36 45))
python -m hybridmim pretrain --prepare-only --recipe $RECIPE --cache .devdata/ct \
  --data $DATA/sarcoma_ct $DATA/abdomen_ct/ct_a.nii.gz $DATA/unlabeled_ct $DATA/lung_tumor_ct --exclude $held_out
mkdir -p runs/ct
steps=${1:+--steps $1}
if [ -f "${RUN%.safetensors}.resume.pt" ]; then
  python -m hybridmim pretrain --data .devdata/ct -o $RUN --resume $steps
else
  python -m hybridmim pretrain --data .devdata/ct --recipe $RECIPE -o $RUN $steps
fi
