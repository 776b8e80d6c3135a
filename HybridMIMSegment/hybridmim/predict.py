"""The inference run that ``segment``, ``reconstruct`` and ``evaluate`` share, importing torch only
where it runs: the network for the chosen device (on the CPU its ONNX export run by OpenVINO, see
onnxnet.py), the model input, and label maps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .devices import resolve_device
from .onnxnet import OnnxNetwork, cached_onnx_network, export_onnx_network, openvino_runs_here
from .progress import Reporter


def load_network(checkpoint: Path, meta, device: str, reporter: Reporter, onnx: bool = True):
    """The network of ``checkpoint`` (metadata ``meta``) for ``device`` (``cpu`` or ``cuda``).

    On the CPU its cached ONNX export, made on the first run (``onnxnet``). The built torch network
    on a GPU (where autocast applies), for a caller that needs more than its forward
    (``onnx=False``), where OpenVINO is not installed and where the export fails.
    """
    use_onnx = onnx and device == "cpu" and openvino_runs_here(reporter)
    if use_onnx:
        cached = cached_onnx_network(checkpoint, meta, reporter)
        if cached is not None:
            return cached
    import torch

    from .checkpoint import load_model

    built = load_model(checkpoint, torch.device(device))[1]
    if use_onnx:
        exported = export_onnx_network(built, checkpoint, meta, reporter)
        if exported is not None:
            return exported
    return built


def load_and_prepare(reading, checkpoint, meta, device: str, reporter: Reporter, windows=None, onnx: bool = True):
    """The run-time start of ``segment`` and ``reconstruct``: the input images from ``reading``
    (``imageio.start_reading``), the device and the network (``onnx``: see
    ``load_network``), and the images on the model's grid (``windows``: see ``modelgrid.prepare``).

    Returns (channels as read, ModelInput, network, device: ``cpu`` or ``cuda``).
    """
    from .modelgrid import prepare
    from .scancheck import checked_channels, warn_if_thinner_than_window

    modalities = [c.get("modality", "") for c in meta.channels]
    channels = checked_channels(reading.result(reporter.warning), reading.paths, modalities, reporter.warning)
    warn_if_thinner_than_window(channels[0], str(reading.paths[0]), meta.preprocessing, meta.roi_size,
                                reporter.warning)
    device = resolve_device(device, reporter)  # after the scan's checks: a bad scan gets one line and no more
    network = load_network(checkpoint, meta, device, reporter, onnx)
    reporter.stage("preprocess")
    return channels, prepare(channels, meta.preprocessing, windows=windows), network, device


def predict_labels(network, volume: np.ndarray, roi_size, overlap: float, output_values, device: str,
                   reporter: Reporter, sw_batch_size: int = 2) -> np.ndarray:
    """Label values (z, y, x) for a model input ``volume`` (channels, z, y, x)."""
    if isinstance(network, OnnxNetwork):
        indices = network.sliding_window(volume, roi_size, overlap, reporter).argmax(0)
    else:
        import torch

        from .inference import sliding_window

        logits = sliding_window(network, volume, roi_size, overlap, torch.device(device), reporter, sw_batch_size)
        indices = logits[0].argmax(0).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    return lookup[indices]
