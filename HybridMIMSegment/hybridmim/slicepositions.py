"""A DICOM series' slices where they really are. ITK stacks a series' files at the mean slice spacing and only
warns (on stderr) when the gaps differ, so one missing slice silently shifts every slice after it. Here each
file's Image Position (Patient) is checked: uneven gaps are resampled onto an even grid (linear between the
two nearest slices, the spacing of the usual gap), and a sideways drift of the slices (a tilted gantry), which
an image grid cannot hold, is named."""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import UserError

UNEVEN = 0.1  # a slice further than this share of the mean spacing from its even place makes the gaps uneven
SAME_PLACE_MM = 0.01


def slice_positions(reader: sitk.ImageSeriesReader, count: int) -> np.ndarray | None:
    """Each slice's Image Position (Patient) in mm, from a reader run with its metadata dictionaries kept; None
    when a file lacks it (ITK's stacking is then all there is to go on)."""
    positions = []
    for index in range(count):
        if not reader.HasMetaDataKey(index, "0020|0032"):
            return None
        try:
            positions.append([float(v) for v in reader.GetMetaData(index, "0020|0032").split("\\")])
        except ValueError:
            return None
    return np.array(positions) if all(len(p) == 3 for p in positions) else None


def place_slices(image: sitk.Image, positions: np.ndarray, where: str, warn: Callable[[str], None]) -> sitk.Image:
    """``image`` (ITK's stacking of a series) with its slices at ``positions``: unchanged when the gaps are even,
    else resampled onto an even grid, with a warning either way something was off."""
    count = image.GetDepth()
    if count < 3:
        return image
    axes = np.array(image.GetDirection()).reshape(3, 3)
    offsets = positions - positions[0]
    along = offsets @ axes[:, 2]
    steps = np.diff(along)
    if np.any(np.abs(steps) < SAME_PLACE_MM):
        first = int(np.argmin(np.abs(steps)))
        raise UserError(f"{where}: slices {first + 1} and {first + 2} of the series lie at the same place "
                        f"({along[first]:.1f} mm): duplicate files, or two scans under one series UID")
    sideways = np.abs(offsets @ axes[:, :2]).max()
    if sideways > 0.5 * min(image.GetSpacing()[:2]):
        tilt = np.degrees(np.arctan2(sideways, abs(along[-1])))
        warn(f"{where}: the slices shift sideways along the series (a tilted gantry, about {tilt:.0f}°); read as if "
             f"untilted, so outlines may be off by up to {sideways:.1f} mm at the series' far end")
    mean_step = along[-1] / (count - 1)
    if mean_step <= 0 or np.abs(along - np.arange(count) * mean_step).max() <= UNEVEN * mean_step:
        return image
    return _even_grid(image, along, steps, where, warn)


def _even_grid(image: sitk.Image, along: np.ndarray, steps: np.ndarray, where: str,
               warn: Callable[[str], None]) -> sitk.Image:
    step = float(np.median(steps))
    targets = np.arange(int(round(along[-1] / step)) + 1) * step
    below = np.clip(np.searchsorted(along, targets, side="right") - 1, 0, len(along) - 2)
    weight = np.clip((targets - along[below]) / steps[below], 0.0, 1.0)
    voxels = sitk.GetArrayViewFromImage(image)
    even = np.empty((len(targets),) + voxels.shape[1:], voxels.dtype)
    for k, (lower, w) in enumerate(zip(below, weight)):  # a slice at a time: no float copy of the whole scan
        mixed = voxels[lower] * (1.0 - w) + voxels[lower + 1] * w
        even[k] = np.rint(mixed) if np.issubdtype(voxels.dtype, np.integer) else mixed
    result = sitk.GetImageFromArray(even)
    result.SetSpacing(image.GetSpacing()[:2] + (step,))
    result.SetOrigin(image.GetOrigin())
    result.SetDirection(image.GetDirection())
    warn(f"{where}: slice gaps are uneven ({steps.min():.2f} to {steps.max():.2f} mm: a missing slice?); resampled "
         f"to an even {step:.2f} mm ({len(targets)} slices from {len(along)}), the grid the label map is written on")
    return result
