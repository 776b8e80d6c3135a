"""The QA preview PNG: orthogonal slices through each segment's centre with the
overlay, and a 3-D surface rendering of all segments."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .atomic import atomic_output
from .geometry import voxel_ml
from .labels import Label


def segment_centres(labels_zyx: np.ndarray) -> dict[int, tuple[int, int, int]]:
    """Voxel centre of mass (z, y, x) of every non-zero label, in one pass."""
    flat = labels_zyx.ravel()
    index = np.flatnonzero(flat)
    if index.size == 0:
        return {}
    values = flat[index].astype(np.int64)
    coords = np.unravel_index(index, labels_zyx.shape)
    counts = np.bincount(values)
    centres = [np.bincount(values, weights=c) for c in coords]
    return {
        int(v): tuple(int(round(centres[a][v] / counts[v])) for a in range(3))
        for v in np.flatnonzero(counts)
    }


def _display_range(image_zyx: np.ndarray, window) -> tuple[float, float]:
    if window is not None:
        return float(window[0]), float(window[1])
    low, high = np.percentile(image_zyx[:: max(1, image_zyx.shape[0] // 32)], (1, 99))
    return float(low), float(max(high, low + 1e-6))


def _orthogonal_views(spacing_xyz):
    """(name, slice taker, aspect (row/column spacing), origin) of the three planes of an LPS-ordered
    (z, y, x) array."""
    sx, sy, sz = spacing_xyz
    return (
        ("axial", lambda a, c: a[c[0]], sy / sx, "upper"),
        ("coronal", lambda a, c: a[:, c[1], :], sz / sx, "lower"),
        ("sagittal", lambda a, c: a[:, :, c[2]], sz / sy, "lower"),
    )


def _median_index(mask_zyx: np.ndarray) -> tuple[int, int, int]:
    """Per axis, the median index of the True voxels (the array's centre when there are none)."""
    if not mask_zyx.any():
        return tuple(n // 2 for n in mask_zyx.shape)
    centre = []
    for axis in range(3):
        counts = mask_zyx.sum(axis=tuple(a for a in range(3) if a != axis))
        centre.append(int(np.searchsorted(np.cumsum(counts), counts.sum() / 2)))
    return tuple(centre)


def lay_out(fig, title: str = "") -> None:
    """Panels laid out tight, ``title`` above them in a band of its own (tight_layout alone let it cover the top
    row's panel titles in a tall figure, such as an evaluation overlay of seven labels)."""
    if title:
        band = 0.45 / fig.get_figheight()  # 0.45 inch, as a share of the figure's height
        fig.suptitle(title, color="white", fontsize=11, y=1 - band / 5, va="top")
        fig.tight_layout(rect=(0, 0, 1, 1 - band))
    else:
        fig.tight_layout()


def _save_figure(fig, path: Path, dpi: int, title: str = "") -> None:
    import matplotlib.pyplot as plt

    lay_out(fig, title)
    with atomic_output(Path(path)) as tmp:
        fig.savefig(tmp, dpi=dpi, facecolor=fig.get_facecolor(), format="png")
    plt.close(fig)


def render_reconstruction_montage(original: sitk.Image, masked: sitk.Image, reconstruction: sitk.Image,
                                  error: sitk.Image, path: Path, window=None, title: str = "") -> None:
    """Write a PNG: rows axial, coronal, sagittal through the masked region's centre; columns original,
    masked input, reconstruction, absolute error (all on the input's grid, in its units)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arrays = [sitk.GetArrayFromImage(sitk.DICOMOrient(i, "LPS")) for i in (original, masked, reconstruction, error)]
    low, high = _display_range(arrays[0], window)
    error_high = float(np.percentile(arrays[3][arrays[3] > 0], 99)) if (arrays[3] > 0).any() else 1.0
    centre = _median_index(arrays[3] > 0)
    views = _orthogonal_views(sitk.DICOMOrient(original, "LPS").GetSpacing())
    columns = ("original", "masked input", "reconstruction", "absolute error")
    fig, axes = plt.subplots(3, 4, figsize=(12, 9.5), facecolor="black")
    for row, (view, take, aspect, origin) in enumerate(views):
        for col, (array, name) in enumerate(zip(arrays, columns)):
            ax = axes[row, col]
            if col == 3:
                ax.imshow(take(array, centre), cmap="inferno", vmin=0, vmax=error_high, aspect=aspect, origin=origin)
            else:
                ax.imshow(take(array, centre), cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin,
                          interpolation="bilinear")
            ax.set_title(f"{name} · {view}", color="white", fontsize=8)
            ax.axis("off")
    _save_figure(fig, path, dpi=90, title=title)


def render_preview(image: sitk.Image, labels: sitk.Image, label_table: list[Label], path: Path,
                   window=None, title: str = "") -> None:
    """Write the preview PNG atomically. ``window``: display range (e.g. the model's HU window)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .surface import render_label_surfaces

    # Display in LPS index order: axial slices then show the patient's right on the left.
    image_lps = sitk.DICOMOrient(image, "LPS")
    labels_lps = sitk.DICOMOrient(labels, "LPS")
    img = sitk.GetArrayViewFromImage(image_lps)
    lab = sitk.GetArrayFromImage(labels_lps)
    sx, sy, sz = image_lps.GetSpacing()
    low, high = _display_range(img, window)
    by_value = {label.value: label for label in label_table}
    lut = np.zeros((max(max(by_value, default=0), int(lab.max())) + 1, 4), dtype=np.float32)
    for value, label in by_value.items():
        lut[value] = (*np.asarray(label.color) / 255.0, 0.45)
    centres = segment_centres(lab)
    shown = [v for v in sorted(centres) if v in by_value]

    per_row = 2  # segments per row, three views each
    rows = 1 + math.ceil(len(shown) / per_row)
    fig = plt.figure(figsize=(3 * per_row * 2.3, 2.5 * rows + 3.5), facecolor="black")
    grid = fig.add_gridspec(rows, 3 * per_row, height_ratios=[6] + [2.5] * (rows - 1))
    ax3d = fig.add_subplot(grid[0, :3])
    ax3d.imshow(render_label_surfaces(lab, (sx, sy, sz), {v: l.color for v, l in by_value.items()}))
    ax3d.set_title("3-D surfaces (anterior view)", color="white", fontsize=10)
    ax3d.axis("off")
    legend = fig.add_subplot(grid[0, 3:])
    legend.axis("off")
    counts = np.bincount(lab.ravel(), minlength=lut.shape[0])
    lines = [(by_value[v].name, by_value[v].color, counts[v] * voxel_ml((sx, sy, sz))) for v in sorted(by_value)]
    for i, (name, color, volume) in enumerate(lines):
        y = 1 - (i + 1) / (len(lines) + 2)
        legend.add_patch(plt.Rectangle((0.02, y - 0.02), 0.05, 0.04, color=np.asarray(color) / 255))
        text = f"{name}: {volume:.1f} ml" if volume else f"{name}: not found"
        legend.text(0.1, y, text, color="white", va="center", fontsize=9)
    legend.set_title(title or "segments", color="white", fontsize=10)

    views = _orthogonal_views(image_lps.GetSpacing())
    for n, value in enumerate(shown):
        row, col0 = 1 + n // per_row, (n % per_row) * 3
        centre = centres[value]
        for k, (view, take, aspect, origin) in enumerate(views):
            ax = fig.add_subplot(grid[row, col0 + k])
            ax.imshow(take(img, centre), cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin,
                      interpolation="bilinear")
            labels_2d = take(lab, centre)
            ax.imshow(lut[labels_2d], aspect=aspect, origin=origin, interpolation="nearest")
            if (labels_2d == value).any():
                ax.contour(labels_2d == value, levels=[0.5], colors=[np.asarray(by_value[value].color) / 255],
                           linewidths=0.8)
            ax.set_title(f"{by_value[value].name} · {view}", color="white", fontsize=7)
            ax.axis("off")
    _save_figure(fig, path, dpi=90)


def render_comparison(image: sitk.Image, prediction: sitk.Image, reference: sitk.Image, label_table: list[Label],
                      path: Path, window=None, title: str = "") -> None:
    """Write a PNG for evaluation QA: for each label in either map, the three planes through its reference
    centre (the prediction's when the reference lacks it), reference outlined solid, prediction dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    image_lps = sitk.DICOMOrient(image, "LPS")
    img = sitk.GetArrayViewFromImage(image_lps)
    predicted, expected = (sitk.GetArrayFromImage(sitk.DICOMOrient(i, "LPS")) for i in (prediction, reference))
    low, high = _display_range(img, window)
    shown = [l for l in label_table if (expected == l.value).any() or (predicted == l.value).any()]
    views = _orthogonal_views(image_lps.GetSpacing())
    fig, axes = plt.subplots(max(1, len(shown)), 3, figsize=(9, 3 * max(1, len(shown))), facecolor="black",
                             squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for row, label in enumerate(shown):
        in_reference = expected == label.value
        centre = _median_index(in_reference if in_reference.any() else predicted == label.value)
        colour = np.asarray(label.color) / 255
        for col, (view, take, aspect, origin) in enumerate(views):
            ax = axes[row, col]
            ax.imshow(take(img, centre), cmap="gray", vmin=low, vmax=high, aspect=aspect, origin=origin,
                      interpolation="bilinear")
            for mask, style in ((take(expected, centre) == label.value, "solid"),
                                (take(predicted, centre) == label.value, "dashed")):
                if mask.any():
                    ax.contour(mask, levels=[0.5], colors=[colour], linewidths=1.0, linestyles=style)
            ax.set_title(f"{label.name} · {view}", color="white", fontsize=8)
    _save_figure(fig, path, dpi=90, title=title)
