"""Sliding-window inference as MONAI does it (window layout and Gaussian blending), without torch.

MONAI's ``sliding_window_inference`` pads an axis shorter than the window up to
it, steps ``int(roi * (1 - overlap))`` voxels, and pulls the last window back to
end at the volume's end. Results depend on these positions, so everything that
crops, counts or blends windows uses this one description of them. The blending
works on numpy arrays (the CPU path, OpenVINO) and on torch tensors (GPUs)
alike, so both give MONAI's result.
"""

from __future__ import annotations

import itertools
import math

import numpy as np


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


def gaussian_weights(roi_size) -> np.ndarray:
    """MONAI's "gaussian" blending weights for one window (float32): sigma = roi / 8 per axis, peak 1,
    floor 1e-3."""
    weights = None
    for roi in roi_size:
        x = np.arange(-(roi - 1) / 2.0, (roi - 1) / 2.0 + 1, dtype=np.float32)
        axis = np.exp(x**2 / np.float32(-2 * (roi * 0.125) ** 2))
        weights = axis if weights is None else weights[..., None] * axis
    return np.maximum(weights, max(float(weights.min()), 1e-3)).astype(np.float32)


def blend_windows(run, volume: np.ndarray, roi_size, overlap: float, batch: int, weights, zeros, reporter):
    """MONAI's sliding-window inference over a model input ``volume`` (channels, z, y, x): axes shorter
    than the window padded with zeros, split evenly; ``batch`` windows at a time; each output weighted
    by ``weights`` (``gaussian_weights``, as numpy array or torch tensor) and normalised by the summed
    weights. ``run`` maps a stack of windows (numpy float32) to the network's outputs, of the same kind
    as ``weights`` (weighted in place: ``run`` hands them over); ``zeros(shape)`` makes an accumulator of
    that kind. Progress per batch.

    Returns the blended output (out_channels, z, y, x) over ``volume``'s voxels.
    """
    roi = tuple(int(r) for r in roi_size)
    shape = volume.shape[1:]
    pads = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(shape, roi)]
    padded_volume = np.pad(volume, [(0, 0), *pads]) if any(sum(pad) for pad in pads) else volume
    padded = padded_volume.shape[1:]
    starts = list(itertools.product(*(window_starts(n, r, overlap) for n, r in zip(padded, roi))))
    batches = math.ceil(len(starts) / batch)
    # sums kept over the volume's own voxels only: a thin scan's padding would multiply their size
    weight_sum, output = zeros(shape), None
    for index, first in enumerate(range(0, len(starts), batch)):
        boxes = [tuple(slice(s, s + r) for s, r in zip(start, roi)) for start in starts[first:first + batch]]
        predicted = run(np.stack([padded_volume[(slice(None), *box)] for box in boxes]))
        if output is None:
            output = zeros((predicted.shape[1], *shape))
        for window, start in zip(predicted, starts[first:first + batch]):
            window *= weights  # in place: no weighted copy of every window (15 MB for 14 classes on 64³)
            # the window's part over the volume, and where that lies in the volume
            part = tuple(slice(max(before - s, 0), min(before + n - s, r))
                         for s, r, (before, _), n in zip(start, roi, pads, shape))
            target = tuple(slice(s + p.start - before, s + p.stop - before)
                           for s, p, (before, _) in zip(start, part, pads))
            output[(slice(None), *target)] += window[(slice(None), *part)]
            weight_sum[target] += weights[part]
        reporter.progress(index + 1, batches)
    output /= weight_sum
    return output
