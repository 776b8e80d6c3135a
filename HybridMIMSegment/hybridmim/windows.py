"""Where sliding-window inference places its windows (MONAI's layout), without torch.

MONAI's ``sliding_window_inference`` pads an axis shorter than the window up to
it, steps ``int(roi * (1 - overlap))`` voxels, and pulls the last window back to
end at the volume's end. Results depend on these positions, so everything that
crops or counts windows uses this one description of them.
"""

from __future__ import annotations

import math


def window_step(size: int, roi: int, overlap: float) -> int:
    """Voxels between window starts along one axis."""
    if roi == size:
        return roi
    return max(int(roi * (1 - overlap)), 1)


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start of each window along one axis of ``size`` voxels (an axis shorter than ``roi`` is
    padded up to it: one window at 0)."""
    size = max(size, roi)
    step = window_step(size, roi, overlap)
    starts = []
    for index in range(math.ceil(size / step)):
        starts.append(min(index * step, size - roi))
        if index * step + roi >= size:
            break
    return starts


def count_windows(shape, roi_size, overlap: float) -> int:
    """How many windows a sliding-window pass over ``shape`` (z, y, x) visits."""
    return math.prod(len(window_starts(n, roi, overlap)) for n, roi in zip(shape, roi_size))


def window_aligned_box(box: tuple[slice, ...], shape, roi_size, overlap: float) -> tuple[slice, ...]:
    """The smallest box holding every window (of a pass over ``shape``) that overlaps ``box``.

    A pass over this box visits exactly those windows, so every voxel inside ``box`` is
    blended from the same windows as in a pass over the whole volume: cropping to it
    skips only windows that lie wholly outside ``box`` and leaves the result there unchanged.
    """
    aligned = []
    for part, size, roi in zip(box, shape, roi_size):
        if size <= roi:
            aligned.append(slice(0, size))
            continue
        touching = [s for s in window_starts(size, roi, overlap) if s < part.stop and s + roi > part.start]
        aligned.append(slice(touching[0], touching[-1] + roi))
    return tuple(aligned)
