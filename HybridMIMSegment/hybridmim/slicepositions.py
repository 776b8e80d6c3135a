"""A DICOM series' slices where they really are. ITK stacks a series' files at the mean slice spacing and only
warns (on stderr) when the gaps differ, so one missing slice silently shifts every slice after it. Here each
file's Image Position (Patient) is checked: uneven gaps are resampled onto an even grid (linear between the
two nearest slices, the spacing of the usual gap), and slices that drift sideways (a tilted gantry: a sheared
grid, which an ITK image cannot hold; ITK also stretches the slice spacing by the drift) are shifted back onto
an untilted grid, as Slicer's DICOM reader does when it regularises a series; slices off to the side without
such a steady drift (inconsistent positions) are only warned of."""

from __future__ import annotations

from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import NotAScan, UserError

UNEVEN = 0.1  # a slice further than this share of the mean spacing from its even place makes the gaps uneven
SAME_PLACE_MM = 0.01
ORIENTATION_TOLERANCE = 1e-3  # direction cosines closer than this are one orientation


def _per_file(reader: sitk.ImageSeriesReader, count: int, tag: str, length: int) -> np.ndarray | None:
    """The ``length`` numbers of DICOM ``tag`` in each of the ``count`` files read by ``reader`` (metadata
    dictionaries kept); None when a file lacks the tag or holds something else."""
    values = []
    for index in range(count):
        if not reader.HasMetaDataKey(index, tag):
            return None
        try:
            values.append([float(v) for v in reader.GetMetaData(index, tag).split("\\")])
        except ValueError:
            return None
    return np.array(values) if all(len(v) == length for v in values) else None


def slice_positions(reader: sitk.ImageSeriesReader, count: int) -> np.ndarray | None:
    """Each slice's Image Position (Patient) in mm, from a reader run with its metadata dictionaries kept; None
    when a file lacks it (ITK's stacking is then all there is to go on)."""
    return _per_file(reader, count, "0020|0032", 3)


def one_orientation(reader: sitk.ImageSeriesReader, count: int) -> bool:
    """Whether every slice read by ``reader`` (metadata dictionaries kept) states the same Image Orientation
    (Patient); True where a file does not state it (nothing to tell them apart by)."""
    orientations = _per_file(reader, count, "0020|0037", 6)
    return orientations is None or bool(np.abs(orientations - orientations[0]).max() <= ORIENTATION_TOLERANCE)


def files_of_main_geometry(files) -> list[str]:
    """The files of a series that share the most common image size and orientation, in their order: what is
    left out (a localiser or a reformat filed under the series' UID, or a file that cannot be read) ITK cannot
    stack with the rest."""
    groups: dict[tuple, list[str]] = {}
    reader = sitk.ImageFileReader()
    for name in files:
        reader.SetFileName(name)
        try:
            reader.ReadImageInformation()
        except RuntimeError:
            continue
        direction = tuple(round(v / ORIENTATION_TOLERANCE) for v in reader.GetDirection())
        groups.setdefault((reader.GetSize()[:2], direction), []).append(name)
    return max(groups.values(), key=len, default=[])


