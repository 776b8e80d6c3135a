"""A training step's crops in groups that fit in memory (hybridmim.training.cropgroups)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import WarningsKept
from test_reliability import _RunsOutOfMemoryOnBatches
from hybridmim.errors import UserError
from hybridmim.memory import GIB
from hybridmim.networks import build_network
from hybridmim.progress import Reporter
from hybridmim.training.cropgroups import BYTES_PER_PARAMETER, RESERVE_BYTES, cpu_group, crop_bytes, \
    forward_backward, step_halving_on_gpu_memory

UNET = {"name": "unet", "features": [32, 32, 64, 128, 256], "dropout": 0.1}  # the shipped CT models'
HYBRID = {"name": "hybrid", "features": [16, 48, 96, 192], "embed_dim": 384, "depth": 4, "num_heads": 6}

# Two CPU training steps in a fresh process: the peak resident memory they add, in bytes, and the network's weights.
_MEASURE_STEPS = """
import json, sys, torch
from monai.losses import DiceCELoss
from hybridmim.memory import peak_rss_bytes
from hybridmim.networks import build_network
spec, crops, size = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
network = build_network({**spec, "in_channels": 1, "out_channels": 2})
optimiser = torch.optim.AdamW(network.parameters())
loss = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
x = torch.rand(crops, 1, size, size, size)
y = (torch.rand(crops, 1, size, size, size) > 0.9).long()
before = peak_rss_bytes()
for step in range(2):  # the second with the optimiser's moments made at the first
    loss(network(x), y).backward()
    optimiser.step()
    optimiser.zero_grad(set_to_none=True)
print(peak_rss_bytes() - before, sum(p.numel() for p in network.parameters()))
"""


def _no_autocast():
    return torch.autocast("cpu", enabled=False)


@pytest.mark.parametrize("network", [UNET, HYBRID], ids=["unet", "hybrid"])
def test_a_crops_estimated_memory_covers_what_cpu_steps_take_and_not_twice_over(network):
    """Measured in a process of its own: two steps of one 64³ crop (forward, backward, the optimiser)."""
    measured, parameters = map(int, subprocess.run(
        [sys.executable, "-c", _MEASURE_STEPS, json.dumps(network), "1", "64"], check=True, capture_output=True,
        text=True).stdout.split())
    estimate = crop_bytes(network, (64, 64, 64)) + BYTES_PER_PARAMETER * parameters
    assert measured < estimate + RESERVE_BYTES and estimate < 2 * measured, (measured, estimate)


def test_the_cpu_takes_the_crops_that_fit_and_says_so_and_refuses_where_not_one_does():
    """The shipped U-Net (5,749,410 weights: 0.09 GiB with their gradients and moments) on 96³ crops."""
    per_crop, reporter, weights = crop_bytes(UNET, (96, 96, 96)), WarningsKept(), 5_749_410
    fixed = RESERVE_BYTES + BYTES_PER_PARAMETER * weights
    assert per_crop == 100 * 96**3 * 32  # 2.64 GiB
    assert cpu_group(4, UNET, weights, (96, 96, 96), None, reporter) == 4  # memory not known: all
    assert cpu_group(4, UNET, weights, (96, 96, 96), fixed + 4 * per_crop, reporter) == 4 and not reporter.warnings
    assert cpu_group(4, UNET, weights, (96, 96, 96), fixed + 2 * per_crop + GIB, reporter) == 2
    assert reporter.warnings == ["the 4 crops of a step would need about 11.1 GiB of memory and 6.9 GiB is available: "
                                 "they go through the network 2 at a time (the Dice part of the loss taken over those)"]
    with pytest.raises(UserError, match=r"^a training crop of 96×96×96 voxels needs about 3.2 GiB of memory and 3.0 "
                                        r"GiB is available; close other programs, or train on smaller crops"):
        cpu_group(4, UNET, weights, (96, 96, 96), 3 * GIB, reporter)


def test_crops_taken_in_groups_give_the_gradients_of_all_at_once():
    """With a loss that is a mean over the crops (cross-entropy), one at a time, two at a time and all four sum to
    the same gradients and loss."""
    from monai.losses import DiceCELoss

    torch.manual_seed(0)
    network = build_network({"name": "unet", "features": [4, 8], "in_channels": 1, "out_channels": 2})
    x = torch.rand(4, 1, 16, 16, 16)
    y = (torch.rand(4, 1, 16, 16, 16) > 0.8).long()
    cross_entropy = DiceCELoss(to_onehot_y=True, softmax=True, lambda_dice=0.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)
    results = []
    for group in (4, 2, 1):
        network.zero_grad(set_to_none=True)
        loss = forward_backward(network, cross_entropy, x, y, group, _no_autocast, scaler)
        results.append((loss, [p.grad.clone() for p in network.parameters()]))
    for loss, gradients in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-6)
        for got, expected in zip(gradients, results[0][1]):
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)


def test_a_gpu_out_of_memory_halves_the_group_and_runs_the_same_step_again_down_to_one_crop():
    network = _RunsOutOfMemoryOnBatches(build_network({"name": "unet", "features": [4, 8], "in_channels": 1,
                                                       "out_channels": 2}))
    x, y = torch.rand(4, 1, 16, 16, 16), (torch.rand(4, 1, 16, 16, 16) > 0.8).long()
    cleared, reporter = [], WarningsKept()

    def run_step(group):
        return forward_backward(network, lambda p, t: p.mean(), x, y, group, _no_autocast,
                                torch.amp.GradScaler("cuda", enabled=False))

    loss, group = step_halving_on_gpu_memory(run_step, 4, lambda: cleared.append(1), reporter, "crops", "none")
    assert group == 1 and len(cleared) == 2 and loss == pytest.approx(network.network(x).mean().item(), rel=1e-5)
    assert reporter.warnings == ["out of GPU memory with 4 crops at a time: the steps go on with 2",
                                 "out of GPU memory with 2 crops at a time: the steps go on with 1"]

    def always_out_of_memory(group):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    with pytest.raises(UserError, match="^what to do$"):
        step_halving_on_gpu_memory(always_out_of_memory, 2, lambda: None, Reporter("quiet"), "crops", "what to do")
