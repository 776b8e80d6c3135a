#!/usr/bin/env python
"""Train the embedded default model (abdominal organs on CT, from scratch).

    .venv/bin/python scripts/train_default_model.py [--recipe scripts/recipes/abdomen-ct-scratch.json]
        [--data-root ../shared/data] [-o HybridMIMSegment/Resources/Models/abdomen-ct-scratch.safetensors]

About 30 minutes on a 2-core CPU. After training, update the catalog's sha256
(scripts/update_catalog.py) and the model card in docs/models.
"""

import argparse
from pathlib import Path

from hybridmim.progress import Reporter
from hybridmim.training.supervised import train_supervised

REPO = Path(__file__).resolve().parents[1]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--recipe", type=Path, default=REPO / "scripts/recipes/abdomen-ct-scratch.json")
parser.add_argument("--data-root", type=Path, default=REPO.parent / "shared/data")
parser.add_argument("-o", "--output", type=Path, default=REPO / "HybridMIMSegment/Resources/Models/abdomen-ct-scratch.safetensors")
parser.add_argument("--progress", choices=["json", "tqdm"], default="tqdm")
args = parser.parse_args()
train_supervised(args.recipe, args.data_root, args.output, Reporter(args.progress))
