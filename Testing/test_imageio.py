"""I/O round trips keep geometry: NIfTI, NRRD, MHA, a DICOM series, oblique grids, .seg.nrrd."""

from __future__ import annotations

import gzip
import json
import os
import struct
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio

from conftest import REPO, crop, data_file
from hybridmim import imageio
from hybridmim.errors import NotAScan, UserError
from hybridmim.geometry import Grid
from hybridmim.imageio import (LabelmapOrigin, dicom_series, labelmap_model, labelmap_unsure_ml, read_channels,
                               read_volume, write_labelmap)
from hybridmim.labels import parse_labels

BTCV = parse_labels(json.loads((REPO / "scripts/labels/btcv13.json").read_text(encoding="utf-8")))


def _rotation(ax: float, az: float) -> tuple[float, ...]:
    cx, sx, cz, sz = np.cos(ax), np.sin(ax), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return tuple((rz @ rx @ np.diag([-1, -1, 1])).ravel())


@pytest.fixture(scope="module")
def label_crop() -> sitk.Image:
    return crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz"))))


def assert_same_grid(a: sitk.Image, b: sitk.Image, tolerance: float = 1e-9) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), atol=tolerance)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=tolerance)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=tolerance)


@pytest.mark.parametrize("suffix, tolerance", [(".nii.gz", 1e-5), (".nrrd", 1e-9), (".mha", 1e-9)])
@pytest.mark.parametrize("oblique", [False, True])
def test_labelmap_round_trip_keeps_grid(tmp_path, label_crop, suffix, tolerance, oblique):
    image = sitk.Image(label_crop)
    if oblique:
        image.SetDirection(_rotation(0.3, 0.5))
    path = tmp_path / f"labels{suffix}"
    write_labelmap(image, path, BTCV)
    back = read_volume(path)
    # NIfTI stores its matrix in single precision: agreement to 1e-5 is all the format allows.
    assert_same_grid(back, image, tolerance)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    assert not list(tmp_path.glob(".*partial*")), "temporary file left behind"


@pytest.mark.parametrize("oblique", [False, True])
def test_seg_nrrd_carries_names_colours_terminology_and_grid(tmp_path, label_crop, oblique):
    image = sitk.Image(label_crop)
    if oblique:
        image.SetDirection(_rotation(-0.2, 0.7))
    path = tmp_path / "result.seg.nrrd"
    write_labelmap(image, path, BTCV)

    seg = slicerio.read_segmentation(str(path))
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {label.name for label in BTCV}
    spleen = by_name["spleen"]
    assert spleen["labelValue"] == 1
    assert spleen["terminology"]["type"] == ["SCT", "78961009", "Spleen"]
    assert spleen["terminology"]["category"] == ["SCT", "123037004", "Anatomical Structure"]
    assert by_name["left kidney"]["terminology"]["typeModifier"] == ["SCT", "7771000", "Left"]
    np.testing.assert_allclose(spleen["color"], np.array([157, 108, 162]) / 255, atol=1e-6)
    np.testing.assert_allclose(seg["ijkToLPS"], Grid.of(image).ijk_to_lps(), atol=1e-9)
    np.testing.assert_array_equal(seg["voxels"].transpose(2, 1, 0), sitk.GetArrayFromImage(image))
    # Any ITK reader sees the same grid as the input.
    assert_same_grid(sitk.ReadImage(str(path)), image)


