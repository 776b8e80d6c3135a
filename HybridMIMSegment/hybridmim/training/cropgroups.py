"""A training step's crops go through the network in groups that fit in memory: all at once where they fit, else
fewer at a time with their gradients summed. That is nearly the same step: the cross-entropy part of the loss is
the same, the Dice part is taken over each group's crops instead of the step's. The CPU's group is sized before
training from the memory a crop was measured to take; a GPU's is halved each time it runs out of memory."""

from __future__ import annotations

import math

import torch

from ..errors import UserError
from ..memory import GIB
from ..progress import Reporter

RESERVE_BYTES = GIB // 2  # the optimiser's state and gradients, made at the first step; validation takes less
#                           than a crop's training


def crop_bytes(network: dict, window) -> int:
    """Host memory one training crop adds to a CPU step (float32 forward and backward). Measured (2026-12-07, torch
    2.13, peak resident memory over a step minus that before it): U-Net 32 channels wide at 96³ 2.06 GiB a crop
    (4 crops 8.25), at 64³ 0.62-0.65; 16 wide at 64³ 0.38; the hybrid network (16 wide) at 64³ 0.36-0.46, at 96³
    1.2; SwinUNETR (48 wide) at 64³ 1.89, at 96³ 5.49. That is 80-118 bytes per voxel and full-resolution channel
    for the convolutional networks, 140-160 for SwinUNETR; rounded up here."""
    width = int(network.get("features", [network.get("feature_size", 48)])[0])
    per_voxel_and_channel = 170 if network.get("name") == "swinunetr" else 120
    return per_voxel_and_channel * math.prod(window) * width


def cpu_group(crops: int, network: dict, window, available: int | None, reporter: Reporter) -> int:
    """How many of a step's ``crops`` the CPU takes at once with ``available`` bytes of memory free (None: not
    known, all of them); says so when fewer than all, refuses where not even one fits."""
    if available is None:
        return crops
    per_crop, size = crop_bytes(network, window), "×".join(map(str, window))
    fit = (available - RESERVE_BYTES) // per_crop
    if fit < 1:
        raise UserError(f"a training crop of {size} voxels needs about {(per_crop + RESERVE_BYTES) / GIB:.1f} GiB of "
                        f"memory and {available / GIB:.1f} GiB is available; close other programs, or train on "
                        "smaller crops (train.window in a recipe)")
    if fit < crops:
        reporter.warning(f"the {crops} crops of a step would need about {(crops * per_crop + RESERVE_BYTES) / GIB:.1f} "
                         f"GiB of memory and {available / GIB:.1f} GiB is available: they go through the network "
                         f"{fit} at a time (the Dice part of the loss taken over those)")
    return min(crops, fit)


def forward_backward(network, loss_fn, x: torch.Tensor, y: torch.Tensor, group: int, amp, scaler) -> float:
    """The step's loss over crops ``x`` (labels ``y``), its gradients accumulated ``group`` crops at a time;
    ``amp()``: the autocast context."""
    total = 0.0
    for first in range(0, len(x), group):
        xs, ys = x[first:first + group], y[first:first + group]
        with amp():
            loss = loss_fn(network(xs).float(), ys) * (len(xs) / len(x))
        scaler.scale(loss).backward()
        total += float(loss.detach())
    return total


def step_halving_on_gpu_memory(run_step, group: int, window, clear_gradients, reporter: Reporter) -> tuple[float, int]:
    """``run_step(group)`` and the group it ran with: each time a GPU runs out of memory the gradients are
    cleared and the step runs again with half the crops at a time (the same crops); with one, a refusal."""
    while True:
        try:
            return run_step(group), group
        except torch.cuda.OutOfMemoryError:
            clear_gradients()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if group == 1:
                raise UserError(f"out of GPU memory with one training crop of {'×'.join(map(str, window))} voxels: "
                                "train on the CPU (--device cpu) or on smaller crops (train.window in a recipe)"
                                ) from None
            reporter.warning(f"out of GPU memory with {group} crops at a time: the steps go on with {group // 2}")
            group //= 2
