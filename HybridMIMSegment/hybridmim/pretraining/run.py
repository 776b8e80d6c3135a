"""``hybridmim pretrain``: recipe + data → pre-trained reconstruction checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from ..catalog import resources_dir
from ..checkpoint import check_channels
from ..download import cache_dir
from ..errors import UserError
from ..jsonfile import read_json
from ..preprocessing import Preprocessing
from ..progress import Reporter
from ..training.runstate import check_recipe_keys

BACKBONES = ("cnn", "swin", "hybrid")
DEFAULT_BACKBONES = {"hybridmim": "cnn", "mim": "hybrid", "hpm": "hybrid"}  # MiM and HPM hide tokens: hybrid only
# --modality → the packaged channels and pre-processing that replace the method recipe's (CT: its own)
MODALITIES = {None: None, "CT": None, "MR": "modality-mr.json"}
# what a pre-training recipe holds (Resources/Recipes/pretrain-*.json): each method's settings in a block of its name
RECIPE_KINDS = {"title": str, "description": str, "method": str, "backbone": str, "network": dict, "channels": list,
                "preprocessing": dict, "train": dict, **{method: dict for method in DEFAULT_BACKBONES}}


def merge_recipes(base: dict, override: dict) -> dict:
    """``override`` on top of ``base``, recursing into objects (a partial recipe changes only what it names); an
    object naming another kind than the base's (a network of another ``name``) replaces it whole, as the base's
    settings are for its own kind."""
    merged = dict(base)
    for key, value in override.items():
        alike = isinstance(value, dict) and isinstance(base.get(key), dict) and \
            value.get("name", base[key].get("name")) == base[key].get("name")
        merged[key] = merge_recipes(base[key], value) if alike else value
    return merged


def load_recipe(method: str | None, backbone: str | None, recipe_file: str | None, modality: str | None = None) -> dict:
    """The packaged default recipe of (method, backbone), its channels and pre-processing replaced by the packaged
    ones of ``modality`` ("MR": Recipes/modality-mr.json; None or "CT": the recipe's own), with ``recipe_file``
    merged over it; "{modality}" in its title and description names the channels' modalities.

    ``method``/``backbone`` given on the command line win over the recipe file's own.
    """
    override = {}
    if recipe_file:
        override = read_json(recipe_file, "recipe", an_object=True)
        check_recipe_keys(override, RECIPE_KINDS)
    method = method or override.get("method", "hybridmim")
    if method not in DEFAULT_BACKBONES:
        raise UserError(f"unknown pre-training method {method!r} (known: {', '.join(DEFAULT_BACKBONES)})")
    backbone = backbone or override.get("backbone", DEFAULT_BACKBONES[method])
    if backbone not in BACKBONES:
        raise UserError(f"unknown backbone {backbone!r} (use {', '.join(BACKBONES)})")
    default = resources_dir() / "Recipes" / f"pretrain-{method}-{backbone}.json"
    if not default.is_file():
        packaged = sorted(p.stem.rsplit("-", 1)[1] for p in default.parent.glob(f"pretrain-{method}-*.json"))
        raise UserError(f"no {method} recipe for the {backbone} backbone (packaged: {', '.join(packaged)})")
    recipe = json.loads(default.read_text(encoding="utf-8"))
    if modality not in MODALITIES:
        raise UserError(f"unknown modality {modality!r} (use {', '.join(m for m in MODALITIES if m)})")
    if MODALITIES[modality]:  # replaced whole: an MR recipe keeps nothing of the CT window or body crop
        recipe.update(json.loads((resources_dir() / "Recipes" / MODALITIES[modality]).read_text(encoding="utf-8")))
    recipe = merge_recipes(recipe, override)
    check_channels(recipe["channels"], "recipe")
    named = "+".join(dict.fromkeys(c.get("modality") or c["name"] for c in recipe["channels"]))
    for key in ("title", "description"):
        if isinstance(recipe.get(key), str):
            recipe[key] = recipe[key].replace("{modality}", named)
    return {**recipe, "method": method, "backbone": backbone}


def run_pretrain(data_paths: list[str], output: str | None, reporter: Reporter, method: str | None = None,
                 backbone: str | None = None, recipe_file: str | None = None, steps: int | None = None,
                 resume: bool = False, overwrite: bool = False, cache: str | None = None, exclude=(),
                 prepare_only: bool = False, device: str = "auto", max_minutes: float | None = None,
                 modality: str | None = None) -> dict:
    from ..volumes import find_cases, is_prepared_folder, load_prepared, prepare_cases
    from ..training.runstate import (StoppedBeforeTraining, StopRequest, check_new_run, load_resume_state,
                                     report_stopped_before_training)
    from .trainer import check_recipe, pretrain, with_options

    if output is None and not prepare_only:
        raise UserError("give the checkpoint to write with -o (or --prepare-only to prepare the data alone)")
    if output is not None and not output.endswith(".safetensors"):
        raise UserError(f"{output}: a checkpoint is a .safetensors file")
    state = None
    if resume and not prepare_only:
        state = load_resume_state(Path(output), "pretrain")
        recipe = state["recipe"]
    else:
        recipe = load_recipe(method, backbone, recipe_file, modality)
        if not prepare_only:
            check_new_run(Path(output), overwrite)
    preprocessing = Preprocessing.from_dict(recipe["preprocessing"])
    if not prepare_only:
        check_recipe(with_options(recipe, steps, max_minutes))

    try:
        with StopRequest(at_once=True):  # a stop while preparing ends the run at once: nothing to save yet
            if len(data_paths) == 1 and is_prepared_folder(data_paths[0]):
                data = load_prepared(Path(data_paths[0]), preprocessing, reporter, exclude=exclude)
            else:
                folder = Path(cache) if cache else cache_dir() / "prepared"
                cases = find_cases(data_paths, exclude, dicom=True, warn=reporter.warning)
                data = prepare_cases(cases, preprocessing, folder, reporter, None, recipe["channels"])
    except StoppedBeforeTraining:
        return report_stopped_before_training(output and Path(output), state is not None, reporter)
    if prepare_only:
        outputs = {"volumes": len(data.volumes), "voxels": sum(v.stored[0].size for v in data.volumes)}
        reporter.done(outputs)
        return outputs
    return pretrain(recipe, data, Path(output), reporter, state, device, steps, max_minutes)