def _write_dicom_series(image: sitk.Image, folder, series_uid: str = "1.2.826.0.1.3680043.2.1125.1.424242",
                        prefix: str = "slice", skip: tuple[int, ...] = (), position=None) -> None:
    """One file per slice; ``skip``: slices left out; ``position(k)``: slice k's Image Position (default: its
    place on the image's grid)."""
    image = sitk.Cast(image, sitk.sitkInt16)
    folder.mkdir(parents=True, exist_ok=True)
    d = image.GetDirection()
    position = position or (lambda k: image.TransformIndexToPhysicalPoint((0, 0, k)))
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k in (k for k in range(image.GetDepth()) if k not in skip):
        slice_k = image[:, :, k]
        for tag, value in (
            ("0008|0060", "CT"), ("0020|000d", series_uid + ".1"), ("0020|000e", series_uid),
            ("0020|0037", "\\".join(str(v) for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
            ("0020|0032", "\\".join(str(v) for v in position(k))),
            ("0020|0013", str(k + 1)), ("0008|0018", f"{series_uid}.{k + 100}"),
        ):
            slice_k.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{prefix}{k:03d}.dcm"))
        writer.Execute(slice_k)


def test_dicom_series_folder_reads_with_geometry(tmp_path):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    folder = tmp_path / "dicom"
    folder.mkdir()
    _write_dicom_series(ct, folder)
    warnings = []
    back = read_volume(folder, warnings.append)
    assert_same_grid(back, ct, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct))
    assert warnings == []


def write_enhanced_ct(ct: sitk.Image, path) -> sitk.Image:
    """``ct`` as one Enhanced CT file, a frame a slice, as scanners export it; returns what the file holds (unsigned,
    as CTs often are stored: GDCM writes no signed multi-frame)."""
    stored = sitk.Cast(sitk.Clamp(ct + 1024, lowerBound=0, upperBound=4095), sitk.sitkUInt16)
    stored.SetMetaData("0008|0060", "CT")  # else ITK writes a secondary capture
    sitk.WriteImage(stored, str(path), imageIO="GDCMImageIO")
    return stored


def test_a_folder_holding_one_multi_frame_dicom_reads_as_its_volume(tmp_path):
    """Scanners export Enhanced CT and MR as one file of many frames: its folder (a PACS export) reads as the file
    does, not as a 4-D stack of one volume."""
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    folder = tmp_path / "export" / "series"
    folder.mkdir(parents=True)
    stored = write_enhanced_ct(ct, folder / "IM0001")
    header = imageio.read_header(folder / "IM0001")
    assert (header.GetMetaData("0008|0016"), header.GetMetaData("0028|0008").strip()) == (
        "1.2.840.10008.5.1.4.1.1.2.1", str(ct.GetDepth()))  # Enhanced CT Image Storage, one frame a slice
    warnings = []
    back = read_volume(folder, warnings.append)
    assert_same_grid(back, ct, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(stored))
    assert warnings == []


@pytest.mark.parametrize("oblique", [False, True])
def test_a_series_missing_a_slice_is_put_back_on_an_even_grid_with_the_gap_interpolated(tmp_path, capfd, oblique):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    if oblique:
        ct.SetDirection(_rotation(0.3, 0.5))
    gap = ct.GetDepth() // 2
    _write_dicom_series(ct, tmp_path, skip=(gap,))
    capfd.readouterr()
    warnings = []
    back = read_volume(tmp_path, warnings.append)
    # ITK alone stacks the rest at the mean spacing (every slice after the gap out of place) and says so only in
    # a multi-line warning on stderr
    assert capfd.readouterr().err == ""
    assert_same_grid(back, ct, 1e-4)
    voxels, expected = sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct).astype(np.int16)
    np.testing.assert_array_equal(np.delete(voxels, gap, axis=0), np.delete(expected, gap, axis=0))
    # halfway between its neighbours (rounded; a weight of 0.5 ± float error on the oblique grid)
    halfway = (expected[gap - 1].astype(float) + expected[gap + 1]) / 2
    assert np.abs(voxels[gap] - halfway).max() <= 0.5 + 1e-6
    spacing = ct.GetSpacing()[2]
    assert warnings == [f"{tmp_path}: slice gaps are uneven ({spacing:.2f} to {2 * spacing:.2f} mm: a missing "
                        f"slice?); resampled to an even {spacing:.2f} mm ({ct.GetDepth()} slices from "
                        f"{ct.GetDepth() - 1}), the grid the label map is written on"]


