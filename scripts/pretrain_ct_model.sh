#!/usr/bin/env bash
# Re-creates the shipped pre-trained CT model (ct-hybridmim-cnn) from ../shared/data, or pre-trains
# the same CTs with MiM or SelfMedHPM for the label-efficiency study.
#   scripts/pretrain_ct_model.sh [hybridmim|mim|hpm] [STEPS]   # default: hybridmim, the recipe's 3000 steps
# 1. Prepares every CT once (labels unused; STS_036-045 and ct_b held out for evaluation)
#    into .devdata/ct, a folder that can travel to a GPU machine (scripts/device_pretrain.sh);
#    the three methods share it (same pre-processing).
# 2. Pre-trains with scripts/recipes/pretrain-METHOD-BACKBONE-ct.json (hybridmim: 8 volumes × 2 crops
#    a step; the shipped model ran 5880 steps on an H100) into runs/ct/ct-METHOD-BACKBONE.safetensors.
#    Stop with Ctrl-C; run again to resume.
# Then: cp runs/ct/ct-hybridmim-cnn.safetensors HybridMIMSegment/Resources/Models/ &&
#       scripts/update_catalog_hashes.py && scripts/evaluate_reconstruction.py --record …
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
method=hybridmim
case ${1:-} in hybridmim|mim|hpm) method=$1; shift ;; esac
backbone=$([ "$method" = hybridmim ] && echo cnn || echo hybrid)
source scripts/_pretrain_run.sh
DATA=../shared/data
pretrain_run scripts/recipes/pretrain-$method-$backbone-ct.json runs/ct/ct-$method-$backbone.safetensors .devdata/ct \
  "${1:-}" $DATA/sarcoma_ct $DATA/abdomen_ct/ct_a.nii.gz $DATA/unlabeled_ct $DATA/lung_tumor_ct \
  --exclude $(printf 'STS_%03d ' $(seq 36 45))
