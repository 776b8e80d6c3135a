#!/usr/bin/env bash
# "Self pre-training" (SelfMedHPM's recipe, here for MiM too): pre-trains on the target task's own training cases only.
#   [METHOD=hpm|mim] scripts/self_pretrain_sarcoma.sh [STEPS]      # default: SelfMedHPM, the recipe's 3000 steps
# 1. Prepares the sarcoma training CTs STS_001-035 (labels unused; STS_036-045, the validation
#    cases of the sarcoma model and of scripts/label_efficiency.py, held out) into .devdata/sts-train,
#    a folder that can travel to a GPU machine (both methods' pre-processing is the same).
# 2. Pre-trains with scripts/recipes/self-pretrain-METHOD-sarcoma.json. Stop with Ctrl-C; run again to resume.
# Then fine-tune from it: hybridmim finetune --init runs/sts/sts-METHOD-hybrid.safetensors …
# (or give it to scripts/label_efficiency.py --inits).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
source scripts/_pretrain_run.sh
METHOD=${METHOD:-hpm}
pretrain_run scripts/recipes/self-pretrain-$METHOD-sarcoma.json runs/sts/sts-$METHOD-hybrid.safetensors \
  .devdata/sts-train "${1:-}" ../shared/data/sarcoma_ct --exclude $(printf 'STS_%03d ' $(seq 36 45))
