"""Supervised training from a recipe, on a real cropped CT, with a tiny network."""

from __future__ import annotations

import io
import json

from conftest import REPO
from hybridmim.checkpoint import load_model
from hybridmim.progress import Reporter, parse_event
from hybridmim.training.supervised import train_supervised


def test_short_training_lowers_the_loss_and_writes_a_complete_checkpoint(abdomen_crop, tmp_path):
    recipe = json.loads((REPO / "scripts/recipes/abdomen-ct-scratch.json").read_text())
    recipe["labels"] = str(REPO / "scripts/labels/btcv13.json")
    recipe["network"] = {"name": "unet", "features": [4, 8, 16]}
    recipe["inference"]["roi_size"] = [32, 32, 32]
    recipe["train"].update(cases=[{"images": [abdomen_crop["image"].name], "label": abdomen_crop["label"].name}],
                           steps=40, batch_size=2, lr=0.01, warmup_steps=2, log_every=10)
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe))

    stream = io.StringIO()
    output = tmp_path / "tiny.safetensors"
    train_supervised(recipe_path, abdomen_crop["image"].parent, output, Reporter("json", stream))

    losses = [e["loss"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "metric"]
    assert len(losses) == 4
    assert losses[-1] < losses[0] - 0.1, losses
    meta, network = load_model(output)
    assert meta.provenance["steps"] == 40
    assert [d["file"] for d in meta.provenance["data"]] == ["ct.nii.gz", "label.nii.gz"]
    assert all(len(d["sha256"]) == 64 for d in meta.provenance["data"])
    assert network.head.out_channels == 14
