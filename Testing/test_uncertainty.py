"""The volume a model is unsure of: probabilities between the bounds, counted per output channel."""

from __future__ import annotations

import numpy as np
import torch

from hybridmim.uncertainty import UNSURE, _unsure_in, unsure_voxels


def test_voxels_are_unsure_for_each_channel_whose_probability_lies_between_the_bounds():
    logits = np.zeros((3, 1, 1, 4), np.float32)
    logits[:, 0, 0, 0] = 0.0  # 1/3 each: unsure of all three
    logits[:, 0, 0, 1] = (10.0, 0.0, 0.0)  # 0.9999 and 0.00005 twice: sure
    logits[:, 0, 0, 2] = (0.0, 0.0, -100.0)  # 0.5, 0.5 and 0: unsure of the first two
    logits[:, 0, 0, 3] = (np.log(0.95), np.log(0.05), -100.0)  # 0.95, 0.05: sure
    assert unsure_voxels(logits).tolist() == [2, 2, 1]


def test_a_volume_of_many_slabs_and_a_torch_tensor_count_alike():
    logits = np.random.default_rng(0).normal(scale=3.0, size=(4, 21, 5, 6)).astype(np.float32)
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=0)
    expected = ((probabilities > UNSURE[0]) & (probabilities < UNSURE[1])).sum(axis=(1, 2, 3))
    assert 0 < expected.min() and expected.max() < logits[0].size
    assert unsure_voxels(logits).tolist() == expected.tolist()
    assert unsure_voxels(torch.from_numpy(logits)).tolist() == expected.tolist()


def test_half_precision_logits_as_autocast_gives_them_are_counted_as_their_float32_values():
    logits = torch.from_numpy(np.random.default_rng(1).normal(scale=3.0, size=(3, 17, 4, 5)).astype(np.float32))
    for half in (torch.float16, torch.bfloat16):
        counts = unsure_voxels(logits.to(half))
        assert counts.dtype == np.int64 and counts.tolist() == unsure_voxels(logits.to(half).float().numpy()).tolist()


def test_the_count_made_with_torch_ops_for_a_gpu_tensor_equals_numpy_s():
    logits = np.random.default_rng(2).normal(scale=3.0, size=(5, 8, 6, 7)).astype(np.float32)
    on_device = _unsure_in(torch.from_numpy(logits), torch)
    assert isinstance(on_device, torch.Tensor) and on_device.tolist() == _unsure_in(logits, np).tolist()