@pytest.mark.parametrize("skip", [(), (30,)])
def test_a_tilted_series_is_shifted_back_onto_an_untilted_grid(tmp_path, capfd, skip):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    origin, spacing = np.array(ct.GetOrigin()), ct.GetSpacing()
    # Each slice 0.3 of its spacing further along y than the one before: a gantry tilted by atan(0.3), 17°;
    # ITK alone stacks them 3.13 mm apart (the distance between slices, not along their normal), unshifted.
    where = tmp_path / "tilted"
    _write_dicom_series(ct, where, skip=skip, position=lambda k: origin + k * spacing[2] * np.array([0.0, 0.3, 1.0]))
    warnings = []
    back = read_volume(where, warnings.append)
    drift = 0.3 * spacing[2] * (ct.GetDepth() - 1)  # 49.5 mm: 16.5 rows, so 17 more on a grid kept on slice 0's
    assert warnings[0] == (f"{where}: the slices shift sideways along the series (a tilted gantry, about 17°, "
                           f"{drift:.1f} mm at its far end); resampled onto an untilted grid (96 x 89 voxels a "
                           "slice), the grid the label map is written on")
    assert len(warnings) == 1 + len(skip) and capfd.readouterr().err == ""
    assert back.GetSize() == (ct.GetWidth(), 89, ct.GetDepth())
    np.testing.assert_allclose(back.GetSpacing(), spacing, atol=1e-6)
    assert back.GetDirection() == ct.GetDirection()
    # Slices shifted by whole rows (every tenth, but a missing one) hold the scan's voxels unchanged, each at its
    # true place.
    voxels, written = sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(ct)
    for k in sorted(set(range(0, ct.GetDepth(), 10)) - set(skip)):
        place = origin + k * spacing[2] * np.array([0.0, 0.3, 1.0])
        x, y, z = back.TransformPhysicalPointToIndex(place.tolist())
        assert (x, z) == (0, k)
        np.testing.assert_array_equal(voxels[z, y:y + ct.GetHeight(), :], written[k])


def test_one_slice_placed_sideways_is_not_taken_for_a_tilt(tmp_path):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    origin, spacing = np.array(ct.GetOrigin()), ct.GetSpacing()
    # slice 20's position 20 mm off to the side: no steady drift, so nothing to shift back
    _write_dicom_series(ct, tmp_path / "odd", position=lambda k: origin + k * spacing[2] * np.eye(3)[2]
                        + (k == 20) * np.array([20.0, 0.0, 0.0]))
    warnings = []
    back = read_volume(tmp_path / "odd", warnings.append)
    assert_same_grid(back, ct, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(ct))
    assert len(warnings) == 1 and "lie sideways of each other irregularly (up to 19.9 mm off" in warnings[0]
    assert warnings[0].endswith("read as if in line, so outlines may be off by up to 20.0 mm")


@pytest.mark.parametrize("same_size", [False, True])
def test_a_localiser_filed_under_the_series_uid_is_left_out_with_a_warning(tmp_path, capfd, same_size):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    series_uid = "1.2.826.0.1.3680043.2.1125.1.424242"
    _write_dicom_series(ct, tmp_path / "series", series_uid)
    # A sagittal localiser (72 x 56) fails ITK's stacking; a coronal one of the axial slices' size (96 x 72)
    # stacks, at the wrong place and orientation.
    array = sitk.GetArrayFromImage(ct)
    plane = array[10] if same_size else array[:, :, 48]
    localiser = sitk.GetImageFromArray(plane.astype(np.int16)[None])
    localiser.SetDirection((1, 0, 0, 0, 0, -1, 0, 1, 0) if same_size else (0, 0, 1, 1, 0, 0, 0, -1, 0))
    localiser.SetOrigin(ct.TransformIndexToPhysicalPoint((0, 36, 0)))
    _write_dicom_series(localiser, tmp_path / "series", series_uid, prefix="localiser")
    warnings = []
    back = read_volume(tmp_path / "series", warnings.append)
    assert_same_grid(back, ct, 1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), array)
    assert warnings == [f"{tmp_path / 'series'}: 1 of the series' {ct.GetDepth() + 1} files left out, of another "
                        f"image size or orientation than the other {ct.GetDepth()} or unreadable (a localiser or a "
                        "reformat filed under the series?)"]
    assert capfd.readouterr().err == ""


