"""``hybridmim convert``: an official HybridMIM SwinUNETR pre-training checkpoint (.pt) → our format.

The official code saves ``model.state_dict()`` of its pre-training model,
``module.``-prefixed when trained with DDP, sometimes wrapped in a dict
(``state_dict``/``model``/``net``). Its SwinUNETR keys are MONAI's; its
pre-training heads (``pred_mask_region``, ``pred_mask_region_position``,
``contrast_learning_head``) are dropped. The file is read with
``torch.load(weights_only=True)``: a pickle that would run code is refused
before anything runs.
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path

from .atomic import check_new_output
from .checkpoint import ModelMeta, save_checkpoint
from .download import file_sha256
from .errors import UserError
from .preprocessing import Preprocessing
from .torchfiles import load_torch_file

# The official pre-training set-up (ge-xing/HybridMIM, Pretrain/main.py defaults).
OFFICIAL_PREPROCESSING = {
    "orientation": "RAS",
    "spacing": [1.5, 1.5, 2.0],
    "intensity": {"type": "window", "window": [-1000, 1000], "output_range": [0.0, 1.0]},
    "foreground": {"threshold": -500, "margin_mm": 10},
}
OFFICIAL_PRETRAINING = {"method": "hybridmim", "patch_size": 16, "mask_ratio": 0.4, "crop_size": 96}
_WRAPPERS = ("state_dict", "model", "net", "model_state_dict")


def read_official_state(path: Path) -> dict:
    """The tensors of an official checkpoint, prefixes stripped (loaded with weights_only=True)."""
    import torch

    if not path.is_file():
        raise UserError(f"{path}: no such file")
    obj = load_torch_file(path, "PyTorch checkpoint")
    while isinstance(obj, dict) and not any(isinstance(v, torch.Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, dict) or not obj:
        raise UserError(f"{path}: no state dict of tensors in it")
    state = {}
    for key, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[re.sub(r"^(module\.)+", "", key)] = value
    return state


def swin_spec(state: dict, source: Path) -> dict:
    """SwinUNETR hyper-parameters read off the tensor shapes."""
    embed = state.get("swinViT.patch_embed.proj.weight")
    if embed is None:
        raise UserError(f"{source}: not an official HybridMIM SwinUNETR checkpoint (no swinViT.patch_embed weights)")
    depths, heads = [], []
    for stage in range(1, 5):
        blocks = {int(m.group(1)) for k in state if (m := re.match(rf"swinViT\.layers{stage}\.0\.blocks\.(\d+)\.", k))}
        if not blocks:
            raise UserError(f"{source}: Swin stage {stage} is missing")
        depths.append(max(blocks) + 1)
        heads.append(int(state[f"swinViT.layers{stage}.0.blocks.0.attn.relative_position_bias_table"].shape[1]))
    return {"name": "swinunetr", "feature_size": int(embed.shape[0]), "depths": depths, "num_heads": heads,
            "in_channels": int(embed.shape[1]), "out_channels": int(state["out.conv.conv.weight"].shape[0])}


def convert_official(source: str, output: str, overwrite: bool = False) -> dict:
    """Write ``output`` (.safetensors, reconstruction task) from an official ``source``; returns a summary."""
    from .networks import build_network

    source_path, output_path = Path(source), check_new_output(output, overwrite)
    if not output_path.name.endswith(".safetensors"):
        raise UserError(f"{output_path}: a checkpoint is a .safetensors file")
    state = read_official_state(source_path)
    spec = swin_spec(state, source_path)
    if spec["out_channels"] != spec["in_channels"]:
        raise UserError(f"{source_path}: has {spec['out_channels']} outputs for {spec['in_channels']} inputs: "
                        "not a pre-training (reconstruction) checkpoint")
    network = build_network(spec)
    expected = network.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise UserError(f"{source_path}: {len(missing)} SwinUNETR weights missing (first: {missing[0]})")
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        raise UserError(f"{source_path}: {wrong[0]} has shape {tuple(state[wrong[0]].shape)}, "
                        f"expected {tuple(expected[wrong[0]].shape)}")
    dropped = sorted({k.split(".")[0] for k in set(state) - set(expected)})
    network.load_state_dict({k: state[k] for k in expected})

    channels = [{"name": "CT", "modality": "CT"}] if spec["in_channels"] == 1 else \
        [{"name": f"channel {i}", "modality": ""} for i in range(spec["in_channels"])]
    meta = ModelMeta(
        network=spec, channels=channels, preprocessing=Preprocessing.from_dict(OFFICIAL_PREPROCESSING),
        roi_size=(96, 96, 96), overlap=0.5, labels=[], method="hybridmim", task="reconstruction",
        pretraining=dict(OFFICIAL_PRETRAINING),
        title=f"Official HybridMIM SwinUNETR ({source_path.name})",
        description="Converted from an official HybridMIM pre-training checkpoint (ge-xing/HybridMIM); "
                    "pre-processing as in its pre-training defaults.",
        provenance={"converted_from": source_path.name, "sha256": file_sha256(source_path),
                    "dropped": dropped, "created": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
    save_checkpoint(output_path, network.state_dict(), meta)
    return {"checkpoint": str(output_path), "network": spec, "dropped": dropped}
