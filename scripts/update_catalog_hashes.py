#!/usr/bin/env python
"""Recompute sha256 and size of every bundled model in the catalog (after retraining)."""

import json

from hybridmim.catalog import models_dir
from hybridmim.download import file_sha256

path = models_dir() / "catalog.json"
catalog = json.loads(path.read_text(encoding="utf-8"))
for entry in catalog["models"]:
    if not entry.get("url"):
        model = path.parent / entry["file"]
        entry["sha256"], entry["size"] = file_sha256(model), model.stat().st_size
        print(f"{entry['name']}: {entry['sha256']} ({entry['size']} bytes)")
path.write_text(json.dumps(catalog, indent=1) + "\n", encoding="utf-8")