def place_slices(image: sitk.Image, positions: np.ndarray, where: str, warn: Callable[[str], None]) -> sitk.Image:
    """``image`` (ITK's stacking of a series) with its slices at ``positions``: shifted back within their
    planes where they drift sideways, resampled onto an even grid where the gaps are uneven, with a warning
    for each; unchanged otherwise, or when ITK stacked them against their normal (left to ITK)."""
    count = image.GetDepth()
    if count < 3:
        return image
    axes = np.array(image.GetDirection()).reshape(3, 3)
    offsets = positions - positions[0]
    along = offsets @ axes[:, 2]
    places = len(np.unique(np.round(along / SAME_PLACE_MM)))
    if 2 * places <= count:  # each place imaged again and again, in any order: bolus tracking, a perfusion series
        raise NotAScan(f"{where}: its {count} slices lie at {places} place{'s' * (places > 1)}, each about "
                       f"{count / places:.0f} times: the same slices imaged again and again (bolus tracking?) or "
                       "its files present more than once, not one 3-D scan")
    steps = np.diff(along)
    if np.any(np.abs(steps) < SAME_PLACE_MM):
        first = int(np.argmin(np.abs(steps)))
        raise UserError(f"{where}: slices {first + 1} and {first + 2} of the series lie at the same place "
                        f"({along[first]:.1f} mm): duplicate files, or two scans under one series UID")
    mean_step = along[-1] / (count - 1)
    if mean_step <= 0:
        return image
    lateral = offsets @ axes[:, :2]  # each slice's offset within the plane, along the rows and the columns
    sideways = np.linalg.norm(lateral, axis=1).max()
    half_pixel = 0.5 * min(image.GetSpacing()[:2])
    if sideways > half_pixel:
        drift = along @ lateral / (along @ along)  # mm sideways per mm along the normal: a tilt's steady drift
        off_line = np.linalg.norm(lateral - np.outer(along, drift), axis=1).max()
        if off_line > half_pixel:
            warn(f"{where}: the slices lie sideways of each other irregularly (up to {off_line:.1f} mm off a tilted "
                 f"gantry's steady drift: inconsistent positions?); read as if in line, so outlines may be off by "
                 f"up to {sideways:.1f} mm")
        else:
            image = _untilt(image, lateral, mean_step)
            warn(f"{where}: the slices shift sideways along the series (a tilted gantry, about "
                 f"{np.degrees(np.arctan(np.linalg.norm(drift))):.0f}°, {sideways:.1f} mm at its far end); resampled "
                 f"onto an untilted grid ({image.GetWidth()} x {image.GetHeight()} voxels a slice), the grid the "
                 "label map is written on")
    if np.abs(along - np.arange(count) * mean_step).max() <= UNEVEN * mean_step:
        return image
    return _even_grid(image, along, steps, where, warn)


def _untilt(image: sitk.Image, lateral: np.ndarray, step: float) -> sitk.Image:
    """``image`` with each slice k shifted within its plane by ``lateral[k]`` (mm along the rows and the
    columns), onto a grid wide enough for every slice, its slices ``step`` mm apart along their normal."""
    spacing = np.array(image.GetSpacing()[:2])
    # whole voxels from the first slice, whose voxels then keep their places
    low = np.floor(lateral.min(axis=0) / spacing + 1e-6) * spacing
    size = np.array(image.GetSize()[:2]) + np.ceil((lateral.max(axis=0) - low) / spacing - 1e-6).astype(int)
    voxels = sitk.GetArrayViewFromImage(image)
    fill = float(voxels.min())  # beyond what a slice covered: the scan's own padding value
    shifted = np.empty((len(voxels), size[1], size[0]), voxels.dtype)
    for k, offset in enumerate(lateral):  # a slice at a time: no float copy of the whole scan
        plane = sitk.GetImageFromArray(voxels[k].astype(np.float32))
        plane.SetSpacing(spacing.tolist())
        plane.SetOrigin(offset.tolist())
        moved = sitk.GetArrayFromImage(sitk.Resample(plane, size.tolist(), sitk.Transform(), sitk.sitkLinear,
                                                     low.tolist(), spacing.tolist(), (1, 0, 0, 1), fill))
        shifted[k] = np.rint(moved) if np.issubdtype(voxels.dtype, np.integer) else moved
    result = sitk.GetImageFromArray(shifted)
    axes = np.array(image.GetDirection()).reshape(3, 3)
    result.SetSpacing(tuple(spacing) + (step,))
    result.SetOrigin(tuple(np.array(image.GetOrigin()) + axes[:, :2] @ low))
    result.SetDirection(image.GetDirection())
    return result


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
