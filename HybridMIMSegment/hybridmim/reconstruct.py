"""``hybridmim reconstruct``: mask a scan patch-wise and let a pre-trained model fill the holes.

Visual QA of a pre-trained encoder-decoder: if it rebuilds anatomy it never
saw from the visible context, it has learnt something about anatomy. Outputs,
on the input's grid and in its units (e.g. HU): ``mask`` (1 = masked),
``masked`` (the input with masked voxels at the intensity floor),
``reconstruction`` (the input with masked voxels replaced by the model's),
``error`` (absolute difference from the input), and ``montage.png``.

As a yardstick, the summary gives the masked voxels' mean absolute error of
the model and of a plain interpolation from the visible voxels (normalised
Gaussian convolution, the best of a few widths). Models pre-trained MAE-style
(MiM, SelfMedHPM) predict normalised patches: their reconstruction takes each
patch's mean and spread from the truth, which the summary flags, since that
gives them a head start over interpolation.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np

from .atomic import atomic_output, check_inputs_kept, check_new_output
from .catalog import resolve_model
from .checkpoint import read_metadata
from .errors import UserError
from .imageio import start_reading, write_image
from .progress import Reporter

BASELINE_SIGMAS = (2.0, 4.0, 8.0)  # voxels
VOLUMES = ("mask", "masked", "reconstruction", "error")


def output_names(channel_names: list[str]) -> dict[str, str]:
    """File name of each output; several channels get one file per channel for the intensity volumes."""
    names = {"mask": "mask.nii.gz", "montage": "montage.png"}
    for kind in VOLUMES[1:]:
        if len(channel_names) == 1:
            names[kind] = f"{kind}.nii.gz"
        else:
            for channel in channel_names:
                names[f"{kind}_{channel}"] = f"{kind}_{re.sub(r'[^A-Za-z0-9]+', '_', channel).lower()}.nii.gz"
    return names


def window_layout(shape_zyx, roi: int, patch: int, overlap: float) -> tuple[list[tuple[int, int]], float]:
    """Padding (before, after) per axis and the overlap that make every sliding window start on the patch grid.

    The network learnt with masks aligned to its windows (crop-relative 16³
    patches, which also line up with its pooling cells); a window shifted off
    that grid sees masks of unfamiliar shapes and fills them badly (on STS_039:
    167 HU mean error unaligned, 70 HU aligned). Steps between windows are
    whole patches, and the far end is padded so the last window lands on the
    grid too. An axis shorter than a window is centred in it.
    """
    stride = max(patch, round(roi * (1 - overlap) / patch) * patch)
    padding = []
    for n in shape_zyx:
        if n < roi:
            before = (roi - n) // 2 // patch * patch
            padding.append((before, roi - n - before))
        else:
            padding.append((0, -(n - roi) % stride))
    # MONAI steps by int(roi * (1 - overlap)): half a voxel over the stride keeps it exact.
    return padding, 1 - (stride + 0.5) / roi


def interpolation_baseline(array: np.ndarray, visible: np.ndarray, sigma: float):
    """Masked voxels filled by normalised Gaussian convolution of the visible ones.

    ``array`` (C, z, y, x), ``visible`` (z, y, x) booleans; returns a float32 array like ``array``.
    SciPy's filter, zero outside the volume: MONAI's GaussianFilter gave the same errors (within 0.3 HU on
    STS_036) at 5-10 times the time, and importing MONAI for it added 3.5 s to every run.
    """
    from scipy.ndimage import gaussian_filter

    weights = visible.astype(np.float32)
    support = np.maximum(gaussian_filter(weights, sigma, mode="constant"), 1e-6)
    return np.stack([gaussian_filter(np.asarray(channel, np.float32) * weights, sigma, mode="constant") / support
                     for channel in array])


def masked_mae(a: np.ndarray, b: np.ndarray, mask: np.ndarray, scales) -> float:
    """Mean absolute difference over ``mask`` voxels of every channel, in input units (÷ each channel's scale)."""
    errors = [np.abs(a[c][mask] - b[c][mask]).mean() / abs(scales[c]) for c in range(a.shape[0])]
    return float(np.mean(errors))


def mask_and_fill(network, array: np.ndarray, meta, ratio: float, seed: int, device: str, reporter: Reporter):
    """On the model grid: the patch mask (z, y, x) for ``seed`` and the network's
    prediction (C, z, y, x) of ``array`` (C, z, y, x) from its unmasked voxels, on ``device``."""
    import torch

    from .inference import sliding_window
    from .masking import volume_patch_mask

    device = torch.device(device)
    patch = int(meta.pretraining.get("patch_size", 16))
    mask = volume_patch_mask(array.shape[1:], patch, ratio, seed).numpy()
    reporter.stage("reconstruct")
    padding, overlap = window_layout(array.shape[1:], int(meta.roi_size[0]), patch, meta.overlap)
    inside = tuple(slice(before, before + n) for (before, _), n in zip(padding, array.shape[1:]))
    # Mirrored rather than padded with air: a window that is half padding leaves the model
    # little context (thin scans: ct_b 156 HU mean error with air padding, 99 HU mirrored).
    if hides_tokens(meta):
        from .pretraining.mae import TokenMaskedFill

        stacked = np.concatenate([array * ~mask, mask[None].astype(array.dtype), array])
        padded = np.pad(stacked, [(0, 0), *padding], mode="reflect")
        filled = sliding_window(TokenMaskedFill(network, patch), padded, meta.roi_size, overlap, device, reporter)
        return mask, filled[0][(slice(None), *inside)].float().cpu().numpy()
    padded = np.pad(array * ~mask, [(0, 0), *padding], mode="reflect")
    logits = sliding_window(network, padded, meta.roi_size, overlap, device, reporter)
    return mask, torch.sigmoid(logits[0][(slice(None), *inside)].float()).cpu().numpy()


def hides_tokens(meta) -> bool:
    """Whether the model was pre-trained MAE-style (MiM, SelfMedHPM): hidden tokens, normalised-patch outputs."""
    return meta.pretraining.get("masking") == "tokens"


def reconstruct(inputs: list[str], output_dir: str, model: str | None = None, mask_ratio: float | None = None,
                seed: int = 0, device: str = "auto", overwrite: bool = False, reporter: Reporter | None = None) -> dict:
    """Write the reconstruction outputs into ``output_dir``; returns their paths and the error summary."""
    reporter = reporter or Reporter("quiet")
    started = time.time()
    folder = Path(output_dir)
    if folder.is_file():
        raise UserError(f"{folder}: is a file; give a folder for the outputs")

    reporter.stage("load model")
    checkpoint = resolve_model(model, reporter, pretrained=True)
    meta = read_metadata(checkpoint)
    if meta.task != "reconstruction":
        raise UserError(f"model {checkpoint.name} is a {meta.task} model; reconstruction needs a pre-trained "
                        "model (`hybridmim models` lists them)")
    ratio = meta.pretraining.get("mask_ratio", 0.4) if mask_ratio is None else mask_ratio
    if not 0.0 < ratio < 1.0:
        raise UserError(f"--mask-ratio must be between 0 and 1 (exclusive), got {ratio}")
    if not 0 <= seed < 2 ** 63:  # what torch's generator takes
        raise UserError(f"--seed must be a whole number from 0 to 2^63 - 1, got {seed}")
    meta.check_input_count(list(map(str, inputs)), checkpoint.name)
    channel_names = [c["name"] for c in meta.channels]
    paths = {kind: check_new_output(folder / name, overwrite) for kind, name in output_names(channel_names).items()}
    check_inputs_kept(inputs, paths.values())

    reading = start_reading(inputs, meta, reporter)
    from .predict import load_and_prepare

    channels, model_input, network, device = load_and_prepare(reading, checkpoint, meta, device, reporter,
                                                              onnx=not hides_tokens(meta))  # needs encode(mask)
    array = model_input.array
    mask, prediction = mask_and_fill(network, array, meta, ratio, seed, device, reporter)

    reporter.stage("compare")
    scales = [scale for scale, _ in model_input.intensity_maps]
    summary = {"mask_ratio": ratio, "seed": seed, "masked_voxels_model_grid": int(mask.sum()),
               "mae_model": round(masked_mae(prediction, array, mask, scales), 3)}
    if hides_tokens(meta):  # say so: a fair comparison with interpolation it is not
        summary["patch_mean_and_spread_from_truth"] = True
    baseline = {s: masked_mae(interpolation_baseline(array, ~mask, s), array, mask, scales) for s in BASELINE_SIGMAS}
    best_sigma = min(baseline, key=baseline.get)
    summary.update(mae_interpolation=round(baseline[best_sigma], 3), interpolation_sigma_voxels=best_sigma)

    reporter.stage("write")
    _write_outputs(channels, model_input, mask, prediction, meta, paths, channel_names, checkpoint.stem)
    outputs = {kind: str(path) for kind, path in paths.items()}
    reporter.done({**outputs, **summary, "seconds": round(time.time() - started, 2), "device": device})
    return {**outputs, **summary}


def _write_outputs(channels, model_input, mask, prediction, meta, paths, channel_names, model_name) -> None:
    import SimpleITK as sitk

    from .geometry import Grid
    from .modelgrid import restore_intensities, restore_labels
    from .preview import render_reconstruction_montage

    mask_image = restore_labels(mask.astype(np.uint8), model_input.grid, channels[0])
    _write_image(mask_image, paths["mask"])
    masked_here = sitk.GetArrayViewFromImage(mask_image).astype(bool)
    window = meta.preprocessing.intensity.window
    reference = Grid.of(channels[0])
    for c, name in enumerate(channel_names):
        suffix = "" if len(channel_names) == 1 else f"_{name}"
        original = sitk.GetArrayFromImage(sitk.Cast(channels[c], sitk.sitkFloat32))
        scale, offset = model_input.intensity_maps[c]
        predicted = sitk.GetArrayFromImage(
            restore_intensities((prediction[c] - offset) / scale, model_input.grid, reference))
        floor = window[0] if window else float(original.min())
        volumes = {
            "masked": np.where(masked_here, floor, original),
            "reconstruction": np.where(masked_here, predicted, original),
        }
        volumes["error"] = np.abs(volumes["reconstruction"] - original)
        images = {}
        for kind, values in volumes.items():
            images[kind] = reference.image(values.astype(np.float32))
            _write_image(images[kind], paths[kind + suffix])
        if c == 0:
            render_reconstruction_montage(channels[0], images["masked"], images["reconstruction"], images["error"],
                                          paths["montage"], window, f"{model_name}: masked-patch reconstruction")


def _write_image(image, path: Path) -> None:
    with atomic_output(path) as tmp:
        write_image(image, tmp, path)
