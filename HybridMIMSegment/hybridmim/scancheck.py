"""Checks on what an input scan holds, before a model sees it: non-finite voxels,
constant images, and intensities unlike the modality the model expects."""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import UserError

# Air is about -1000 HU on CT; any body CT has voxels far below this. MR intensities are not negative.
CT_MINIMUM_ABOVE = -200.0
MR_MINIMUM_BELOW = -500.0


def finite_volume(image: sitk.Image, name: str, warn: Callable[[str], None]) -> sitk.Image:
    """``image`` with NaN/Inf voxels set to its lowest finite value (with a warning); a
    UserError when no voxel is finite or every voxel has the same value."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        count = int(bad.sum())
        if count == array.size:
            raise UserError(f"{name}: every voxel is NaN or infinite")
        if count:
            fixed = sitk.GetArrayFromImage(image)
            fill = float(fixed[~bad].min())
            fixed[bad] = fill
            repaired = sitk.GetImageFromArray(fixed)
            repaired.CopyInformation(image)
            warn(f"{name}: {count} voxels ({100 * count / array.size:.2g}%) are NaN or infinite; "
                 f"they are treated as the lowest value in the scan ({fill:g})")
            image, array = repaired, fixed
    low, high = float(array.min()), float(array.max())
    if low == high:
        raise UserError(f"{name}: every voxel has the same value ({low:g}); there is nothing to segment")
    return image


def warn_if_unlike_modality(image: sitk.Image, name: str, modality: str, warn: Callable[[str], None]) -> None:
    """A warning when the intensities do not look like ``modality`` (CT in Hounsfield units, or MR)."""
    low = float(sitk.GetArrayViewFromImage(image).min())
    if modality == "CT" and low > CT_MINIMUM_ABOVE:
        warn(f"{name}: no voxel below {CT_MINIMUM_ABOVE:g}, unlike a CT in Hounsfield units (air is -1000); "
             "the model expects CT: is this an MR, or a CT stored without its rescale?")
    elif modality == "MR" and low < MR_MINIMUM_BELOW:
        warn(f"{name}: values down to {low:g}, like a CT in Hounsfield units; the model expects MR")


def checked_channels(images: list[sitk.Image], names, modalities, warn: Callable[[str], None]) -> list[sitk.Image]:
    """Each input channel made finite and checked against the modality the model expects for it."""
    checked = []
    for image, name, modality in zip(images, names, modalities):
        image = finite_volume(image, str(name), warn)
        warn_if_unlike_modality(image, str(name), modality, warn)
        checked.append(image)
    return checked
