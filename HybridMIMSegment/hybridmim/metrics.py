"""Overlap metrics between label maps."""

from __future__ import annotations

import numpy as np


def dice_per_label(prediction: np.ndarray, reference: np.ndarray, values) -> dict[int, float | None]:
    """Dice of each label value; None where the label is in neither map."""
    scores = {}
    for value in values:
        p, r = prediction == value, reference == value
        total = int(p.sum()) + int(r.sum())
        scores[int(value)] = None if total == 0 else 2.0 * int(np.logical_and(p, r).sum()) / total
    return scores
