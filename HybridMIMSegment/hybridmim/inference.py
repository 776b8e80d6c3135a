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


def count_windows(shape, roi_size, overlap: float) -> int:
    """How many windows MONAI's sliding window visits (each axis padded up to the ROI)."""
    total = 1
    for size, roi in zip(shape, roi_size):
        if size <= roi:
            continue
        interval = max(1, int(roi * (1 - overlap)))
        total *= math.ceil((size - roi) / interval) + 1
    return total


def predict_labels(network: torch.nn.Module, volume: np.ndarray, roi_size, overlap: float, output_values,
                   device: torch.device, reporter: Reporter, sw_batch_size: int = 2) -> np.ndarray:
    """Label values (z, y, x) for a model input ``volume`` (channels, z, y, x)."""
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
        logits = sliding_window_inference(x, roi_size, sw_batch_size, predictor, overlap=overlap, mode="gaussian")
    indices = logits[0].argmax(0).to(torch.int64).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    return lookup[indices]
