"""Supervised training from a recipe, on a real cropped CT, with a tiny network."""

from __future__ import annotations

import io
import json

from conftest import REPO
from hybridmim.checkpoint import load_model
from hybridmim.progress import Reporter, parse_event
from hybridmim.training.supervised import train_supervised


def test_short_training_lowers_the_loss_and_writes_a_complete_checkpoint(abdomen_crop, tmp_path):
    recipe = json.loads((REPO / "scripts/recipes/abdomen-ct-scratch.json").read_text(encoding="utf-8"))
    recipe["labels"] = str(REPO / "scripts/labels/btcv13.json")
    recipe["network"] = {"name": "unet", "features": [4, 8, 16]}
    recipe["inference"]["roi_size"] = [32, 32, 32]
    recipe["train"].update(cases=[{"images": [abdomen_crop["image"].name], "label": abdomen_crop["label"].name}],
                           steps=40, batch_size=2, lr=0.01, warmup_steps=2, log_every=10)
    recipe_path = tmp_path / "recipe.json"
    recipe_path.write_text(json.dumps(recipe), encoding="utf-8")

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


def test_label_intensity_shift_moves_each_structure_by_one_constant(abdomen_crop):
    import numpy as np
    import SimpleITK as sitk
    import torch

    from hybridmim.training.augment import RandAxialSlabd, RandLabelIntensityShiftd

    image = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(abdomen_crop["image"]))).astype(np.float32))[None]
    label = torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(abdomen_crop["label"]))).astype(np.int64))[None]
    shift = RandLabelIntensityShiftd("image", "label", prob=1.0, shift_range=(0.1, 0.3))
    shift.set_random_state(0)
    out = shift({"image": image, "label": label})
    delta = out["image"] - image
    assert (delta[label == 0] == 0).all()
    for value in (1, 6, 7):
        region = delta[label == value]
        assert 0.1 <= float(region[0]) <= 0.3 and torch.allclose(region, region[0].expand_as(region), atol=1e-3)

    slab = RandAxialSlabd(("image", "label"), prob=1.0, min_slices=4, max_slices=8)
    slab.set_random_state(0)
    out = slab({"image": image + 1, "label": label})
    kept = (out["image"][0] != 0).flatten(1).any(1)
    assert 4 <= int(kept.sum()) <= 8
    assert (out["label"][0][~kept] == 0).all()
