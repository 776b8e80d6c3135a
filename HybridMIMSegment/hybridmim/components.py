"""Clean-up of a predicted label map on the model grid: a label that is one structure per scan (an organ,
a tumour) keeps its largest connected piece; the scattered false-positive islands become background."""

from __future__ import annotations

import numpy as np


def keep_largest_components(labels: np.ndarray, values) -> np.ndarray:
    """``labels`` (z, y, x) with each label value in ``values`` cut to its largest 6-connected piece; in place."""
    if not values:
        return labels
    import SimpleITK as sitk

    for value in values:
        mask = labels == value
        if not mask.any():
            continue
        pieces = sitk.GetArrayFromImage(
            sitk.RelabelComponent(sitk.ConnectedComponent(sitk.GetImageFromArray(mask.view(np.uint8))),
                                  sortByObjectSize=True))
        labels[mask & (pieces != 1)] = 0
    return labels
