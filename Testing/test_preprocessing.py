"""Pre-processing driven by the checkpoint, and its inversion back onto the input grid."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import crop, data_file
from hybridmim.errors import UserError
from hybridmim.geometry import Grid
from hybridmim.metrics import dice_per_label
from hybridmim.modelgrid import prepare, restore_labels
from hybridmim.preprocessing import Intensity, Preprocessing
from hybridmim.volumes import Case, check_case_label
from test_imageio import _rotation, assert_same_grid

CT_WINDOW = Intensity("window", (-200.0, 300.0))


@pytest.fixture(scope="module")
def ct_and_labels():
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    labels = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz"))))
    return ct, labels


def _round_trip(ct, labels, spec):
    model_input = prepare([ct], spec, labels)
    restored = restore_labels(model_input.label, model_input.grid, ct)
    return model_input, restored


@pytest.mark.parametrize("orientation", ["RAS", "LPS", "SLA"])
@pytest.mark.parametrize("spacing", [None, (3.0, 3.0, 3.0), (1.5, 1.5, 1.5), (1.5, 3.0, 1.0)])
@pytest.mark.parametrize("oblique", [False, True])
def test_label_inversion_is_exact_when_grids_nest(ct_and_labels, orientation, spacing, oblique):
    """Re-orienting, cropping and resampling to a spacing that divides the input's is undone exactly."""
    ct, labels = (sitk.Image(i) for i in ct_and_labels)
    if oblique:
        for image in (ct, labels):
            image.SetDirection(_rotation(0.25, -0.4))
    spec = Preprocessing(orientation, spacing, CT_WINDOW, foreground_threshold=-500, foreground_margin_mm=10)
    _, restored = _round_trip(ct, labels, spec)
    assert_same_grid(restored, labels)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels))


def test_coarser_model_grid_restores_onto_exact_input_grid():
    """ct_b (0.98 x 0.98 x 2 mm, LPS) through a 3 mm RAS model grid: exact geometry, organs kept."""
    ct = sitk.ReadImage(str(data_file("abdomen_ct/ct_b.nii.gz")))
    labels = sitk.ReadImage(str(data_file("abdomen_ct/ct_b_btcv13.nii.gz")))
    spec = Preprocessing("RAS", (3.0, 3.0, 3.0), CT_WINDOW, foreground_threshold=-500)
    model_input, restored = _round_trip(ct, labels, spec)
    assert model_input.grid.direction == (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    assert model_input.array.shape[0] == 1 and model_input.array.shape[1:] == model_input.label.shape
    assert_same_grid(restored, labels)
    dice = dice_per_label(sitk.GetArrayFromImage(restored), sitk.GetArrayFromImage(labels), [1, 6, 7, 8])
    assert all(d > 0.9 for d in dice.values()), dice  # only 3 mm resampling loss


def test_foreground_crop_keeps_body_and_margin(ct_and_labels):
    ct, _ = ct_and_labels
    spec = Preprocessing("RAS", None, CT_WINDOW, foreground_threshold=-500, foreground_margin_mm=6)
    padded = sitk.ConstantPad(ct, (20, 20, 0), (20, 20, 0), -1024)  # 60 mm of air each side in x and y
    model_input = prepare([padded], spec)
    # The body filled the crop, so the model grid is the crop plus a 6 mm (2 voxel) margin.
    assert model_input.grid.size == (ct.GetSize()[0] + 4, ct.GetSize()[1] + 4, ct.GetSize()[2])
    expected_origin = padded.TransformIndexToPhysicalPoint((18, 18, 0))
    np.testing.assert_allclose(model_input.grid.origin, expected_origin)


def test_window_maps_hounsfield_units_to_range():
    values = np.array([-1000.0, -200.0, 50.0, 300.0, 2000.0])
    np.testing.assert_allclose(CT_WINDOW.apply(values), [0.0, 0.0, 0.5, 1.0, 1.0])
    hybridmim_range = Intensity("window", (-1000.0, 1000.0), (0.001, 1.0))
    np.testing.assert_allclose(hybridmim_range.apply(np.array([-1000.0, 1000.0])), [0.001, 1.0])


def test_zscore_over_nonzero_voxels_of_real_mr():
    flair = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file(
        "brain_tumor_mr/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"))))[::4, ::4, ::4] * 3.0 + 7.0
    flair[flair == 7.0] = 0.0
    out = Intensity("zscore", nonzero=True).apply(flair)
    inside = flair != 0
    assert abs(out[inside].mean()) < 1e-4 and abs(out[inside].std() - 1) < 1e-3
    assert (out[~inside] == 0).all()


