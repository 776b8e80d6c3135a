"""``hybridmim segment``: input volume(s) in, label map (+ QA preview) out, on the input's grid."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from .atomic import check_new_output
from .catalog import resolve_model
from .checkpoint import read_metadata
from .errors import UserError
from .imageio import check_labelmap_path, read_channels, write_labelmap
from .progress import Reporter


def segment(inputs: list[str], output: str, model: str | None = None, device: str = "auto",
            preview: str | None = None, overwrite: bool = False, reporter: Reporter | None = None) -> dict:
    """Segment ``inputs`` (one path per channel) with ``model``; returns the outputs written.

    Every check that can fail on bad input runs before anything is written.
    """
    reporter = reporter or Reporter("quiet")
    started = time.time()
    output_path = check_new_output(output, overwrite)
    check_labelmap_path(output_path)
    preview_path = check_new_output(preview, overwrite) if preview else None
    if preview_path is not None and preview_path.suffix.lower() != ".png":
        raise UserError(f"{preview_path}: the preview is a PNG; name it *.png")
    for source in inputs:
        if Path(source).resolve() in {output_path.resolve(), preview_path and preview_path.resolve()}:
            raise UserError(f"{source}: output would overwrite an input")

    reporter.stage("load model")
    checkpoint = resolve_model(model, reporter)
    meta = read_metadata(checkpoint)
    if len(inputs) != len(meta.channels):
        wanted = ", ".join(c["name"] for c in meta.channels)
        raise UserError(f"model {checkpoint.name} expects {len(meta.channels)} input channel(s) ({wanted}); got {len(inputs)}")

    reporter.stage("read")
    channels = read_channels(inputs, reporter.warning)

    import torch  # after the cheap checks: importing torch takes a while

    from .checkpoint import load_model
    from .inference import predict_labels, select_device
    from .preprocessing import prepare, restore_labels

    torch_device = select_device(device, reporter)
    _, network = load_model(checkpoint, torch_device)

    reporter.stage("preprocess")
    model_input = prepare(channels, meta.preprocessing)

    reporter.stage("inference")
    labels_model = predict_labels(network, model_input.array, meta.roi_size, meta.overlap, meta.output_values,
                                  torch_device, reporter)

    reporter.stage("postprocess")
    labels = restore_labels(labels_model, model_input.grid, channels[0])

    reporter.stage("write")
    write_labelmap(labels, output_path, meta.labels)
    outputs = {"segmentation": str(output_path)}

    if preview_path is not None:
        from .preview import render_preview

        reporter.stage("preview")
        window = meta.preprocessing.intensity.window
        render_preview(channels[0], labels, meta.labels, preview_path, window, meta.title or checkpoint.stem)
        outputs["preview"] = str(preview_path)

    import SimpleITK as sitk

    counts = np.bincount(sitk.GetArrayViewFromImage(labels).ravel(), minlength=max(meta.output_values) + 1)
    voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
    segments = [{"value": l.value, "name": l.name, "volume_ml": round(float(counts[l.value]) * voxel_ml, 2)}
                for l in meta.labels]
    reporter.done({**outputs, "segments": segments, "seconds": round(time.time() - started, 2),
                   "device": str(torch_device)})
    return {**outputs, "segments": segments}
