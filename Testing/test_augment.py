"""Fine-tuning's own augmentations on a real cropped CT: per-structure contrast shifts, axial slabs."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import torch

from hybridmim.training.augment import RandAxialSlabd, RandLabelIntensityShiftd, crop_augmentations


def _crop_tensors(abdomen_crop):
    def read(path, dtype):
        return torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(dtype))[None]

    image, label = read(abdomen_crop["image"], np.float32), read(abdomen_crop["label"], np.int64)
    return image, label


def _augmented(augment, image, label, seeds: int):
    """``augment``'s outputs for the crop (image, label), one per seed 0 … seeds - 1."""
    for seed in range(seeds):
        augment.set_random_state(seed=seed)
        yield augment({"image": image.clone(), "label": label.clone()})


def test_label_intensity_shift_moves_each_structure_by_one_constant(abdomen_crop):
    image, label = _crop_tensors(abdomen_crop)
    shift = RandLabelIntensityShiftd("image", "label", prob=1.0, shift_range=(0.1, 0.3))
    shift.set_random_state(0)
    out = shift({"image": image, "label": label})
    delta = out["image"] - image
    assert (delta[label == 0] == 0).all()
    for value in (1, 6, 7):
        region = delta[label == value]
        assert 0.1 <= float(region[0]) <= 0.3 and torch.allclose(region, region[0].expand_as(region), atol=1e-3)

    slab = RandAxialSlabd(("image", "label"), prob=1.0, min_slices=4, max_slices=8)
    slab.set_random_state(0)
    out = slab({"image": image + 1, "label": label})
    kept = (out["image"][0] != 0).flatten(1).any(1)
    assert 4 <= int(kept.sum()) <= 8
    assert (out["label"][0][~kept] == 0).all()


def test_finetune_crops_get_axial_slabs_only_when_asked(abdomen_crop):
    image, label = _crop_tensors(abdomen_crop)
    image = (image[:, :48, :64, :64] + 1100.0) / 1000.0  # positive everywhere, like a normalised crop
    label = label[:, :48, :64, :64]

    def blanked_slices(axial_slabs: bool) -> list[int]:
        counts = []
        for out in _augmented(crop_augmentations((32, 48, 48), axial_slabs=axial_slabs), image, label, seeds=12):
            empty = (out["image"][0] == 0).flatten(1).all(1)
            assert (out["label"][0][empty] == 0).all()
            counts.append(int(empty.sum()))
        return counts

    # rotations leave at most a corner slice empty; a slab blanks at least half the crop's slices
    assert max(blanked_slices(False)) < 16
    assert sum(c >= 16 for c in blanked_slices(True)) >= 2


def test_finetune_crops_are_mirrored_only_when_asked_image_and_label_together(abdomen_crop):
    _, label = _crop_tensors(abdomen_crop)
    label = label[:, :48, :64, :64]
    # the structure lying furthest to one side along x; the image is that structure (2) on 1 elsewhere, so
    # any misalignment of image and label shows as a smaller contrast inside the label
    offsets = {int(v): float(torch.nonzero(label[0] == v)[:, 2].float().mean()) - 31.5 for v in label.unique() if v
               and int((label == v).sum()) > 500}
    organ = max(offsets, key=lambda v: abs(offsets[v]))
    image = (label == organ).float() + 1.0

    def same_side(flips: bool) -> list[bool]:
        sides = []
        for out in _augmented(crop_augmentations((32, 48, 48), flips=flips), image, label, seeds=16):
            inside = out["label"][0] == organ
            assert inside.sum() > 100
            assert float(out["image"][0][inside].mean() - out["image"][0][~inside].mean()) > 0.3
            sides.append((float(torch.nonzero(inside)[:, 2].float().mean()) - 23.5) * offsets[organ] > 0)
        return sides

    assert all(same_side(False))  # rotations of up to 15° keep it on its side
    mirrored = same_side(True).count(False)
    assert 3 <= mirrored <= 13, mirrored