def test_a_series_with_two_slices_in_one_place_is_refused(tmp_path):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    origin, spacing = np.array(ct.GetOrigin()), ct.GetSpacing()
    _write_dicom_series(ct, tmp_path / "twice", position=lambda k: origin + (k - (k > 3)) * spacing[2] * np.eye(3)[2])
    with pytest.raises(UserError, match="slices 4 and 5 of the series lie at the same place"):
        read_volume(tmp_path / "twice")
    # Slices imaged at two places again and again (a contrast bolus tracked): no 3-D scan, which a pool leaves out.
    _write_dicom_series(ct, tmp_path / "tracking", position=lambda k: origin + (k % 2) * spacing[2] * np.eye(3)[2])
    with pytest.raises(NotAScan, match=f"its {ct.GetDepth()} slices lie at 2 places, each about "
                                       f"{ct.GetDepth() // 2} times: the same slices imaged again and again "
                                       r"\(bolus tracking\?\) or its files present more than once, not one 3-D scan"):
        read_volume(tmp_path / "tracking")


SERIES_UIDS = {"abdomen": "1.2.826.0.1.3680043.2.1125.1.501", "chest": "1.2.826.0.1.3680043.2.1125.1.502",
               "localiser": "1.2.826.0.1.3680043.2.1125.1.503"}


def write_study_in_one_folder(folder) -> dict[str, sitk.Image]:
    """Three DICOM series in one folder, as some exports write a study: an abdominal CT, a chest CT (both real,
    cropped) and a two-image localiser."""
    folder.mkdir(parents=True)
    images = {"abdomen": crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))),
              "chest": sitk.ReadImage(str(data_file("lung_tumor_ct/image.nii.gz")))[30:174, 40:170, 10:30]}
    images["localiser"] = images["abdomen"][:, :, :2]
    for name, image in images.items():
        _write_dicom_series(image, folder, SERIES_UIDS[name], prefix=name)
    return images


def test_a_folder_of_several_series_reads_the_one_asked_for_or_the_largest_with_a_warning(tmp_path):
    images = write_study_in_one_folder(tmp_path / "study")
    series = dicom_series(tmp_path / "study")
    assert {uid: len(files) for uid, files in series.items()} == \
        {SERIES_UIDS[name]: image.GetDepth() for name, image in images.items()}
    for name in ("abdomen", "chest"):
        back = read_volume(tmp_path / "study", series=SERIES_UIDS[name])
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(images[name]))
    warnings = []
    largest = read_volume(tmp_path / "study", warnings.append)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(largest), sitk.GetArrayFromImage(images["abdomen"]))
    assert warnings == [f"{tmp_path / 'study'} holds 3 DICOM series; using the largest "
                        f"({images['abdomen'].GetDepth()} images, {SERIES_UIDS['abdomen']}); `segment --data` takes "
                        "each series as a case"]
    with pytest.raises(UserError, match="no DICOM series 1.2.3 in it"):
        read_volume(tmp_path / "study", series="1.2.3")


def test_a_multi_frame_series_counts_its_frames_as_images(tmp_path):
    """An Enhanced CT (one file) beside a chest series of 20 files and a two-image localiser: it is the largest
    series, and a scan, not a localiser, for `segment --data` and pre-training (counted by files, it had been read
    as neither: left out as a series of one image)."""
    from hybridmim.volumes import find_cases

    images = write_study_in_one_folder(tmp_path / "study")
    for path in (tmp_path / "study").glob("abdomen*.dcm"):  # the abdomen, as an Enhanced CT instead
        path.unlink()
    enhanced = write_enhanced_ct(images["abdomen"], tmp_path / "study" / "enhanced.dcm")
    warnings = []
    largest = read_volume(tmp_path / "study", warnings.append)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(largest), sitk.GetArrayFromImage(enhanced))
    assert f"using the largest ({images['abdomen'].GetDepth()} images, " in warnings[0]
    warnings = []
    cases = find_cases([tmp_path / "study"], dicom=True, warn=warnings.append)
    read = sorted(sitk.GetArrayFromImage(read_volume(c.channels[0], series=c.series)).shape for c in cases)
    assert read == sorted(sitk.GetArrayFromImage(images[name]).shape for name in ("abdomen", "chest"))
    assert warnings == [f"{tmp_path / 'study'}: 1 of its 3 DICOM series left out, of fewer than 10 images each "
                        "(localisers?)"]


