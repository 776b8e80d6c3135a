"""Supervised segmentation training from a recipe (network, pre-processing, labels, data, schedule)."""

from __future__ import annotations

import json
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..checkpoint import ModelMeta, save_checkpoint
from ..download import file_sha256
from ..errors import UserError
from ..imageio import read_channels, read_volume
from ..labels import parse_labels
from ..modelgrid import prepare
from ..preprocessing import Preprocessing
from ..progress import Reporter


def meta_from_recipe(recipe: dict, recipe_dir: Path) -> ModelMeta:
    labels_source = recipe["labels"]
    if isinstance(labels_source, str):
        labels_path = recipe_dir / labels_source
        labels = parse_labels(json.loads(labels_path.read_text(encoding="utf-8")), str(labels_path))
    else:
        labels = parse_labels(labels_source)
    channels = recipe["channels"]
    network = {**recipe["network"], "in_channels": len(channels), "out_channels": len(labels) + 1}
    return ModelMeta(
        network=network,
        channels=channels,
        preprocessing=Preprocessing.from_dict(recipe["preprocessing"]),
        roi_size=tuple(recipe["inference"]["roi_size"]),
        overlap=float(recipe["inference"].get("overlap", 0.5)),
        labels=labels,
        method=recipe.get("method", "supervised from scratch"),
        title=recipe.get("title", ""),
        description=recipe.get("description", ""),
    )


def load_case(images: list[Path], label: Path, meta: ModelMeta) -> tuple[np.ndarray, np.ndarray]:
    """(image (C, z, y, x) float32, label (1, z, y, x) as output-channel indices) on the model grid."""
    channels = read_channels(images)
    label_image = read_volume(label)
    model_input = prepare(channels, meta.preprocessing, sitk.Cast(label_image, sitk.sitkUInt16))
    lookup = np.zeros(int(model_input.label.max()) + 1, dtype=np.uint8)
    for index, value in enumerate(meta.output_values):
        if value < lookup.size:
            lookup[value] = index
    return model_input.array, lookup[model_input.label][None]


def train_supervised(recipe_path: Path, data_root: Path, output: Path, reporter: Reporter) -> ModelMeta:
    import monai
    import torch
    from monai.losses import DiceCELoss

    from ..networks import build_network
    from .augment import segmentation_augmentations
    from .schedule import warmup_cosine

    monai.data.set_track_meta(False)  # plain tensors: faster, and nothing here needs the metadata
    recipe = json.loads(recipe_path.read_text(encoding="utf-8"))
    train = recipe["train"]
    meta = meta_from_recipe(recipe, recipe_path.parent)
    torch.manual_seed(train.get("seed", 0))
    torch.set_num_threads(train.get("num_threads", torch.get_num_threads()))

    reporter.stage("load")
    cases, data_files = [], []
    for entry in train["cases"]:
        images = [data_root / p for p in entry["images"]]
        label = data_root / entry["label"]
        cases.append(load_case(images, label, meta))
        data_files += [{"file": str(p), "sha256": file_sha256(data_root / p)} for p in entry["images"] + [entry["label"]]]
    if not cases:
        raise UserError(f"{recipe_path}: no training cases")

    augment = segmentation_augmentations(meta.roi_size, len(meta.labels) + 1, train["batch_size"])
    augment.set_random_state(seed=train.get("seed", 0))
    network = build_network(meta.network)
    optimiser = torch.optim.AdamW(network.parameters(), lr=train["lr"], weight_decay=train.get("weight_decay", 1e-5))
    steps, warmup = int(train["steps"]), int(train.get("warmup_steps", 50))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: warmup_cosine(s, warmup, steps))
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)

    reporter.stage("train")
    network.train()
    started, running = time.time(), []
    rng = np.random.default_rng(train.get("seed", 0))
    for step in range(steps):
        image, label = cases[int(rng.integers(len(cases)))]
        crops = augment({"image": torch.from_numpy(image), "label": torch.from_numpy(label)})
        x = torch.stack([c["image"] for c in crops]).float()
        y = torch.stack([c["label"] for c in crops]).long()
        loss = loss_fn(network(x), y)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        scheduler.step()
        running.append(loss.item())
        reporter.progress(step + 1, steps)
        if (step + 1) % train.get("log_every", 25) == 0 or step + 1 == steps:
            reporter.metric(step=step + 1, loss=float(np.mean(running)), lr=scheduler.get_last_lr()[0],
                            seconds=round(time.time() - started, 1))
            running = []

    meta.provenance = {
        "recipe": recipe,
        "data": data_files,
        "steps": steps,
        "train_seconds": round(time.time() - started, 1),
        "final_loss": loss.item(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "software": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
        "machine": f"{platform.machine()} CPU, {torch.get_num_threads()} threads",
    }
    reporter.stage("save")
    save_checkpoint(output, network.state_dict(), meta, half=recipe.get("half_precision", True))
    reporter.done({"checkpoint": str(output)})
    return meta
