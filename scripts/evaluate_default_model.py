#!/usr/bin/env python
"""Dice per organ of a model on abdomen_ct/ct_b, a case no shipped model was trained on.

    .venv/bin/python scripts/evaluate_default_model.py [--model NAME|PATH] [--data-root ../shared/data]
        [--json REPORT.json] [--record]

ct_b's labels are TotalSegmentator predictions, not manual contours. --record
stores the scores in the checkpoint's metadata (then run
scripts/update_catalog_hashes.py).
"""

import argparse
import json
import tempfile
from pathlib import Path

import SimpleITK as sitk

from hybridmim.catalog import resolve_model
from hybridmim.checkpoint import read_metadata, save_checkpoint
from hybridmim.metrics import dice_per_label
from hybridmim.progress import Reporter
from hybridmim.segment import segment

REPO = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None)
parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data")
parser.add_argument("--json", type=Path, help="also write the scores as JSON")
parser.add_argument("--record", action="store_true", help="store the scores in the checkpoint metadata")
args = parser.parse_args()

reporter = Reporter("quiet")
checkpoint = resolve_model(args.model, reporter)
meta = read_metadata(checkpoint)
reference = sitk.GetArrayFromImage(sitk.ReadImage(str(args.data_root / "abdomen_ct/ct_b_btcv13.nii.gz")))
with tempfile.TemporaryDirectory() as tmp:
    result = segment([str(args.data_root / "abdomen_ct/ct_b.nii.gz")], f"{tmp}/ct_b.nii.gz", str(checkpoint),
                     device="auto", reporter=reporter)
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(result["segmentation"]))

scores = dice_per_label(prediction, reference, [label.value for label in meta.labels])
present = {label.name: round(scores[label.value], 4) for label in meta.labels if (reference == label.value).any()}
mean = sum(present.values()) / len(present)
print(f"Dice on ct_b (reference: TotalSegmentator predictions), {len(present)} organs present:")
for name, dice in present.items():
    print(f"  {name:<26} {dice:.3f}")
print(f"  {'mean':<26} {mean:.3f}")
report = {"case": "abdomen_ct/ct_b", "reference": "TotalSegmentator predictions (BTCV-13 ids)",
          "dice": present, "mean_dice": round(mean, 4)}
if args.json:
    args.json.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
if args.record:
    from safetensors.torch import load_file

    meta.metrics = {"ct_b_dice": report}
    save_checkpoint(checkpoint, load_file(str(checkpoint)), meta, half=True)
    print(f"recorded in {checkpoint}; now run scripts/update_catalog_hashes.py")
