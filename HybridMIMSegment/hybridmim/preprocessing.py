"""What a checkpoint says about pre-processing: orientation, target spacing,
foreground crop and intensity normalisation.

Pure data and numpy: reading a checkpoint's metadata needs no imaging library.
Moving images onto the model grid and back is modelgrid.py's job.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from .errors import UserError

_ORIENTATION_LETTERS = ("LR", "PA", "IS")


def _object(value, where: str) -> dict:
    """A block of the settings (None: empty); a hand-written recipe's word or list there is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"pre-processing '{where}' must be an object, got {json.dumps(value)}")
    return value


def _numbers(value, count: int, where: str) -> tuple[float, ...]:
    """``count`` finite numbers (a one-number setting: count 1, given without a list)."""
    values = [value] if count == 1 else value
    if not (isinstance(values, list | tuple) and len(values) == count and all(
            isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in values)):
        wanted = "a number" if count == 1 else f"{count} numbers"
        raise UserError(f"pre-processing '{where}' must be {wanted}, got {json.dumps(value)}")
    return tuple(float(v) for v in values)


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
            lower, upper = _numbers(d.get("window"), 2, "intensity.window")
            if not upper > lower:
                raise UserError(f"intensity window {d['window']} must have upper > lower")
            out = _numbers(d.get("output_range", (0.0, 1.0)), 2, "intensity.output_range")
            return cls("window", (lower, upper), out)
        if kind == "zscore":
            return cls("zscore", nonzero=bool(d.get("nonzero", False)))
        raise UserError(f"unknown intensity normalisation {kind!r} (expected 'window' or 'zscore')")

    def linear_map(self, array: np.ndarray) -> tuple[float, float]:
        """(scale, offset) with normalised = scale * value + offset (after clipping to a window).

        For z-score the statistics come from ``array`` itself; keeping the map
        lets outputs in normalised units go back to the input's units.
        """
        if self.kind == "window":
            lower, upper = self.window
            lo, hi = self.output_range
            scale = (hi - lo) / (upper - lower)
            return scale, lo - lower * scale
        values = array[array != 0] if self.nonzero else array
        if values.size == 0:
            return 1.0, 0.0
        mean, std = float(values.mean()), float(values.std())
        std = std if std > 0 else 1.0
        return 1.0 / std, -mean / std

    def apply(self, array: np.ndarray, linear_map: tuple[float, float] | None = None) -> np.ndarray:
        """One channel normalised, as a new float32 array."""
        array = array.astype(np.float32, copy=False)
        scale, offset = linear_map or self.linear_map(array)
        if self.kind == "window":
            # Anchored at the window's lower end so its output (HybridMIM's 0.001 for air) is exact.
            lower, upper = self.window
            scaled = (np.clip(array, lower, upper) - lower) * scale + self.output_range[0]
            return scaled.astype(np.float32, copy=False)
        out = (array * scale + offset).astype(np.float32, copy=False)
        if self.nonzero:
            out[array == 0] = 0.0
        return out


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

    def world_axes(self) -> tuple[int, ...]:
        """The world axis (0 left–right, 1 front–back, 2 head–foot) of each model-grid axis (x, y, z)."""
        return tuple(_axis_of(letter) for letter in self.orientation)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        """The settings of a checkpoint or recipe; a hand-written block's malformed value is refused in one line."""
        d = _object(d, "preprocessing")
        orientation = str(d.get("orientation", "RAS")).upper()
        if len(orientation) != 3 or sorted(_axis_of(c) for c in orientation) != [0, 1, 2]:
            raise UserError(f"orientation {orientation!r} must be three letters, one of each pair L/R, P/A, I/S")
        spacing = d.get("spacing")
        if spacing is not None:
            spacing = _numbers(spacing, 3, "spacing")
            if min(spacing) <= 0:
                raise UserError(f"target spacing {d.get('spacing')} must be three positive numbers")
        foreground = _object(d.get("foreground"), "foreground")
        threshold = foreground.get("threshold")
        return cls(
            orientation=orientation,
            spacing=spacing,
            intensity=Intensity.from_dict(_object(d.get("intensity", {"type": "zscore"}), "intensity")),
            foreground_threshold=None if threshold is None else _numbers(threshold, 1, "foreground.threshold")[0],
            foreground_margin_mm=_numbers(foreground.get("margin_mm", 10.0), 1, "foreground.margin_mm")[0],
        )


def _axis_of(letter: str) -> int:
    for axis, pair in enumerate(_ORIENTATION_LETTERS):
        if letter in pair:
            return axis
    return -1


