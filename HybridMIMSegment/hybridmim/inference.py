"""Device choice and sliding-window inference (MONAI, Gaussian blending)."""

from __future__ import annotations

import math

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


def load_and_prepare(inputs, checkpoint, meta, device: str, reporter: Reporter):
    """The run-time start of ``segment`` and ``reconstruct``: read the input images, load the
    network on the chosen device, and bring the images to the model's grid.

    Returns (channels as read, ModelInput, network, torch device).
    """
    from .checkpoint import load_model
    from .imageio import read_channels
    from .modelgrid import prepare

    reporter.stage("read")
    channels = read_channels(inputs, reporter.warning)
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


def sliding_window(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, device: torch.device,
                   reporter: Reporter, sw_batch_size: int = 2) -> torch.Tensor:
    """The network's output (1, out_channels, z, y, x) over a whole model input ``volume`` (channels, z, y, x),
    windows blended with Gaussian weights; progress per batch of windows."""
    from monai.inferers import sliding_window_inference

    windows = count_windows(volume.shape[1:], roi_size, overlap)
    batches = math.ceil(windows / sw_batch_size)
    calls = 0

    def predictor(x: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        out = network(x)
        calls += 1
        reporter.progress(min(calls, batches), batches)
        return out

    x = torch.from_numpy(volume)[None].to(device)
    autocast = torch.autocast("cuda", dtype=torch.float16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    with torch.inference_mode(), autocast:
        return sliding_window_inference(x, roi_size, sw_batch_size, predictor, overlap=overlap, mode="gaussian")


def predict_labels(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, output_values,
                   device: torch.device, reporter: Reporter, sw_batch_size: int = 2) -> np.ndarray:
    """Label values (z, y, x) for a model input ``volume`` (channels, z, y, x)."""
    logits = sliding_window(network, volume, roi_size, overlap, device, reporter, sw_batch_size)
    indices = logits[0].argmax(0).to(torch.int64).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    return lookup[indices]