def test_multi_channel_input_stacks_channels():
    case = "brain_tumor_mr/brats_2013_pat0003_1/"
    channels = [sitk.ReadImage(str(data_file(case + name)))[::3, ::3, ::3]
                for name in ("Flair_subtrMeanDivStd.nii.gz", "T1c_subtrMeanDivStd.nii.gz")]
    spec = Preprocessing("RAS", (3.0, 3.0, 3.0), Intensity("zscore", nonzero=True))
    model_input = prepare(channels, spec)
    assert model_input.array.shape[0] == 2
    assert model_input.array.dtype == np.float32
    assert Grid.of(channels[0]).size == tuple(reversed(model_input.array.shape[1:]))


@pytest.mark.parametrize("bad, message", [
    ({"orientation": "RAX"}, "orientation"),
    ({"spacing": [1, 0, 1]}, "spacing"),
    ({"intensity": {"type": "window", "window": [100, -100]}}, "upper > lower"),
    ({"intensity": {"type": "minmax"}}, "unknown intensity"),
])
def test_bad_preprocessing_metadata_is_refused(bad, message):
    with pytest.raises(UserError, match=message):
        Preprocessing.from_dict({"orientation": "RAS", "intensity": {"type": "zscore"}, **bad})


def test_preprocessing_dict_round_trip():
    spec = Preprocessing("LPS", (1.0, 2.0, 3.0), Intensity("window", (-1000, 1000), (0.001, 1.0)), -500, 12)
    assert Preprocessing.from_dict(spec.to_dict()) == spec


def test_same_grid_means_every_corner_within_a_hundredth_of_a_voxel():
    grid = Grid((512, 512, 100), (0.8, 0.8, 2.0), (-200.0, -180.0, -500.0), tuple(np.eye(3).ravel()))
    def moved(**change):
        return Grid(**{**grid.__dict__, **change})
    assert grid.matches(moved(origin=(-200.0, -180.0 + 0.0009, -500.0)))  # a header rounded to 3 decimals
    assert grid.matches(moved(spacing=(0.8 + 1e-8, 0.8, 2.0)))  # float32 spacing
    assert not grid.matches(moved(origin=(-200.0, -180.0 + 0.02, -500.0)))  # 2.5 % of a voxel
    # 1e-4 mm a voxel is nothing for one voxel, 0.05 mm (6 %) at the far side of 512: spacing errors add up
    assert not grid.matches(moved(spacing=(0.8001, 0.8, 2.0)))
    tilt = np.radians(0.01)  # 0.01° also moves the far corner by 0.09 mm
    rotated = np.array([[1, 0, 0], [0, np.cos(tilt), -np.sin(tilt)], [0, np.sin(tilt), np.cos(tilt)]])
    assert not grid.matches(moved(direction=tuple(rotated.ravel())))
    assert not grid.matches(moved(size=(512, 512, 99)))


def test_a_label_map_a_rounding_away_is_taken_and_one_further_off_refused_before_preparing(tmp_path):
    """The header check before preparing and the check on the voxels are one test: a label map the first
    accepts is prepared (before, a 0.0009 mm origin passed the first and failed the second, unnamed)."""
    image = sitk.ReadImage(str(data_file("sarcoma_ct/STS_005/image.nii.gz")))[100:164, 100:164, 10:42]
    label = sitk.ReadImage(str(data_file("sarcoma_ct/STS_005/label.nii.gz")))[100:164, 100:164, 10:42]
    spec = Preprocessing(orientation="RAS", spacing=(1.5, 1.5, 2.0), intensity=CT_WINDOW)
    case = Case("STS_005", (tmp_path / "image.nrrd",), tmp_path / "label.nrrd")
    sitk.WriteImage(image, str(case.channels[0]))
    for shift, accepted in ((0.0009, True), (0.05, False)):
        moved = sitk.Image(label)
        moved.SetOrigin(np.add(label.GetOrigin(), (0.0, shift, 0.0)).tolist())
        sitk.WriteImage(moved, str(case.label))
        if accepted:
            check_case_label(case, [])
            assert prepare([image], spec, moved).label.any()
        else:
            with pytest.raises(UserError, match="^case STS_005: the label map's grid"):
                check_case_label(case, [])
            with pytest.raises(UserError, match="the label map's grid differs"):
                prepare([image], spec, moved)