def test_extra_channel_on_another_grid_is_resampled_with_warning(tmp_path):
    ct = crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))))
    sitk.WriteImage(ct, str(tmp_path / "a.nii.gz"))
    sitk.WriteImage(ct[::2, ::2, :], str(tmp_path / "b.nii.gz"))
    warnings = []
    channels = read_channels([tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"], warnings.append)
    assert len(warnings) == 1 and "different grid" in warnings[0] and "covers only" not in warnings[0]
    assert Grid.of(channels[1]).matches(Grid.of(channels[0]))


def test_extra_channel_covering_part_of_the_grid_is_filled_with_its_lowest_value(tmp_path):
    """A T1c slab beside a whole-brain FLAIR (sequences of one study cover different fields of view): outside the
    slab, the z-scored T1c's background (its lowest value), not zero, which is brighter than its mean tissue."""
    case = "brain_tumor_mr/brats_2013_pat0003_1"
    flair = sitk.ReadImage(str(data_file(f"{case}/Flair_subtrMeanDivStd.nii.gz")))[60:180, 60:180, 40:120]
    t1c = sitk.ReadImage(str(data_file(f"{case}/T1c_subtrMeanDivStd.nii.gz")))[60:180, 60:180, 70:100]
    sitk.WriteImage(flair, str(tmp_path / "flair.nii.gz"))
    sitk.WriteImage(t1c, str(tmp_path / "t1c.nii.gz"))
    warnings = []
    channels = read_channels([tmp_path / "flair.nii.gz", tmp_path / "t1c.nii.gz"], warnings.append)
    lowest = float(sitk.GetArrayViewFromImage(t1c).min())
    assert lowest < -1
    assert warnings == [f"{tmp_path / 't1c.nii.gz'} is on a different grid from {tmp_path / 'flair.nii.gz'}; "
                        f"resampling it onto that grid, which it covers only 38% of: the rest is filled with its "
                        f"lowest value ({lowest:g}), where the model sees none of it"]
    filled = sitk.GetArrayFromImage(channels[1])
    np.testing.assert_allclose(filled[30:60], sitk.GetArrayViewFromImage(t1c), atol=1e-5)  # the slab's own voxels
    assert (filled[:30] == np.float32(lowest)).all() and (filled[60:] == np.float32(lowest)).all()

    elsewhere = sitk.Image(t1c)
    elsewhere.SetOrigin([o + 500.0 for o in t1c.GetOrigin()])
    sitk.WriteImage(elsewhere, str(tmp_path / "elsewhere.nii.gz"))
    with pytest.raises(UserError, match="elsewhere.nii.gz and .*flair.nii.gz do not overlap in space"):
        read_channels([tmp_path / "flair.nii.gz", tmp_path / "elsewhere.nii.gz"])


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "no such file"),
    (lambda p: (p.write_bytes(b""), p)[1], "empty file"),
    (lambda p: (p.write_text("not an image", encoding="utf-8"), p)[1], "not a readable image"),
    (lambda p: (p.write_text("hi\n", encoding="utf-8"), p)[1], "not a readable image"),
    (lambda p: (p.write_bytes(gzip.compress(b"hi")), p)[1], "not a readable image"),
])
def test_unreadable_inputs_raise_user_errors(tmp_path, make, message):
    path = make(tmp_path / "input.nii.gz")
    with pytest.raises(UserError, match=message):
        read_volume(path)


def test_a_sheared_nifti_is_refused_in_one_line_saying_so(tmp_path, capfd):
    header = bytearray(gzip.decompress(data_file("abdomen_ct/ct_a.nii.gz").read_bytes()))
    srow_x = list(struct.unpack("<4f", header[280:296]))
    srow_x[1] = 1.5  # x moves with j: a sheared grid, given by the sform alone
    header[280:296] = struct.pack("<4f", *srow_x)
    header[252:256] = struct.pack("<hh", 0, 1)
    path = tmp_path / "sheared.nii.gz"
    path.write_bytes(gzip.compress(bytes(header)))
    with pytest.raises(UserError) as error:
        read_volume(path)
    assert str(error.value) == (f"{path}: its axes are not at right angles (a sheared grid, which ITK cannot hold): "
                                "resample it onto a grid without shear first")
    assert capfd.readouterr().err == ""


