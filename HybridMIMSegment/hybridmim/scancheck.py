"""Checks on what an input scan holds, before a model sees it: non-finite voxels, constant images, label maps given
as scans, intensities unlike the modality the model expects, and scans too thin for its windows; and on what a
reference or training label map holds."""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import NotAScan, UserError

# Air is about -1000 HU on CT; any body CT has voxels far below this. MR intensities are not negative.
CT_MINIMUM_ABOVE = -200.0
MR_MINIMUM_BELOW = -500.0
# A scan covering less than this share of a window along an axis leaves every window mostly padding, which the
# models did not learn: a 42 mm slab of the default model's own training CT drops liver Dice from 0.87 to 0.19.
THIN_SCAN_SHARE = 0.5
_WORLD_AXIS_NAMES = ("left–right", "front–back", "head–foot")
MAX_LABEL_VALUE = np.iinfo(np.uint16).max
# An image of this few distinct whole values from 0 is a label map or mask (BTCV-13's organs are 14 values), not a
# scan: even an 8-bit one has hundreds of grey values
MOST_LABEL_MAP_VALUES = 32


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


def refuse_label_map(image: sitk.Image, name: str) -> None:
    """NotAScan for an input channel (``name``: its file) of at most MOST_LABEL_MAP_VALUES distinct whole values
    from 0: a label map or mask picked in place of its scan (from a case folder, or a flat folder pooled for
    pre-training). Looked for in every fourth voxel along each axis first, so that scans cost a 64th of the image."""
    array = sitk.GetArrayViewFromImage(image)
    for voxels in (array[::4, ::4, ::4], array):
        values = np.unique(voxels)
        if len(values) > MOST_LABEL_MAP_VALUES or values[0] < 0 or not np.array_equal(values, np.round(values)):
            return
    if len(values) == 1:  # a constant image, which finite_volume refuses as one
        return
    shown = ", ".join(f"{v:g}" for v in values[:8]) + (" …" if len(values) > 8 else "")
    raise NotAScan(f"{name}: holds only the values {shown}, as a label map or mask does, not a scan: give the image "
                   "it outlines")


def warn_if_unlike_modality(image: sitk.Image, name: str, modality: str, warn: Callable[[str], None]) -> None:
    """A warning when the intensities do not look like ``modality`` (CT in Hounsfield units, or MR)."""
    low = float(sitk.GetArrayViewFromImage(image).min())
    if modality == "CT" and low > CT_MINIMUM_ABOVE:
        warn(f"{name}: no voxel below {CT_MINIMUM_ABOVE:g}, unlike a CT in Hounsfield units (air is -1000); "
             "the model expects CT: is this an MR, or a CT stored without its rescale?")
    elif modality == "MR" and low < MR_MINIMUM_BELOW:
        warn(f"{name}: values down to {low:g}, like a CT in Hounsfield units; the model expects MR")


def warn_if_thinner_than_window(image: sitk.Image, name: str, preprocessing, roi_size,
                                warn: Callable[[str], None]) -> None:
    """A warning when ``image`` covers less than THIN_SCAN_SHARE of the model's window (``roi_size`` voxels
    (z, y, x) at the ``preprocessing`` spacing) along any axis; read from the header alone."""
    direction = np.abs(np.asarray(image.GetDirection()).reshape(3, 3))
    size, spacing = image.GetSize(), image.GetSpacing()
    thin = []
    for model_axis, world_axis in enumerate(preprocessing.world_axes()):
        image_axis = int(direction[world_axis].argmax())  # the image axis nearest this world axis
        covered = size[image_axis] * spacing[image_axis]
        step = preprocessing.spacing[model_axis] if preprocessing.spacing else spacing[image_axis]
        window = roi_size[2 - model_axis] * step
        if covered < THIN_SCAN_SHARE * window:
            thin.append(f"{covered:.0f} mm {_WORLD_AXIS_NAMES[world_axis]} (window {window:.0f} mm)")
    if thin:
        warn(f"{name}: the scan covers only {', '.join(thin)}, under half of the model's window; with so little "
             "3-D context the model may miss structures")


def checked_channels(images: list[sitk.Image], names, modalities, warn: Callable[[str], None]) -> list[sitk.Image]:
    """Each input channel made finite and checked against the modality the model expects for it."""
    checked = []
    for image, name, modality in zip(images, names, modalities):
        image = finite_volume(image, str(name), warn)
        warn_if_unlike_modality(image, str(name), modality, warn)
        checked.append(image)
    return checked


def checked_label_map(image: sitk.Image, name: str, warn: Callable[[str], None]) -> sitk.Image:
    """A label map as UInt16 values; NaN or infinite voxels (a float file's "no label") are background, with a
    warning. A UserError for values that are no label: fractions (a label map resampled with linear
    interpolation), negative or beyond UInt16."""
    array = sitk.GetArrayViewFromImage(image)
    if array.dtype.kind == "f":
        bad = ~np.isfinite(array)
        if bad.any():
            array = np.where(bad, 0, array)
            warn(f"{name}: {int(bad.sum())} voxels are NaN or infinite; they are taken as background (0)")
        fractions = array != np.round(array)
        if fractions.any():
            raise UserError(f"{name}: {int(fractions.sum())} voxels hold fractions (such as "
                            f"{float(array[fractions][0]):g}), not label values: resampled with linear "
                            "interpolation? Resample label maps with nearest neighbour")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > MAX_LABEL_VALUE:
        raise UserError(f"{name}: values from {low:g} to {high:g}; label values are whole numbers from 0 "
                        f"(background) to {MAX_LABEL_VALUE}")
    labels = sitk.GetImageFromArray(np.asarray(array, dtype=np.uint16))
    labels.CopyInformation(image)
    return labels
