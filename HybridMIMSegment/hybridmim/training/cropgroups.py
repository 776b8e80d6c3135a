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

RESERVE_BYTES = GIB // 2  # the data's crops and augmentations, libraries' buffers; validation takes less than a crop
BYTES_PER_PARAMETER = 16  # the weights' gradients and the optimiser's two moments (AdamW), and its step's temporary


def crop_bytes(network: dict, window) -> int:
    """Host memory one training crop's activations add to a CPU step (float32 forward and backward). Measured
    (2026-12-07, torch 2.13, peak resident memory over two or three steps minus that before them, less
    ``BYTES_PER_PARAMETER`` a weight): U-Net 32 channels wide at 64³ 82-88 bytes per voxel and full-resolution
    channel, at 96³ (4 crops) 80; the hybrid network (16 wide) at 64³ 99, at 96³ 83; SwinUNETR (48 wide) at 64³
    138. Rounded up here."""
    width = int(network.get("features", [network.get("feature_size", 48)])[0])
    per_voxel_and_channel = 150 if network.get("name") == "swinunetr" else 100
    return per_voxel_and_channel * math.prod(window) * width


def cpu_group(crops: int, network: dict, parameters: int, window, available: int | None, reporter: Reporter) -> int:
    """How many of a step's ``crops`` the CPU takes at once with ``available`` bytes of memory free (None: not
    known, all of them), for a ``network`` of ``parameters`` weights; says so when fewer than all, refuses where
    not even one fits."""
    if available is None:
        return crops
    per_crop, size = crop_bytes(network, window), "×".join(map(str, window))
    fixed = RESERVE_BYTES + BYTES_PER_PARAMETER * parameters
    fit = (available - fixed) // per_crop
    if fit < 1:
        raise UserError(f"a training crop of {size} voxels needs about {(per_crop + fixed) / GIB:.1f} GiB of "
                        f"memory and {available / GIB:.1f} GiB is available; close other programs, or train on "
                        "smaller crops (train.window in a recipe)")
    if fit < crops:
        reporter.warning(f"the {crops} crops of a step would need about {(crops * per_crop + fixed) / GIB:.1f} "
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


def step_halving_on_gpu_memory(run_step, group: int, clear_gradients, reporter: Reporter, what: str,
                               refusal: str) -> tuple:
    """``run_step(group)`` and the group it ran with: each time a GPU runs out of memory the gradients are
    cleared and the step runs again with half as many of its ``what`` at a time (the same step); with one, the
    one-line ``refusal``."""
    while True:
        try:
            return run_step(group), group
        except torch.cuda.OutOfMemoryError:
            clear_gradients()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if group == 1:
                raise UserError(refusal) from None
            reporter.warning(f"out of GPU memory with {group} {what} at a time: the steps go on with {group // 2}")
            group //= 2
