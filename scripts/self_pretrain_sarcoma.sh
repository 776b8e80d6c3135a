#!/usr/bin/env bash
# SelfMedHPM "self pre-training": pre-trains on the target task's own training cases only.
#   scripts/self_pretrain_sarcoma.sh [STEPS]      # default: the recipe's 3000 steps
# 1. Prepares the sarcoma training CTs STS_001-035 (labels unused; STS_036-045, the validation
#    cases of the sarcoma model and of scripts/label_efficiency.py, held out) into .devdata/sts-train,
#    a folder that can travel to a GPU machine.
# 2. Pre-trains with scripts/recipes/self-pretrain-hpm-sarcoma.json. Stop with Ctrl-C; run again to resume.
# Then fine-tune from it: hybridmim finetune --init runs/sts/sts-hpm-hybrid.safetensors …
# (or give it to scripts/label_efficiency.py --inits).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
RECIPE=scripts/recipes/self-pretrain-hpm-sarcoma.json
RUN=runs/sts/sts-hpm-hybrid.safetensors
held_out=$(printf 'STS_%03d ' $(seq 36 45))
python -m hybridmim pretrain --prepare-only --recipe $RECIPE --cache .devdata/sts-train \
  --data ../shared/data/sarcoma_ct --exclude $held_out
mkdir -p runs/sts
steps=${1:+--steps $1}
if [ -f "${RUN%.safetensors}.resume.pt" ]; then
  python -m hybridmim pretrain --data .devdata/sts-train -o $RUN --resume $steps
else
  python -m hybridmim pretrain --data .devdata/sts-train --recipe $RECIPE -o $RUN $steps
fi
