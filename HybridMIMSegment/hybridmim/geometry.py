"""Image grids (size, spacing, origin, direction) and resampling between them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk


def voxel_ml(spacing) -> float:
    """The volume of one voxel of ``spacing`` (mm, any axis order) in millilitres."""
    return float(np.prod(spacing)) / 1000.0


@dataclass(frozen=True)
class Grid:
    """A voxel grid in ITK conventions: sizes and spacing in (x, y, z), LPS physical space."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image) -> "Grid":
        """The grid of an ``sitk.Image``, or of an ``sitk.ImageFileReader`` that has read a header."""
        return cls(tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()),
                   tuple(image.GetDirection()))

    def image(self, array_zyx: np.ndarray) -> sitk.Image:
        """An image on this grid holding ``array_zyx`` (numpy order z, y, x)."""
        if tuple(reversed(array_zyx.shape)) != self.size:
            raise ValueError(f"array shape {array_zyx.shape} does not fit grid size {self.size}")
        image = sitk.GetImageFromArray(array_zyx)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def matches(self, other: "Grid", tolerance: float = 0.01) -> bool:
        """Same voxels in space: the same size, and each corner voxel's centre at most ``tolerance`` of the
        smallest voxel side apart in the two grids. The one test of "on the same grid" for label maps and
        channels: files from other software keep a grid to a few decimals (float32 NIfTI, rounded headers),
        and spacing and direction errors count as they add up over the grid."""
        if self.size != other.size:
            return False
        corners = np.array([[i, j, k, 1.0] for i in (0, self.size[0] - 1) for j in (0, self.size[1] - 1)
                            for k in (0, self.size[2] - 1)]).T
        apart = np.linalg.norm((self.ijk_to_lps() @ corners - other.ijk_to_lps() @ corners)[:3], axis=0)
        return float(apart.max()) <= tolerance * min(self.spacing)

    def offset_in(self, other: "Grid") -> tuple[int, int, int] | None:
        """Where this grid's first voxel lies in ``other``, in whole voxels (i, j, k), when this grid is a box of
        ``other``'s voxels (same spacing and direction; it may reach beyond ``other``); None otherwise. Slicer
        saves a segmentation on its scan's grid, often cut to the box its segments fill."""
        index = np.linalg.solve(other.ijk_to_lps(), [*self.origin, 1.0])[:3]
        offset = tuple(int(round(float(v))) for v in index)
        origin = (other.ijk_to_lps() @ [*offset, 1.0])[:3]
        box = Grid(self.size, other.spacing, tuple(float(v) for v in origin), other.direction)
        return offset if box.matches(self) else None

    def ijk_to_lps(self) -> np.ndarray:
        """4x4 matrix from voxel index (i, j, k) to LPS millimetres."""
        matrix = np.eye(4)
        matrix[:3, :3] = np.asarray(self.direction).reshape(3, 3) * np.asarray(self.spacing)
        matrix[:3, 3] = self.origin
        return matrix


def resample_to_spacing(image: sitk.Image, spacing, interpolator, pixel_type=None) -> sitk.Image:
    """Resample onto a grid with ``spacing`` that starts at the same first voxel centre.

    Anchoring at the first voxel keeps grids nested: when ``spacing`` divides
    the input spacing, every input voxel centre is also a centre of the new grid,
    which makes nearest-neighbour round trips exact. The size is MONAI's
    (``Spacing``: the extent between first and last centres, rounded), so a
    model sees the voxels it would see in a MONAI pipeline; new centres beyond
    the last input centre take the values MONAI's "border" padding gives them.
    ``pixel_type``: the output's (default the input's), so that an integer CT
    is resampled as it is, not cast to float at full resolution first.
    """
    spacing = tuple(float(s) for s in spacing)
    size = [int(round((n - 1) * s / t + 1.0)) for n, s, t in zip(image.GetSize(), image.GetSpacing(), spacing)]
    # Border padding = the last plane repeated far enough for every new centre to interpolate inside.
    overshoot = [max(0.0, (m - 1) * t - (n - 1) * s) for m, n, s, t in
                 zip(size, image.GetSize(), image.GetSpacing(), spacing)]
    if any(overshoot):
        origin = image.GetOrigin()
        upper = [math.ceil(o / s) for o, s in zip(overshoot, image.GetSpacing())]
        image = sitk.ZeroFluxNeumannPad(image, [0, 0, 0], upper)
        image.SetOrigin(origin)
    return sitk.Resample(
        image, size, sitk.Transform(), interpolator, image.GetOrigin(), spacing, image.GetDirection(),
        0.0, image.GetPixelID() if pixel_type is None else pixel_type,
    )


def resample_onto(image: sitk.Image, reference: sitk.Image | Grid, interpolator,
                  default_value: float = 0.0) -> sitk.Image:
    """``image`` resampled onto the reference's grid, through physical space."""
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    return sitk.Resample(
        image, list(grid.size), sitk.Transform(), interpolator, grid.origin, grid.spacing, grid.direction,
        default_value, image.GetPixelID(),
    )


def covered_mask(covering: Grid, reference: Grid) -> np.ndarray:
    """(z, y, x) on ``reference``'s grid: 1 where its voxel centre lies within ``covering``'s grid, else 0."""
    inside = covering.image(np.ones(covering.size[::-1], np.uint8))
    return sitk.GetArrayFromImage(resample_onto(inside, reference, sitk.sitkNearestNeighbor))
