#!/usr/bin/env bash
# Creates .venv on first use, then segments the sample abdominal CT with the
# embedded default model: writes a .seg.nrrd (named segments for Slicer) and a
# QA preview PNG into demo-output/ (or the folder given as $1).
source "$(dirname "${BASH_SOURCE[0]}")/_venv.sh"
cd "$REPO_ROOT"
OUT="${1:-$REPO_ROOT/demo-output}"
SHARED="$REPO_ROOT/../shared/data/abdomen_ct"

if [ -f "$SHARED/ct_a.nii.gz" ]; then
  CT="$SHARED/ct_a.nii.gz"
else
  # The public copy (TotalSegmentator's example CT), downloaded once and verified by SHA256.
  CT="$(hybridmim sample abdomen-ct)"
fi

hybridmim segment "$CT" -o "$OUT/abdomen_ct.seg.nrrd" --preview "$OUT/abdomen_ct_preview.png" --overwrite
echo "segmentation: $OUT/abdomen_ct.seg.nrrd"
echo "preview:      $OUT/abdomen_ct_preview.png"

if [ -f "$SHARED/ct_b.nii.gz" ]; then
  # A second, contrast-enhanced CT the model never saw, with reference labels
  # (TotalSegmentator predictions): Dice and HD95 per organ.
  python scripts/link_datasets.py > /dev/null
  hybridmim evaluate --data .devdata/datasets/abdomen/val -o "$OUT/ct_b_evaluation.json" --overwrite
fi
