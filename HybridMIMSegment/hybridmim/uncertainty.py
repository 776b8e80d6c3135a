"""Where the model hesitates: per output channel, the voxels whose probability lies between ``UNSURE``'s bounds.

Set beside a segment's volume, that count says how sure the model was of its outline. What a share means
depends on the model, so each model card gives it on validation cases (``docs/models/``): on ``sarcoma-ct``'s
the five tumours whose unsure volume came to 0.9 of their own or more were its five worst segmented; the
default abdominal model is unsure of several times more of most organs on a scan unlike its training scan.
"""

from __future__ import annotations

import numpy as np

# A voxel is unsure for a channel when the model gives that channel a probability within these bounds.
UNSURE = (0.1, 0.9)
_SLAB = 8  # z planes at a time: the probabilities are never held for the whole volume


def unsure_voxels(logits) -> np.ndarray:
    """Per output channel of ``logits`` (channels, z, y, x: numpy, or a torch tensor on any device), the number
    of voxels where the softmax probability of that channel lies strictly between the bounds of ``UNSURE``."""
    low, high = UNSURE
    counts = np.zeros(logits.shape[0], np.int64)
    for z in range(0, logits.shape[1], _SLAB):
        slab = logits[:, z:z + _SLAB]
        slab = slab.float().cpu().numpy() if hasattr(slab, "cpu") else np.asarray(slab, np.float32)
        exp = np.exp(slab - slab.max(axis=0))
        total = exp.sum(axis=0)
        # p = exp / total, compared without dividing
        counts += ((exp > low * total) & (exp < high * total)).reshape(len(exp), -1).sum(axis=1)
    return counts
