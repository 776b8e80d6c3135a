"""Device choice and sliding-window inference (MONAI's window layout and Gaussian blending)."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from .errors import UserError
from .progress import Reporter
from .windows import window_starts


def select_device(requested: str, reporter: Reporter) -> torch.device:
    """``auto``: CUDA when present, else CPU; ``cuda`` without CUDA falls back to CPU and says so."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {requested!r} (use auto, cpu or cuda)")
    if requested == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda")
        props = torch.cuda.get_device_properties(device)
        reporter.info(f"using GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB)")
        return device
    if requested == "cuda":
        reporter.warning("CUDA was requested but no usable GPU was found: running on the CPU (slower)")
    else:
        reporter.info("no GPU found: running on the CPU")
    return torch.device("cpu")


def available_devices() -> dict:
    """What this machine offers: torch's version, CPU threads, and each CUDA GPU with its memory."""
    gpus = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            gpus.append({"index": index, "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1)})
    return {"torch": torch.__version__, "cpu_threads": torch.get_num_threads(), "gpus": gpus}


def load_and_prepare(reading, checkpoint, meta, device: str, reporter: Reporter, windows=None, trace: bool = True):
    """The run-time start of ``segment`` and ``reconstruct``: the input images from ``reading``
    (``imageio.start_reading``, under way while torch was imported), the network on the chosen
    device (``trace``: see ``traced.load_for_inference``), and the images on the model's grid
    (``windows``: see ``modelgrid.prepare``).

    Returns (channels as read, ModelInput, network, torch device).
    """
    from .modelgrid import prepare
    from .scancheck import checked_channels
    from .traced import load_for_inference

    modalities = [c.get("modality", "") for c in meta.channels]
    channels = checked_channels(reading.result(reporter.warning), reading.paths, modalities, reporter.warning)
    torch_device = select_device(device, reporter)
    network, _ = load_for_inference(checkpoint, meta, torch_device, reporter, trace)
    reporter.stage("preprocess")
    return channels, prepare(channels, meta.preprocessing, windows=windows), network, torch_device


@dataclass(frozen=True)
class WindowPlan:
    """Where sliding-window inference runs: windows on ``window_device``, ``batch`` at a time,
    blended into an output buffer on ``output_device``."""

    window_device: str
    output_device: str
    batch: int

    def describe(self) -> str:
        where = "the CPU" if self.window_device == "cpu" else "the GPU"
        if self.window_device != self.output_device:
            where += ", blending in host memory"
        return f"{self.batch} window(s) at a time on {where}"


def window_plans(device_type: str, output_bytes: int, free_gpu_bytes: int | None, batch: int) -> list[WindowPlan]:
    """The plans to try in order: on a GPU, ``batch`` windows at a time (output blended on the GPU
    only when it fits in half its free memory), then one window at a time blending on the host,
    then the CPU. The CPU takes one window at a time: as fast as two on 2 cores (10.7 s for the
    25 windows of ct_b either way) and 176 MB lighter."""
    if device_type != "cuda":
        return [WindowPlan("cpu", "cpu", 1)]
    fits = free_gpu_bytes is not None and output_bytes < free_gpu_bytes // 2
    plans = [WindowPlan("cuda", "cuda" if fits else "cpu", batch), WindowPlan("cuda", "cpu", 1),
             WindowPlan("cpu", "cpu", 1)]
    return [p for i, p in enumerate(plans) if p not in plans[:i]]


def run_with_fallbacks(plans: list[WindowPlan], run, reporter: Reporter):
    """``run(plan)`` for the first plan that does not run out of GPU memory; says so on each retry."""
    for plan, following in zip(plans, plans[1:] + [None]):
        try:
            return run(plan)
        except torch.cuda.OutOfMemoryError:
            if following is None:
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reporter.warning(f"out of GPU memory with {plan.describe()}; retrying with {following.describe()}")
    raise ValueError("no plan to run")


def sliding_window(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, device: torch.device,
                   reporter: Reporter, sw_batch_size: int = 2) -> torch.Tensor:
    """The network's output (1, out_channels, z, y, x) over a whole model input ``volume`` (channels, z, y, x),
    windows blended with Gaussian weights; progress per batch of windows. On a GPU, running out
    of memory retries with fewer windows and host-memory blending, then on the CPU."""
    output_bytes = math.prod(volume.shape[1:]) * (network.out_channels + 1) * 4
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    plans = window_plans(device.type, output_bytes, free, sw_batch_size)
    return run_with_fallbacks(plans, lambda plan: _sliding_window(network, volume, roi_size, overlap, plan, reporter),
                              reporter)


def gaussian_weights(roi_size) -> torch.Tensor:
    """MONAI's "gaussian" blending weights for one window: sigma = roi / 8 per axis, peak 1, floor 1e-3."""
    weights = None
    for roi in roi_size:
        x = torch.arange(-(roi - 1) / 2.0, (roi - 1) / 2.0 + 1, dtype=torch.float)
        axis = torch.exp(x**2 / (-2 * (roi * 0.125) ** 2))
        weights = axis if weights is None else weights.unsqueeze(-1) * axis
    return weights.clamp(min=max(weights.min().item(), 1e-3))


def _sliding_window(network, volume: np.ndarray, roi_size, overlap: float, plan: WindowPlan, reporter: Reporter):
    """MONAI's sliding-window inference (same windows, padding and weights: results agree with
    ``sliding_window_inference`` to float rounding), written out so that inference needs no MONAI
    import (2 s of a cold start on a 2-core CPU) and keeps the input on the host."""
    roi = tuple(int(r) for r in roi_size)
    shape = volume.shape[1:]
    # An axis shorter than the window is padded with zeros, split evenly (MONAI's padding).
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(shape, roi)]
    x = torch.nn.functional.pad(torch.from_numpy(volume), [v for pad in reversed(pads) for v in pad])
    padded = tuple(x.shape[1:])
    starts = list(itertools.product(*(window_starts(n, r, overlap) for n, r in zip(padded, roi))))
    batches = math.ceil(len(starts) / plan.batch)
    weights = gaussian_weights(roi).to(plan.output_device)
    weight_sum = torch.zeros(padded, device=plan.output_device)
    output = None
    network = network.to(plan.window_device)
    on_gpu = plan.window_device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if on_gpu else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        for batch, first in enumerate(range(0, len(starts), plan.batch)):
            boxes = [tuple(slice(s, s + r) for s, r in zip(start, roi)) for start in starts[first:first + plan.batch]]
            windows = torch.stack([x[(slice(None), *box)] for box in boxes]).to(plan.window_device)
            predicted = network(windows).to(plan.output_device, torch.float32)
            if output is None:
                output = torch.zeros((predicted.shape[1], *padded), device=plan.output_device)
            for window, box in zip(predicted, boxes):
                output[(slice(None), *box)] += window * weights
                weight_sum[box] += weights
            reporter.progress(batch + 1, batches)
        output /= weight_sum
    inside = tuple(slice(before, before + n) for (before, _), n in zip(pads, shape))
    return output[(slice(None), *inside)][None]


def predict_labels(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, output_values,
                   device: torch.device, reporter: Reporter, sw_batch_size: int = 2) -> np.ndarray:
    """Label values (z, y, x) for a model input ``volume`` (channels, z, y, x)."""
    logits = sliding_window(network, volume, roi_size, overlap, device, reporter, sw_batch_size)
    indices = logits[0].argmax(0).to(torch.int64).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    return lookup[indices]
