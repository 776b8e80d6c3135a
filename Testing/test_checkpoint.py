"""Self-describing checkpoints: round trip, metadata validation, refusal of foreign files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from conftest import DEFAULT_MODEL
from hybridmim.atomic import atomic_output, full_suffix
from hybridmim.checkpoint import METADATA_KEY, ModelMeta, load_model, read_metadata, save_checkpoint
from hybridmim.errors import UserError
from hybridmim.networks import build_network
from hybridmim.runfiles import state_path
from hybridmim.torchfiles import load_torch_file, save_torch_file


def tiny_meta() -> ModelMeta:
    """The default model's description (labels, terminology, pre-processing) on a tiny network."""
    meta = read_metadata(DEFAULT_MODEL)
    meta.network = {**meta.network, "features": [4, 8]}
    meta.metrics = {"dice_ct_b": {"liver": 0.9}}
    meta.provenance = {"steps": 3}
    return meta


def test_round_trip_keeps_metadata_and_weights(tmp_path):
    meta = tiny_meta()
    network = build_network(meta.network)
    path = tmp_path / "model.safetensors"
    save_checkpoint(path, network.state_dict(), meta, half=True)

    back = read_metadata(path)
    assert back.to_dict() == meta.to_dict()
    assert [label.name for label in back.labels][:2] == ["spleen", "right kidney"]
    assert back.labels[0].terminology["type"][1] == "78961009"

    _, loaded = load_model(path)
    for name, tensor in network.state_dict().items():
        expected = tensor.half().float() if tensor.is_floating_point() else tensor
        torch.testing.assert_close(loaded.state_dict()[name], expected)
    assert not loaded.training


def _write_with_metadata(path, document, tensors=None):
    tensors = tensors or {"w": torch.zeros(2)}
    text = document if document is None or isinstance(document, str) else json.dumps(document)
    metadata = None if text is None else {METADATA_KEY: text}
    save_file(tensors, str(path), metadata=metadata)


def test_foreign_and_broken_files_are_refused(tmp_path):
    plain = tmp_path / "plain.safetensors"
    _write_with_metadata(plain, None)
    with pytest.raises(UserError, match="not a HybridMIMSegment checkpoint"):
        read_metadata(plain)

    pickle = tmp_path / "official.pt"
    torch.save({"w": torch.zeros(1)}, pickle)
    with pytest.raises(UserError) as refused:
        read_metadata(pickle)
    assert str(refused.value) == (f"{pickle}: a PyTorch file, not one of our checkpoints; an official HybridMIM "
                                  "checkpoint is imported with `hybridmim convert official.pt -o official.safetensors`")
    state = tmp_path / "mine.resume.pt"  # given for its model, beside which training wrote it
    torch.save({"format": 1, "kind": "finetune"}, state)
    with pytest.raises(UserError) as refused:
        read_metadata(state)
    assert str(refused.value) == (f"{state}: a training run's resume state (what --resume continues), not a model; "
                                  "the run writes its model as mine.safetensors")

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        read_metadata(garbage)

    with pytest.raises(UserError, match="no such checkpoint"):
        read_metadata(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(format_version=99), "newer"),
    (lambda d: d.update(format="something-else"), "not a HybridMIMSegment"),
    (lambda d: d.pop("labels"), "incomplete"),
    (lambda d: d["network"].update(out_channels=3), "outputs for 13 labels"),
    (lambda d: d["labels"][0].update(color=[300, 0, 0]), "color"),
    (lambda d: d["labels"][1].update(value=1), "appears twice"),
    (lambda d: d["labels"][0]["terminology"].update(type=["SCT", "1"]), "scheme, value, meaning"),
    (lambda d: d["inference"].update(overlap=1.5), "inference"),
    (lambda d: d.update(task="detection"), "unknown task 'detection'"),
    (lambda d: d.update(task="reconstruction"), "14 outputs for 1 reconstructed channel"),
    # metadata edited by hand or by another tool: each had been a traceback (info, segment)
    (lambda d: d.update(metrics=[0.8]), "its 'metrics' metadata must be an object, got \\[0.8\\]"),
    (lambda d: d.update(provenance="mine"), "its 'provenance' metadata must be an object, got \"mine\""),
    (lambda d: d.update(format_version="2"), "its 'format_version' must be a whole number, got \"2\""),
    (lambda d: d["network"].update(features="wide"), "its network's 'features' \\(or 'feature_size'\\) must be whole"),
    (lambda d: d.update(network="unet"), "its 'network' metadata must be an object"),
    (lambda d: d["preprocessing"].update(spacing="fine"), "pre-processing 'spacing' must be 3 numbers"),
])
def test_invalid_metadata_is_refused_with_a_reason(tmp_path, change, message):
    document = tiny_meta().to_dict()
    change(document)
    path = tmp_path / "bad.safetensors"
    _write_with_metadata(path, document)
    with pytest.raises(UserError, match=message):
        read_metadata(path)


def test_weights_that_do_not_match_the_network_are_refused(tmp_path):
    meta = tiny_meta()
    path = tmp_path / "mismatch.safetensors"
    other = build_network({**meta.network, "features": [4, 16]})
    save_checkpoint(path, other.state_dict(), meta)
    with pytest.raises(UserError, match="do not match"):
        load_model(path)


def test_a_reconstruction_checkpoint_has_no_labels_and_keeps_its_pretraining_settings(tmp_path):
    meta = tiny_meta()
    meta.network = {**meta.network, "out_channels": 1}
    meta.labels, meta.task = [], "reconstruction"
    meta.pretraining = {"method": "hybridmim", "patch_size": 16, "mask_ratio": 0.4}
    path = tmp_path / "pretrained.safetensors"
    save_checkpoint(path, build_network(meta.network).state_dict(), meta)
    back = read_metadata(path)
    assert back.task == "reconstruction" and back.labels == [] and back.pretraining["mask_ratio"] == 0.4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a file every write to fails")
def test_a_full_disk_while_saving_a_model_or_its_resume_state_is_one_line_and_keeps_the_last_save(tmp_path):
    """Both writers raised bare library errors on a full disk (a traceback, exit code 1): safetensors'
    SafetensorError, torch's RuntimeError "unexpected pos"."""
    meta = tiny_meta()
    network = build_network(meta.network)
    model, state = tmp_path / "model.safetensors", state_path(tmp_path / "model.safetensors")
    save_checkpoint(model, network.state_dict(), meta)
    with atomic_output(state) as tmp:
        save_torch_file({"step": 2, "network": network.state_dict()}, tmp)
    saved = {path: path.read_bytes() for path in (model, state)}
    for path in (model, state):  # the disk is full now: every write to the temporary files fails (ENOSPC)
        suffix = full_suffix(path)
        (tmp_path / f".{path.name[:-len(suffix)]}.partial-{os.getpid()}{suffix}").symlink_to("/dev/full")
    with pytest.raises(UserError) as raised:
        save_checkpoint(model, network.state_dict(), meta)
    assert str(raised.value) == f"{model}: cannot be written: No space left on device"
    with pytest.raises(UserError) as raised:
        with atomic_output(state) as tmp:
            save_torch_file({"step": 4, "network": network.state_dict()}, tmp)
    assert str(raised.value) == f"{state}: cannot be written: No space left on device"
    assert {path: path.read_bytes() for path in (model, state)} == saved and sorted(tmp_path.iterdir()) == sorted(saved)
    assert load_torch_file(state, "resume state")["step"] == 2
