#!/usr/bin/env python
"""Reconstruction quality of a pre-trained model on CTs it never saw, against interpolation.

For each held-out CT, `hybridmim reconstruct` masks 40% of the 16³ patches
(seed 0) and reports the mean absolute error (HU, windowed to the model's
[-1000, 1000]) over the masked voxels, for the model and for the best of
three normalised-Gaussian interpolations from the visible voxels.

    .venv/bin/python scripts/evaluate_reconstruction.py --record docs/models/ct-hybridmim-cnn-reconstruction.json
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hybridmim.progress import Reporter
from hybridmim.reconstruct import reconstruct

REPO = Path(__file__).resolve().parents[1]
# Held out of the shipped model's pre-training (scripts/pretrain_ct_model.sh).
UNSEEN = [f"sarcoma_ct/STS_{i:03d}/image.nii.gz" for i in range(36, 46)] + ["abdomen_ct/ct_b.nii.gz"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ct-hybridmim-cnn", help="catalog name or checkpoint path")
    parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    parser.add_argument("--cases", nargs="+", default=UNSEEN, help="paths relative to --data-root")
    parser.add_argument("--record", type=Path, help="write the JSON report here")
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n, case in enumerate(args.cases):
            result = reconstruct([str(args.data_root / case)], str(Path(tmp) / str(n)), args.model, seed=0,
                                 reporter=Reporter("quiet"))
            gain = 1 - result["mae_model"] / result["mae_interpolation"]
            rows.append({"case": case, "mae_model_hu": result["mae_model"],
                         "mae_interpolation_hu": result["mae_interpolation"],
                         "interpolation_sigma_voxels": result["interpolation_sigma_voxels"],
                         "model_lower_by": round(gain, 3)})
            print(f"{case:36} model {result['mae_model']:7.1f} HU   interpolation {result['mae_interpolation']:7.1f} HU"
                  f"   ({gain:+.1%})", flush=True)
    mean_model = sum(r["mae_model_hu"] for r in rows) / len(rows)
    mean_interp = sum(r["mae_interpolation_hu"] for r in rows) / len(rows)
    report = {"model": args.model, "mask_ratio": 0.4, "seed": 0, "cases": rows,
              "mean_mae_model_hu": round(mean_model, 2), "mean_mae_interpolation_hu": round(mean_interp, 2),
              "model_lower_by": round(1 - mean_model / mean_interp, 3)}
    print(f"{'mean':36} model {mean_model:7.1f} HU   interpolation {mean_interp:7.1f} HU"
          f"   ({report['model_lower_by']:+.1%})")
    if args.record:
        args.record.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
