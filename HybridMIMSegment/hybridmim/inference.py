"""Device choice and sliding-window inference (MONAI, Gaussian blending)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import UserError
from .progress import Reporter


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


def load_and_prepare(inputs, checkpoint, meta, device: str, reporter: Reporter):
    """The run-time start of ``segment`` and ``reconstruct``: read the input images, load the
    network on the chosen device, and bring the images to the model's grid.

    Returns (channels as read, ModelInput, network, torch device).
    """
    from .checkpoint import load_model
    from .imageio import read_channels
    from .memory import check_fits, header_size, segment_bytes
    from .modelgrid import prepare
    from .scancheck import checked_channels

    reporter.stage("read")
    header = header_size(inputs[0])
    if header is not None:
        size, spacing = header
        needed = segment_bytes(size, spacing, len(inputs), int(meta.network["out_channels"]), meta.preprocessing.spacing)
        check_fits(needed, f"{Path(inputs[0]).name} ({' x '.join(map(str, size))} voxels)")
    modalities = [c.get("modality", "") for c in meta.channels]
    channels = checked_channels(read_channels(inputs, reporter.warning), inputs, modalities, reporter.warning)
    torch_device = select_device(device, reporter)
    _, network = load_model(checkpoint, torch_device)
    reporter.stage("preprocess")
    return channels, prepare(channels, meta.preprocessing), network, torch_device


def count_windows(shape, roi_size, overlap: float) -> int:
    """How many windows MONAI's sliding window visits (each axis padded up to the ROI)."""
    total = 1
    for size, roi in zip(shape, roi_size):
        if size <= roi:
            continue
        interval = max(1, int(roi * (1 - overlap)))
        total *= math.ceil((size - roi) / interval) + 1
    return total


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
    """The plans to try in order: on a GPU, as asked (output blended on the GPU only when it fits
    in half its free memory), then one window at a time blending on the host, then the CPU."""
    if device_type != "cuda":
        return [WindowPlan("cpu", "cpu", batch)]
    fits = free_gpu_bytes is not None and output_bytes < free_gpu_bytes // 2
    plans = [WindowPlan("cuda", "cuda" if fits else "cpu", batch), WindowPlan("cuda", "cpu", 1),
             WindowPlan("cpu", "cpu", batch)]
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


def _sliding_window(network, volume: np.ndarray, roi_size, overlap: float, plan: WindowPlan, reporter: Reporter):
    from monai.inferers import sliding_window_inference

    windows = count_windows(volume.shape[1:], roi_size, overlap)
    batches = math.ceil(windows / plan.batch)
    calls = 0
    network = network.to(plan.window_device)

    def predictor(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        out = network(x)
        calls += 1
        reporter.progress(min(calls, batches), batches)
        return out

    x = torch.from_numpy(volume)[None].to(plan.output_device)
    on_gpu = plan.window_device == "cuda"
    autocast = torch.autocast("cuda", dtype=torch.float16) if on_gpu else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        return sliding_window_inference(x, roi_size, plan.batch, predictor, overlap=overlap, mode="gaussian",
                                        sw_device=plan.window_device, device=plan.output_device)


def predict_labels(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, output_values,
                   device: torch.device, reporter: Reporter, sw_batch_size: int = 2) -> np.ndarray:
    """Label values (z, y, x) for a model input ``volume`` (channels, z, y, x)."""
    logits = sliding_window(network, volume, roi_size, overlap, device, reporter, sw_batch_size)
    indices = logits[0].argmax(0).to(torch.int64).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    return lookup[indices]
