#!/usr/bin/env python
"""Store a `hybridmim evaluate` report's summary in a checkpoint's metadata (metrics → KEY), so that
`hybridmim info`, `hybridmim models --json` and the Slicer module show it.

    .venv/bin/python scripts/record_evaluation.py MODEL.safetensors REPORT.json KEY [--note TEXT]

KEY names what was evaluated (e.g. ct_b, validation-STS_036-045); --note says what the reference
is (e.g. "labels are TotalSegmentator predictions"). Then run scripts/update_catalog_hashes.py.
"""

import argparse
import json
from pathlib import Path

from safetensors.torch import load_file

from hybridmim.checkpoint import read_metadata, save_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("model", type=Path)
parser.add_argument("report", type=Path)
parser.add_argument("key")
parser.add_argument("--note", default="")
args = parser.parse_args()

report = json.loads(args.report.read_text(encoding="utf-8"))
meta = read_metadata(args.model)
entry = {"cases": [c["case"] for c in report["cases"]],
         "summary": {name: {k: round(v, 4) if isinstance(v, float) else v for k, v in s.items()}
                     for name, s in report["summary"].items()}}
if args.note:
    entry["reference"] = args.note
meta.metrics = {**meta.metrics, args.key: entry}
weights = load_file(str(args.model))
save_checkpoint(args.model, weights, meta, half=any(t.dtype.is_floating_point and t.element_size() == 2
                                                    for t in weights.values()))
print(f"recorded {args.key} in {args.model}; now run scripts/update_catalog_hashes.py")
