"""Augmentations of segmentation training crops (MONAI transforms and two of our own)."""

from __future__ import annotations

from monai.transforms import (
    Compose,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandFlipd,
    RandGaussianNoised,
    RandGaussianSmoothd,
    RandHistogramShiftd,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
)


class RandAxialSlabd(RandomizableTransform, MapTransform):
    """Keep only a random slab of axial slices; blank the rest like padding.

    Teaches the network scans with a short z-coverage (a few centimetres),
    which sliding-window inference pads with zeros.
    """

    def __init__(self, keys, prob: float, min_slices: int, max_slices: int):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, keys)
        self.min_slices, self.max_slices = min_slices, max_slices

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        d = dict(data)
        depth = d[self.keys[0]].shape[1]
        thickness = int(self.R.randint(self.min_slices, min(self.max_slices, depth) + 1))
        start = int(self.R.randint(0, depth - thickness + 1))
        for key in self.keys:
            blanked = d[key].clone()
            blanked[:, :start] = 0
            blanked[:, start + thickness:] = 0
            d[key] = blanked
        return d


class RandLabelIntensityShiftd(RandomizableTransform, MapTransform):
    """Shift each labelled structure's intensity by its own random amount.

    Simulates contrast enhancement, which brightens organs and vessels by
    different amounts (tens to hundreds of HU) while fat and air stay put;
    a global shift cannot teach that. ``shift_range`` is in normalised units.
    """

    def __init__(self, image_key: str, label_key: str, prob: float, shift_range: tuple[float, float]):
        RandomizableTransform.__init__(self, prob)
        MapTransform.__init__(self, (image_key, label_key))
        self.image_key, self.label_key = image_key, label_key
        self.shift_range = shift_range

    def __call__(self, data):
        self.randomize(None)
        if not self._do_transform:
            return data
        d = dict(data)
        label = d[self.label_key][0].long()
        shifts = self.R.uniform(*self.shift_range, size=int(label.max()) + 1)
        shifts[0] = 0.0
        shift_map = d[self.image_key].new_tensor(shifts)[label]
        d[self.image_key] = d[self.image_key] + shift_map[None]
        return d


def _rotate_and_scale(keys, roi_size, device=None):
    return RandAffined(keys, prob=0.8, rotate_range=(0.26, 0.26, 0.26), scale_range=(0.15, 0.15, 0.15),
                       spatial_size=roi_size, mode=("bilinear", "nearest"), padding_mode="zeros", device=device)


def _intensity_changes() -> list:
    return [
        RandHistogramShiftd("image", num_control_points=(5, 10), prob=0.3),
        RandScaleIntensityd("image", factors=0.25, prob=0.6),
        RandShiftIntensityd("image", offsets=0.2, prob=0.6),
        RandAdjustContrastd("image", gamma=(0.6, 1.6), prob=0.4),
        RandGaussianSmoothd("image", prob=0.1),
        RandGaussianNoised("image", std=0.02, prob=0.2),
    ]


def crop_augmentations(roi_size, organ_contrast: bool = False, axial_slabs: bool = False, flips: bool = False,
                       device=None) -> Compose:
    """Rotation, scaling and intensity changes of an already sampled crop (1.25 × the ROI) down to the ROI.

    ``organ_contrast``: also shift each labelled structure's intensity (imitates contrast phases on CT).
    ``axial_slabs``: sometimes keep only a slab of slices (scans that cover a few centimetres).
    ``flips``: mirror along each axis with probability 0.5 — only for labels without a side (a tumour;
    not left and right organs). ``device``: where the resampling runs (the crops should already be there).
    """
    keys = ("image", "label")
    roi_size = tuple(int(r) for r in roi_size)
    shift = RandLabelIntensityShiftd("image", "label", prob=0.5, shift_range=(-0.05, 0.35))
    contrast = [shift] if organ_contrast else []
    # Slabs last: the blanked slices stay exact zeros, as the padding of a thin scan is at inference.
    slabs = [RandAxialSlabd(keys, prob=0.4, min_slices=max(4, roi_size[0] // 8), max_slices=roi_size[0] // 2)
             ] if axial_slabs else []
    mirrors = [RandFlipd(keys, prob=0.5, spatial_axis=axis) for axis in range(3)] if flips else []
    return Compose([_rotate_and_scale(keys, roi_size, device), *mirrors, *contrast, *_intensity_changes(), *slabs])