def test_dicom_folder_without_series(tmp_path):
    with pytest.raises(NotAScan, match="no DICOM image series in it"):
        read_volume(tmp_path)


@pytest.mark.parametrize("suffix", [".seg.nrrd", ".nrrd", ".mha", ".nii.gz"])
def test_what_made_a_label_map_is_in_its_header(tmp_path, label_crop, suffix):
    path = tmp_path / f"labels{suffix}"
    write_labelmap(label_crop, path, BTCV, LabelmapOrigin("hybridmim 9.9", "my-model", "ab" * 32),
                   {6: 12.345, 1: 0.0})
    header = sitk.ReadImage(str(path))
    if suffix == ".nii.gz":  # NIfTI has one 80-character description
        assert header.GetMetaData("descrip") == f"hybridmim 9.9; my-model; {'ab' * 32}"[:79]
    else:
        assert {k: header.GetMetaData(k) for k in header.GetMetaDataKeys() if k.startswith("HybridMIM_")} == {
            "HybridMIM_engine": "hybridmim 9.9", "HybridMIM_model": "my-model", "HybridMIM_model_sha256": "ab" * 32,
            "HybridMIM_unsure_ml": '{"1": 0.0, "6": 12.35}'}
    if suffix == ".seg.nrrd":  # and the segments are still Slicer's
        assert [s["name"] for s in slicerio.read_segmentation(str(path))["segments"]][:2] == ["spleen", "right kidney"]
    # read back: the whole digest, or from NIfTI's description what fits (79 characters in all)
    digest = "ab" * 32 if suffix != ".nii.gz" else ("ab" * 32)[:79 - len("hybridmim 9.9; my-model; ")]
    assert labelmap_model(path) == ("hybridmim 9.9", "my-model", digest)
    assert labelmap_unsure_ml(path) == (None if suffix == ".nii.gz" else {1: 0.0, 6: 12.35})
    made_elsewhere = tmp_path / f"elsewhere{suffix}"
    sitk.WriteImage(label_crop, str(made_elsewhere))
    assert labelmap_model(made_elsewhere) is None and labelmap_unsure_ml(made_elsewhere) is None


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a file every write to fails")
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd"])
def test_a_full_disk_is_one_line_and_leaves_no_file(tmp_path, label_crop, suffix, monkeypatch):
    """ITK's NIfTI writer does not notice a full disk (the file just ends early, and reads back without a word):
    a label map written where every write fails (ENOSPC, from the kernel), on a disk that reports no room."""
    path = tmp_path / f"labels{suffix}"
    stem = path.name[:-len(suffix)]
    (tmp_path / f".{stem}.partial-{os.getpid()}{suffix}").symlink_to("/dev/full")  # atomic_output's temporary file
    monkeypatch.setattr(imageio.shutil, "disk_usage", lambda folder: SimpleNamespace(free=0))
    with pytest.raises(UserError) as raised:
        write_labelmap(label_crop, path, BTCV)
    assert str(raised.value) == f"{path}: cannot be written: No space left on device"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_a_nifti_written_with_little_room_is_checked_and_kept_whole(tmp_path, label_crop, suffix, monkeypatch):
    room = sitk.Cast(label_crop, sitk.sitkUInt8).GetNumberOfPixels()  # less than the 1 MiB margin over the voxels
    verdicts = []
    holds = imageio._holds_all_voxels
    monkeypatch.setattr(imageio.shutil, "disk_usage", lambda folder: SimpleNamespace(free=room))
    monkeypatch.setattr(imageio, "_holds_all_voxels", lambda *args: verdicts.append(holds(*args)) or verdicts[-1])
    write_labelmap(label_crop, tmp_path / f"labels{suffix}", BTCV)
    assert verdicts == [True]  # checked, and found whole
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read_volume(tmp_path / f"labels{suffix}")),
                                  sitk.GetArrayFromImage(label_crop))
