"""Import of official HybridMIM SwinUNETR checkpoints: tensors kept, heads dropped, unsafe pickles refused."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file

from conftest import run_cli_here
from hybridmim.checkpoint import load_model
from hybridmim.networks import build_network

TINY_SWIN = {"name": "swinunetr", "in_channels": 1, "out_channels": 1, "feature_size": 12,
             "depths": [1, 2, 1, 1], "num_heads": [1, 2, 2, 4]}


def official_state() -> dict:
    """What the official pre-training script saves: its model's state dict under DDP (``module.``),
    with the region and contrastive heads beside the SwinUNETR weights."""
    torch.manual_seed(0)
    swin = build_network(TINY_SWIN)
    state = {f"module.{k}": v for k, v in swin.state_dict().items()}
    state["module.pred_mask_region.weight"] = torch.randn(9, 192)
    state["module.pred_mask_region_position.weight"] = torch.randn(8, 192)
    state["module.contrast_learning_head.weight"] = torch.randn(384, 192)
    return state


def test_official_checkpoint_converts_with_every_tensor_kept(tmp_path):
    state = official_state()
    source = tmp_path / "model_final_epoch.pt"
    torch.save({"epoch": 100, "state_dict": state}, source)
    output = tmp_path / "official.safetensors"
    result = run_cli_here("convert", source, "-o", output, check_rc=0)
    assert "depths [1, 2, 1, 1]" in result.stderr and "pred_mask_region" in result.stderr

    converted = load_file(str(output))
    expected = {k.removeprefix("module."): v for k, v in state.items()
                if not k.startswith(("module.pred_mask", "module.contrast"))}
    assert converted.keys() == expected.keys()
    for key, value in expected.items():
        assert torch.equal(converted[key], value), key

    meta, network = load_model(output)
    assert meta.task == "reconstruction" and meta.labels == []
    assert meta.network["feature_size"] == 12 and meta.network["depths"] == [1, 2, 1, 1]
    assert meta.network["num_heads"] == [1, 2, 2, 4]
    assert sorted(meta.provenance["dropped"]) == ["contrast_learning_head", "pred_mask_region",
                                                 "pred_mask_region_position"]
    assert len(meta.provenance["sha256"]) == 64
    # it runs
    with torch.no_grad():
        assert network(torch.rand(1, 1, 64, 64, 64)).shape == (1, 1, 64, 64, 64)

    again = run_cli_here("convert", source, "-o", output, check_rc=2)
    assert "already exists" in again.stderr


class _RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    source = tmp_path / "evil.pt"
    torch.save({"state_dict": official_state(), "extra": payload}, source)
    assert not marker.exists()

    result = run_cli_here("convert", source, "-o", tmp_path / "out.safetensors", check_rc=2)
    assert "refused" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not marker.exists(), "loading the checkpoint ran its code"
    assert not (tmp_path / "out.safetensors").exists()
    # and the payload is real: an unsafe load does run it
    torch.load(source, weights_only=False)
    assert marker.exists()


def test_other_files_are_refused_with_one_line(tmp_path, refused):
    unet = tmp_path / "unet.pt"
    network = build_network({"name": "unet", "in_channels": 1, "out_channels": 1, "features": [4, 8]})
    torch.save(network.state_dict(), unet)
    refused("convert", unet, "-o", tmp_path / "a.safetensors", message="not an official HybridMIM SwinUNETR checkpoint")

    segmentation = tmp_path / "seg.pt"
    torch.save(build_network({**TINY_SWIN, "out_channels": 14}).state_dict(), segmentation)
    refused("convert", segmentation, "-o", tmp_path / "b.safetensors",
            message="not a pre-training (reconstruction) checkpoint")

    partial = {k: v for k, v in official_state().items() if "decoder1." not in k}
    torch.save(partial, tmp_path / "partial.pt")
    refused("convert", tmp_path / "partial.pt", "-o", tmp_path / "c.safetensors", message="SwinUNETR weights missing")

    (tmp_path / "text.pt").write_text("hello")
    refused("convert", tmp_path / "text.pt", "-o", tmp_path / "d.safetensors",
            message="not a readable PyTorch checkpoint")
    saved = (tmp_path / "partial.pt").read_bytes()
    damaged = {"empty": b"", "one byte": b"x", "damaged pickle": b"\x80\x05garbage", "truncated": saved[:600],
               "cut short": saved[:len(saved) // 2]}
    for name, content in damaged.items():
        (tmp_path / f"{name}.pt").write_bytes(content)
        line = refused("convert", tmp_path / f"{name}.pt", "-o", tmp_path / "d.safetensors",
                       message="not a readable PyTorch checkpoint (")
        assert "would run code" not in line  # damage is not mistaken for code that loading would run
        assert "If you are seeing this error" not in line  # torch's advice to its own developers is left out
    refused("convert", tmp_path / "missing.pt", "-o", tmp_path / "e.safetensors", message="no such file")
    assert not list(tmp_path.glob("*.safetensors"))
