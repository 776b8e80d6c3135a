"""The inference run that ``segment``, ``reconstruct`` and ``evaluate`` share, importing torch only
where it runs: the network for the chosen device (on the CPU its ONNX export run by OpenVINO, see
onnxnet.py), the model input, and label maps."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .devices import gpu_may_run, resolve_device, start_torch_imports
from .errors import UserError
from .onnxnet import (OnnxNetwork, cached_onnx_network, export_onnx_network, onnx_path, openvino_runs_here,
                      start_compiling_cached_export)
from .progress import Reporter
from .uncertainty import unsure_voxels


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


def checked_inputs(images, paths, meta, warn) -> list:
    """Input channels as read, made finite and checked against what the model of ``meta`` expects
    (modality of each channel; a warning for a scan thinner than half its window)."""
    from .scancheck import checked_channels, warn_if_thinner_than_window

    modalities = [c.get("modality", "") for c in meta.channels]
    channels = checked_channels(images, paths, modalities, warn)
    warn_if_thinner_than_window(channels[0], str(paths[0]), meta.preprocessing, meta.roi_size, warn)
    return channels


def cases_fitted_to_model(cases, meta, model_name: str, warn) -> list:
    """``cases`` (volumes.Case) with the channels of the model of ``meta`` (channelnames.fitted_to_model), each
    refused where it has another number of them."""
    from .channelnames import fitted_to_model

    fitted = fitted_to_model(cases, meta.channels, warn)
    for case in fitted:
        try:
            meta.check_input_count(case.channel_files(), model_name)
        except UserError as exc:
            raise UserError(f"case {case.name}: {exc}") from None
    return fitted


def read_inputs(case, meta, warn) -> list:
    """The channels of ``case`` (a volumes.Case) for a run over many cases: refused when too large for the memory,
    read, checked."""
    from .imageio import check_scan_fits, read_channels

    check_scan_fits(case.channels, meta)
    images = read_channels(case.channels, warn, case.series, case.volumes)
    return checked_inputs(images, case.channel_files(whole_paths=True), meta, warn)


def _builds_torch_network(checkpoint, device: str, onnx: bool) -> bool:
    """Whether ``load_network`` will build the torch network: without the export, on a GPU, or on a model's first
    CPU run, which makes the export from it."""
    return not onnx or gpu_may_run(device) or not onnx_path(Path(checkpoint)).is_file()


def load_and_prepare(reading, checkpoint, meta, device: str, reporter: Reporter, windows=None, onnx: bool = True):
    """The run-time start of ``segment`` and ``reconstruct``: the input images from ``reading``
    (``imageio.start_reading``), the device and the network (``onnx``: see
    ``load_network``), and the images on the model's grid (``windows``: see ``modelgrid.prepare``).

    Returns (channels as read, ModelInput, network, device: ``cpu`` or ``cuda``).
    """
    from .modelgrid import prepare

    if _builds_torch_network(checkpoint, device, onnx):  # its imports overlap the read
        start_torch_imports()
    else:  # the CPU with the export cached: compiled while the scan is read
        start_compiling_cached_export(Path(checkpoint), meta)
    channels = checked_inputs(reading.result(reporter.warning), reading.paths, meta, reporter.warning)
    device = resolve_device(device, reporter)  # after the scan's checks: a bad scan gets one line and no more
    network = load_network(checkpoint, meta, device, reporter, onnx)
    reporter.stage("preprocess")
    return channels, prepare(channels, meta.preprocessing, windows=windows), network, device


def labels_on_input_grid(network, model_input, meta, device: str, reporter: Reporter, reference):
    """Stages "inference" and "postprocess": the model's label map of ``model_input`` (a
    ``modelgrid.ModelInput``), with the largest piece of each label that asks for it, on the grid of
    ``reference`` (the first input channel); and per label value the volume in ml the model is unsure
    of (``uncertainty``), measured on the model's grid."""
    from .components import keep_largest_components
    from .geometry import voxel_ml
    from .modelgrid import restore_labels

    reporter.stage("inference")
    prediction = predict_labels(network, model_input.array, meta.roi_size, meta.overlap, meta.output_values,
                                device, reporter)
    reporter.stage("postprocess")
    keep_largest_components(prediction.labels, meta.largest_component_values)
    ml = voxel_ml(model_input.grid.spacing)
    unsure_ml = {value: count * ml for value, count in prediction.unsure_voxels.items()}
    return restore_labels(prediction.labels, model_input.grid, reference), unsure_ml


def segment_channels(channels, network, meta, device: str):
    """The label map of one case's checked ``channels`` on their grid and the unsure volume per label
    (``labels_on_input_grid``), for a run over many cases (which reports per case, not per window)."""
    from .modelgrid import prepare

    model_input = prepare(channels, meta.preprocessing, windows=(meta.roi_size, meta.overlap))
    return labels_on_input_grid(network, model_input, meta, device, Reporter("quiet"), channels[0])


class Prediction(NamedTuple):
    """A model's label values (z, y, x) on its grid, and per label value the voxels it is unsure of."""

    labels: np.ndarray
    unsure_voxels: dict[int, int]


def predict_labels(network, volume: np.ndarray, roi_size, overlap: float, output_values, device: str,
                   reporter: Reporter, sw_batch_size: int = 2) -> Prediction:
    """The prediction for a model input ``volume`` (channels, z, y, x)."""
    if isinstance(network, OnnxNetwork):
        logits = network.sliding_window(volume, roi_size, overlap, reporter)
        indices = logits.argmax(0)
    else:
        import torch

        from .inference import sliding_window

        logits = sliding_window(network, volume, roi_size, overlap, torch.device(device), reporter, sw_batch_size)[0]
        indices = logits.argmax(0).cpu().numpy()
    lookup = np.asarray(output_values, dtype=np.uint16 if max(output_values) > 255 else np.uint8)
    unsure = dict(zip(output_values, unsure_voxels(logits).tolist()))
    return Prediction(lookup[indices], unsure)
