"""Images onto the model grid and results back onto the input grid.

Forward (image → model input), as a checkpoint's Preprocessing describes it:
orientation (axis permutation/flip only), target spacing (linear), foreground
crop, intensity normalisation. Back (model grid → input grid): one
resampling through physical space onto the input's own grid, so outputs have
the input's size, spacing, origin and direction exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .geometry import Grid, resample_onto, resample_to_spacing
from .preprocessing import Preprocessing
from .windows import window_aligned_box


@dataclass
class ModelInput:
    """What the network sees: ``array`` (channels, z, y, x) float32 on ``grid``.

    ``intensity_maps``: each channel's (scale, offset), normalised = scale * value + offset.
    """

    array: np.ndarray
    grid: Grid
    label: np.ndarray | None = None
    intensity_maps: list[tuple[float, float]] | None = None

def _foreground_box(array_zyx: np.ndarray, threshold: float, margin_voxels) -> tuple[slice, ...]:
    mask = array_zyx > threshold
    if not mask.any():
        return tuple(slice(0, n) for n in array_zyx.shape)
    box = []
    for axis, margin in enumerate(margin_voxels):
        other = tuple(a for a in range(3) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        box.append(slice(max(0, present[0] - margin), min(array_zyx.shape[axis], present[-1] + 1 + margin)))
    return tuple(box)


def _to_model_grid(image: sitk.Image, spec: Preprocessing, interpolator, pixel_type=None) -> sitk.Image:
    oriented = sitk.DICOMOrient(image, spec.orientation)
    if spec.spacing is None:
        return oriented if pixel_type is None else sitk.Cast(oriented, pixel_type)
    return resample_to_spacing(oriented, spec.spacing, interpolator, pixel_type)


def prepare(channels: list[sitk.Image], spec: Preprocessing, label: sitk.Image | None = None,
            windows: tuple[tuple[int, ...], float] | None = None) -> ModelInput:
    """Model input from input channels (all on the grid of ``channels[0]``) and an optional label map.

    ``windows`` (roi size, overlap), for inference: the body crop grows to whole windows of a
    pass over the uncropped grid, so that the result inside the body does not depend on the crop.
    """
    reference = Grid.of(channels[0])
    model_images = [_to_model_grid(image, spec, sitk.sitkLinear, sitk.sitkFloat32) for image in channels]
    model_image = model_images[0]
    grid = Grid.of(model_image)
    arrays = [sitk.GetArrayFromImage(image) for image in model_images]
    del model_images
    label_array = None
    if label is not None:
        if not Grid.of(label).matches(reference):
            raise UserError("the label map's grid differs from the image's")
        label_array = sitk.GetArrayFromImage(_to_model_grid(label, spec, sitk.sitkNearestNeighbor))

    box = (slice(None),) * 3
    if spec.foreground_threshold is not None:
        margin = [math.ceil(spec.foreground_margin_mm / s) for s in reversed(grid.spacing)]
        box = _foreground_box(arrays[0], spec.foreground_threshold, margin)
        if windows is not None:
            box = window_aligned_box(box, arrays[0].shape, *windows)
        start_xyz = [int(b.start) for b in reversed(box)]
        grid = Grid(
            size=tuple(int(b.stop - b.start) for b in reversed(box)),
            spacing=grid.spacing,
            origin=tuple(model_image.TransformIndexToPhysicalPoint(start_xyz)),
            direction=grid.direction,
        )
    cropped = [a[box] for a in arrays]
    maps = [spec.intensity.linear_map(a) for a in cropped]
    stacked = np.stack([spec.intensity.apply(a, m) for a, m in zip(cropped, maps)])
    if label_array is not None:
        label_array = np.ascontiguousarray(label_array[box])
    return ModelInput(np.ascontiguousarray(stacked), grid, label_array, maps)


def restore_labels(labels_zyx: np.ndarray, grid: Grid, reference: sitk.Image | Grid) -> sitk.Image:
    """Labels on the model grid mapped onto the input's grid (nearest neighbour)."""
    return resample_onto(grid.image(labels_zyx), reference, sitk.sitkNearestNeighbor, 0)


def restore_intensities(values_zyx: np.ndarray, grid: Grid, reference: sitk.Image | Grid,
                        outside: float = 0.0) -> sitk.Image:
    """Continuous values on the model grid mapped onto the input's grid (linear); ``outside`` beyond the model grid."""
    return resample_onto(grid.image(values_zyx.astype(np.float32, copy=False)), reference, sitk.sitkLinear, outside)
