"""Slicer segmentation files (.seg.nrrd) read as label maps of a model's labels: fine-tuning cases and evaluate's
references corrected in Slicer and saved as they are.

A segmentation's own label values only number the segments within a layer (segments that overlap lie in separate
layers), so they say nothing about which structure a segment is. Each segment is matched to a label instead, by
its name, else by its terminology's codes, and written as that label's label-map value onto the scan's grid
(Slicer saves a segmentation on its scan's grid, often cut to the box its segments fill; one on a grid of its
own, oversampled for smoother surfaces, is resampled onto the scan's).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import SimpleITK as sitk

from .errors import UserError, message_line
from .geometry import Grid, covered_mask, resample_onto
from .labels import Label, label_of_segment, plain_name, segment_entry
from .volumes import is_segmentation_file


def refuse_as_scan(path) -> None:
    """A segmentation given where a scan is wanted (ITK would read its label values as intensities) is refused."""
    if is_segmentation_file(path):
        raise UserError(f"{path}: a Slicer segmentation, not a scan; give the scan it outlines")


def _unreadable(exc: Exception, where: str) -> UserError:
    return UserError(f"{where}: not a readable Slicer segmentation: {message_line(exc, last=True)}")


def _segments(path: Path, where: str) -> list[dict]:
    """A segmentation file's segments (slicerio's descriptions), from its header."""
    import slicerio

    try:
        return slicerio.read_segmentation(str(path), skip_voxels=True).get("segments", [])
    except Exception as exc:  # pynrrd's and slicerio's errors alike: the file is not what it says
        raise _unreadable(exc, where) from None


def _read(path: Path, where: str) -> tuple[list[dict], sitk.Image]:
    """The segments and the voxels (one component per layer) of a segmentation file."""
    segments = _segments(path, where)
    try:
        return segments, sitk.ReadImage(str(path))
    except RuntimeError as exc:
        raise _unreadable(exc, where) from None


def check_some_segment_is_a_label(path: Path, labels: list[Label], where: str) -> None:
    """Refuse, from the header alone, a segmentation with segments of which none is a label (by name, else codes):
    Slicer names a new segment "Segment_1", and read as background such a file would teach a model, or score it
    against, the absence of every structure it outlines. One that holds no segment at all is left to the reader."""
    segments = _segments(path, where)
    if segments and not any(label_of_segment(segment, labels) for segment in segments):
        names = [str(segment.get("name", f"segment {index + 1}")) for index, segment in enumerate(segments)]
        raise UserError(f"{where}: no segment ({_listed(names)}) is one of the labels "
                        f"({_listed([label.name for label in labels])}) by name or terminology: name its segments as "
                        "the labels (in Slicer: double-click a segment's name)")


def labels_of_segmentations(paths: list[Path]) -> list[dict]:
    """Label entries (parse_labels' form) for the segments of Slicer segmentation files, one per distinct name (case
    and spacing aside) in the order they first appear, valued 1, 2, …, with the segment's colour and terminology:
    the labels of a fine-tuning run that nothing else names."""
    entries, seen = [], set()
    for path in paths:
        for segment in _segments(path, str(path)):
            name = " ".join(str(segment.get("name", "")).split())
            if name and plain_name(name) not in seen:
                seen.add(plain_name(name))
                entries.append(segment_entry(len(entries) + 1, name, segment.get("color", (0.5, 0.5, 0.5)),
                                             segment.get("terminology")))
    return entries


def _listed(names: list[str]) -> str:
    return ", ".join(f"'{n}'" for n in names[:5]) + " …" * (len(names) > 5)


def read_segmentation_labels(path: Path, image_grid: Grid, labels: list[Label], where: str,
                             warn: Callable[[str], None]) -> sitk.Image:
    """The segmentation at ``path`` as a UInt16 label map on ``image_grid``: each segment written as the label-map
    value of the label it is (``Label.sources[0]``, so that fine-tuning and evaluate map it as a label map's);
    segments that are no label are left out, with a warning. ``where`` names the file in messages."""
    segments, image = _read(path, where)
    voxels = sitk.GetArrayViewFromImage(image)
    layers = voxels if voxels.ndim == 4 else voxels[..., None]  # (z, y, x, layer)
    values = np.zeros(layers.shape[:3], dtype=np.uint16)
    unmatched, overlapping = [], 0
    for index, segment in enumerate(segments):
        name = str(segment.get("name", f"segment {index + 1}"))
        label = label_of_segment(segment, labels)
        if label is None:
            unmatched.append(name)
            continue
        # files from before Slicer 4.11 give neither: each segment is its own layer, of value 1
        layer = segment.get("layer", index if layers.shape[3] > 1 else 0)
        if not 0 <= layer < layers.shape[3]:
            raise UserError(f"{where}: segment '{name}' lies in layer {layer}, the file holds {layers.shape[3]}")
        mask = layers[..., layer] == segment.get("labelValue", 1)
        value = label.sources[0]
        overlapping += int(np.count_nonzero(mask & (values != 0) & (values != value)))
        values[mask] = value
    if not segments:
        warn(f"{where}: holds no segments; read as background only")
    if unmatched:
        names = [label.name for label in labels]
        warn(f"{where}: {'segments' if len(unmatched) > 1 else 'segment'} {_listed(unmatched)} "
             f"{'are' if len(unmatched) > 1 else 'is'} none of the labels ({_listed(names)}) by terminology or "
             "name; read as background")
    if overlapping:
        warn(f"{where}: {overlapping} voxels lie in segments of two labels; each is read as the later segment's")
    own = Grid.of(image)
    offset = own.offset_in(image_grid)
    if offset is None:
        return _resampled(values, own, image_grid, where, warn)
    return image_grid.image(_placed(values, offset, image_grid, where, warn))


def _warn_outside(values: np.ndarray, placed_count: int, where: str, warn) -> None:
    outside = int(np.count_nonzero(values)) - placed_count
    if outside:
        warn(f"{where}: {outside} segment voxels lie outside the scan; left out")


def _resampled(values: np.ndarray, own: Grid, image_grid: Grid, where: str, warn) -> sitk.Image:
    """``values`` (z, y, x) on ``own`` grid, which is not a box of the scan's (Slicer's oversampled segmentation
    geometry, or another scan's), on the scan's grid by nearest neighbour."""
    axes = "" if np.allclose(own.direction, image_grid.direction, atol=1e-6) else ", other axes"
    warn(f"{where}: not on its scan's voxel grid (spacing {_mm(own.spacing)} against the scan's "
         f"{_mm(image_grid.spacing)}{axes}); resampled onto it (nearest neighbour)")
    _warn_outside(values, int(np.count_nonzero(values * covered_mask(image_grid, own))), where, warn)
    return resample_onto(own.image(values), image_grid, sitk.sitkNearestNeighbor)


def _mm(spacing) -> str:
    return " x ".join(f"{s:g}" for s in spacing) + " mm"


def _placed(values: np.ndarray, offset, image_grid: Grid, where: str, warn) -> np.ndarray:
    """``values`` (z, y, x), whose first voxel is at ``offset`` (i, j, k) of ``image_grid``, on the whole grid."""
    placed = np.zeros(image_grid.size[::-1], dtype=np.uint16)
    source, target = [], []
    for start, extent, size in zip(offset[::-1], values.shape, image_grid.size[::-1]):
        low = max(start, 0)
        high = max(low, min(start + extent, size))
        source.append(slice(low - start, high - start))
        target.append(slice(low, high))
    placed[tuple(target)] = values[tuple(source)]
    _warn_outside(values, int(np.count_nonzero(placed)), where, warn)
    return placed
