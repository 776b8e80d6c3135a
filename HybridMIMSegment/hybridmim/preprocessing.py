"""Pre-processing driven by the checkpoint, and its exact inverse for label maps.

Forward (image → model input): orientation (axis permutation/flip only), target
spacing (linear), foreground crop, intensity normalisation. Inverse (model
labels → input grid): a single nearest-neighbour resampling through physical
space onto the input's own grid, so the output has the input's size, spacing,
origin and direction exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import UserError
from .geometry import Grid, resample_onto, resample_to_spacing

_ORIENTATION_LETTERS = ("LR", "PA", "IS")


@dataclass(frozen=True)
class Intensity:
    """``window``: clip to [lower, upper] (e.g. HU) and map to ``output_range``;
    ``zscore``: subtract the mean and divide by the standard deviation, over
    non-zero voxels when ``nonzero`` (skull-stripped MR)."""

    kind: str
    window: tuple[float, float] | None = None
    output_range: tuple[float, float] = (0.0, 1.0)
    nonzero: bool = False

    def to_dict(self) -> dict:
        if self.kind == "window":
            return {"type": "window", "window": list(self.window), "output_range": list(self.output_range)}
        return {"type": "zscore", "nonzero": self.nonzero}

    @classmethod
    def from_dict(cls, d: dict) -> "Intensity":
        kind = d.get("type")
        if kind == "window":
            lower, upper = (float(v) for v in d["window"])
            if not upper > lower:
                raise UserError(f"intensity window {d['window']} must have upper > lower")
            out = tuple(float(v) for v in d.get("output_range", (0.0, 1.0)))
            return cls("window", (lower, upper), out)
        if kind == "zscore":
            return cls("zscore", nonzero=bool(d.get("nonzero", False)))
        raise UserError(f"unknown intensity normalisation {kind!r} (expected 'window' or 'zscore')")

    def apply(self, array: np.ndarray) -> np.ndarray:
        """One channel normalised, as a new float32 array."""
        array = array.astype(np.float32, copy=False)
        if self.kind == "window":
            lower, upper = self.window
            lo, hi = self.output_range
            scaled = (np.clip(array, lower, upper) - lower) * ((hi - lo) / (upper - lower)) + lo
            return scaled.astype(np.float32, copy=False)
        values = array[array != 0] if self.nonzero else array
        if values.size == 0:
            return np.zeros_like(array)
        mean, std = float(values.mean()), float(values.std())
        out = (array - mean) / (std if std > 0 else 1.0)
        if self.nonzero:
            out[array == 0] = 0.0
        return out.astype(np.float32, copy=False)


@dataclass(frozen=True)
class Preprocessing:
    orientation: str = "RAS"
    spacing: tuple[float, float, float] | None = None
    intensity: Intensity = Intensity("zscore")
    foreground_threshold: float | None = None
    foreground_margin_mm: float = 10.0

    def to_dict(self) -> dict:
        return {
            "orientation": self.orientation,
            "spacing": list(self.spacing) if self.spacing else None,
            "intensity": self.intensity.to_dict(),
            "foreground": None if self.foreground_threshold is None
            else {"threshold": self.foreground_threshold, "margin_mm": self.foreground_margin_mm},
        }

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        orientation = str(d.get("orientation", "RAS")).upper()
        if len(orientation) != 3 or sorted(_axis_of(c) for c in orientation) != [0, 1, 2]:
            raise UserError(f"orientation {orientation!r} must be three letters, one of each pair L/R, P/A, I/S")
        spacing = d.get("spacing")
        if spacing is not None:
            spacing = tuple(float(s) for s in spacing)
            if len(spacing) != 3 or min(spacing) <= 0:
                raise UserError(f"target spacing {d.get('spacing')} must be three positive numbers")
        foreground = d.get("foreground") or {}
        return cls(
            orientation=orientation,
            spacing=spacing,
            intensity=Intensity.from_dict(d.get("intensity", {"type": "zscore"})),
            foreground_threshold=None if foreground.get("threshold") is None else float(foreground["threshold"]),
            foreground_margin_mm=float(foreground.get("margin_mm", 10.0)),
        )


def _axis_of(letter: str) -> int:
    for axis, pair in enumerate(_ORIENTATION_LETTERS):
        if letter in pair:
            return axis
    return -1


@dataclass
class ModelInput:
    """What the network sees: ``array`` (channels, z, y, x) float32 on ``grid``."""

    array: np.ndarray
    grid: Grid
    label: np.ndarray | None = None


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


def _to_model_grid(image: sitk.Image, spec: Preprocessing, interpolator, default_value: float) -> sitk.Image:
    oriented = sitk.DICOMOrient(image, spec.orientation)
    if spec.spacing is None:
        return oriented
    return resample_to_spacing(oriented, spec.spacing, interpolator, default_value)


def prepare(channels: list[sitk.Image], spec: Preprocessing, label: sitk.Image | None = None) -> ModelInput:
    """Model input from input channels (all on the grid of ``channels[0]``) and an optional label map."""
    reference = Grid.of(channels[0])
    arrays = []
    for image in channels:
        image = sitk.Cast(image, sitk.sitkFloat32)
        # Pad with the darkest value (air on CT) rather than 0 HU (water).
        darkest = float(sitk.GetArrayViewFromImage(image).min())
        arrays.append(sitk.GetArrayFromImage(_to_model_grid(image, spec, sitk.sitkLinear, darkest)))
    # The model grid, computed on an empty image of the reference geometry.
    blank = sitk.Image(list(reference.size), sitk.sitkUInt8)
    blank.CopyInformation(channels[0])
    model_image = _to_model_grid(blank, spec, sitk.sitkNearestNeighbor, 0)
    grid = Grid.of(model_image)
    label_array = None
    if label is not None:
        if not Grid.of(label).matches(reference):
            raise UserError("the label map's grid differs from the image's")
        label_array = sitk.GetArrayFromImage(_to_model_grid(label, spec, sitk.sitkNearestNeighbor, 0))

    box = (slice(None),) * 3
    if spec.foreground_threshold is not None:
        margin = [math.ceil(spec.foreground_margin_mm / s) for s in reversed(grid.spacing)]
        box = _foreground_box(arrays[0], spec.foreground_threshold, margin)
        start_xyz = [int(b.start) for b in reversed(box)]
        grid = Grid(
            size=tuple(int(b.stop - b.start) for b in reversed(box)),
            spacing=grid.spacing,
            origin=tuple(model_image.TransformIndexToPhysicalPoint(start_xyz)),
            direction=grid.direction,
        )
    stacked = np.stack([spec.intensity.apply(a[box]) for a in arrays])
    if label_array is not None:
        label_array = np.ascontiguousarray(label_array[box])
    return ModelInput(np.ascontiguousarray(stacked), grid, label_array)


def restore_labels(labels_zyx: np.ndarray, grid: Grid, reference: sitk.Image | Grid) -> sitk.Image:
    """Labels on the model grid mapped onto the input's grid (nearest neighbour)."""
    return resample_onto(grid.image(labels_zyx), reference, sitk.sitkNearestNeighbor, 0)
