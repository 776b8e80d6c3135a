"""scripts/label_efficiency.py end to end on real sarcoma cases, with a tiny network and budget."""

from __future__ import annotations

import json
import runpy
import shutil
import sys

import torch
from safetensors.torch import load_file

from conftest import REPO, around_the_tumour, data_file

TINY_STUDY = {
    "scratch": {"network": {"name": "unet", "features": [8, 16, 16, 32], "dropout": 0.0},
                "preprocessing": {"spacing": [3.0, 3.0, 3.0],
                                  "intensity": {"type": "window", "window": [-200, 300], "output_range": [0.001, 1.0]}},
                "roi_size": [48, 48, 48], "overlap": 0.25},
    "train": {"epochs": 1, "steps_per_epoch": 1, "volumes_per_step": 1, "crops_per_volume": 1, "warmup_steps": 1,
              "patience": 0, "amp": "none", "half_precision": False},
}


def test_nested_subsets_seeds_summary_and_a_rerun_that_trains_nothing(tmp_path, monkeypatch):
    train, val, study = tmp_path / "train", tmp_path / "val", tmp_path / "study"
    for number in (1, 2, 3):
        train.mkdir(exist_ok=True)
        (train / f"STS_{number:03d}").symlink_to(data_file(f"sarcoma_ct/STS_{number:03d}"))
    around_the_tumour(data_file("sarcoma_ct/STS_036"), val / "STS_036", margin_mm=5.0)
    recipe, labels = tmp_path / "recipes" / "tiny.json", tmp_path / "labels" / "sarcoma.json"
    for folder in (recipe.parent, labels.parent):
        folder.mkdir()
    shutil.copy(REPO / "scripts/labels/sarcoma.json", labels)
    # named relative to the recipe, as in scripts/recipes: the seeded copies the study writes elsewhere must find it
    recipe.write_text(json.dumps({**TINY_STUDY, "labels": "../labels/sarcoma.json"}))
    monkeypatch.setattr(sys, "argv", ["label_efficiency.py", "--train", str(train), "--val", str(val), "-o", str(study),
                                      "--sizes", "1", "2", "--inits", "scratch", "--seeds", "0", "1",
                                      "--recipe", str(recipe), "--device", "cpu"])
    monkeypatch.chdir(tmp_path)  # in process: the interpreter and torch are loaded already
    runpy.run_path(str(REPO / "scripts/label_efficiency.py"), run_name="__main__")

    summary = json.loads((study / "label_efficiency.json").read_text())
    results = {(r["labelled_cases"], r["seed"]): r for r in summary["results"]}
    assert summary["seeds"] == [0, 1] and sorted(results) == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert results[(1, 0)]["cases"] == results[(1, 1)]["cases"]  # the seeds share the labelled subsets
    assert set(results[(1, 0)]["cases"]) < set(results[(2, 0)]["cases"])  # nested
    assert all(r["steps"] == 1 and len(r["dice_by_epoch"]) == 2 for r in results.values())  # epochs 0 and 1
    # The seed reaches the training: the two seeds' networks start and end differently.
    seed0, seed1 = (load_file(str(study / name)) for name in ("scratch-1.safetensors", "scratch-1-seed1.safetensors"))
    assert not all(torch.equal(seed0[k], seed1[k]) for k in seed0)
    assert (study / "label_efficiency.png").stat().st_size > 10_000

    logs = {p.name: p.stat().st_size for p in study.glob("*.log.jsonl")}
    runpy.run_path(str(REPO / "scripts/label_efficiency.py"), run_name="__main__")
    assert {p.name: p.stat().st_size for p in study.glob("*.log.jsonl")} == logs  # finished arms not run again
    assert json.loads((study / "label_efficiency.json").read_text())["results"] == summary["results"]
