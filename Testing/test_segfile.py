"""Slicer segmentation files read as label maps: placement on the scan's grid, segments matched to labels, the
files older Slicer versions wrote, and the warnings for what is left out."""

from __future__ import annotations

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk

from conftest import write_slicer_segmentation
from hybridmim.errors import UserError
from hybridmim.geometry import Grid
from hybridmim.labels import label_of_segment, parse_labels
from hybridmim.segfile import read_segmentation_labels

LABELS = parse_labels([
    {"value": 1, "name": "liver", "color": [1, 2, 3],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
    {"value": 2, "name": "kidney (left)", "color": [1, 2, 3],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "64033007", "Kidney"],
                     "typeModifier": ["SCT", "7771000", "Left"]}},
    {"value": 3, "name": "tumour core", "color": [1, 2, 3], "source_values": [4, 1000]},
])


def _scan(size=(10, 12, 8), spacing=(1.0, 2.0, 3.0)) -> sitk.Image:
    """A grid with an oblique direction, as scans have."""
    image = sitk.Image(size, sitk.sitkUInt8)
    image.SetSpacing(spacing)
    image.SetOrigin((-20.0, 5.0, 100.0))
    rotation = sitk.VersorTransform((0.0, 0.0, 1.0), 0.3)
    image.SetDirection(rotation.GetMatrix())
    return image


def test_a_box_of_a_grid_is_placed_by_whole_voxels_and_any_other_grid_is_not():
    scan = _scan()
    assert Grid.of(scan[2:6, 3:9, 1:8]).offset_in(Grid.of(scan)) == (2, 3, 1)
    wider = sitk.ConstantPad(scan, (2, 0, 0), (0, 0, 0))  # reaching beyond the scan
    assert Grid.of(wider).offset_in(Grid.of(scan)) == (-2, 0, 0)
    half = sitk.Image(scan[2:6, 3:9, 1:8])
    half.SetOrigin(tuple(np.add(half.GetOrigin(), 0.5)))
    assert Grid.of(half).offset_in(Grid.of(scan)) is None
    finer = sitk.Image(scan[2:6, 3:9, 1:8])
    finer.SetSpacing((0.5, 1.0, 1.5))
    assert Grid.of(finer).offset_in(Grid.of(scan)) is None


def test_segments_are_matched_by_name_then_by_codes_that_fit_one_label():
    kidney = {"category": ["SCT", "123037004", "x"], "type": ["SCT", "64033007", "y"]}
    left = {**kidney, "typeModifier": ["SCT", "7771000", "z"]}
    assert label_of_segment({"name": "Segment_1", "terminology": left}, LABELS).value == 2
    assert label_of_segment({"name": "liver", "terminology": left}, LABELS).value == 1  # the name Slicer shows
    older = {key: ["SRT", *code[1:]] for key, code in left.items()}  # as older Slicer versions wrote it
    assert label_of_segment({"name": "Segment_1", "terminology": older}, LABELS).value == 2
    assert label_of_segment({"name": "kidney", "terminology": kidney}, LABELS) is None  # no modifier: no kidney
    assert label_of_segment({"name": "  Tumour   CORE "}, LABELS).value == 3
    tissue = {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}  # Slicer's default
    generic = parse_labels([{"value": v, "name": f"Segment_{v}", "color": [0, 0, 0], "terminology": tissue}
                            for v in (1, 2)])
    assert label_of_segment({"name": "Segment_2", "terminology": tissue}, generic).value == 2
    assert label_of_segment({"name": "Segment_3", "terminology": tissue}, generic) is None  # codes fit both


def test_segments_become_their_labels_values_on_the_scan_with_what_was_left_out_named(tmp_path):
    scan = _scan()
    box = scan[-4:, 0:6, 2:8]  # its last two columns lie beyond the scan once moved two voxels on
    box.SetOrigin(scan.TransformIndexToPhysicalPoint((8, 0, 2)))
    liver, core, other = (np.zeros(box.GetSize()[::-1], bool) for _ in range(3))
    liver[0:3, 0:2, 0:2] = True
    core[2:4, 1:2, 0:4] = True  # overlaps the liver at 2 voxels, two of its columns outside the scan
    other[5, 5, 3] = True
    path = tmp_path / "label.seg.nrrd"
    write_slicer_segmentation(path, box, [{"name": "Liver", "mask": liver, "layer": 0, "value": 7},
                                          {"name": "tumour core", "mask": core, "layer": 1, "value": 7},
                                          {"name": "pencil mark", "mask": other, "layer": 0, "value": 2}])
    said = []
    labels = sitk.GetArrayFromImage(read_segmentation_labels(path, Grid.of(scan), LABELS, "case: file", said.append))
    assert said == ["case: file: segment 'pencil mark' is none of the labels ('liver', 'kidney (left)', "
                    "'tumour core') by terminology or name; read as background",
                    "case: file: 2 voxels lie in segments of two labels; each is read as the later segment's",
                    "case: file: 4 segment voxels lie outside the scan; left out"]
    expected = np.zeros(scan.GetSize()[::-1], np.uint16)
    expected[2:8, 0:6, 8:10][liver[:, :, :2]] = 1
    expected[2:8, 0:6, 8:10][core[:, :, :2]] = 4  # the first label-map value of 'tumour core'
    np.testing.assert_array_equal(labels, expected)


def test_a_segmentation_on_a_finer_grid_of_its_own_is_resampled_onto_the_scan(tmp_path):
    """Slicer's oversampled segmentation geometry: half the spacing, two voxels beyond the scan's last column."""
    scan = _scan()
    fine = sitk.Image([2 * scan.GetSize()[0] + 2, *(2 * n for n in scan.GetSize()[1:])], sitk.sitkUInt8)
    fine.SetSpacing([s / 2 for s in scan.GetSpacing()])
    fine.SetDirection(scan.GetDirection())
    quarter = np.asarray(scan.GetDirection()).reshape(3, 3) @ (np.asarray(scan.GetSpacing()) / 4)
    fine.SetOrigin((np.asarray(scan.GetOrigin()) - quarter).tolist())
    liver = np.zeros(fine.GetSize()[::-1], bool)
    liver[4:8, 6:12, 16:22] = True  # scan voxels (2:4, 3:6, 8:10), and 48 fine voxels beyond its last column
    path = tmp_path / "label.seg.nrrd"
    write_slicer_segmentation(path, fine, [{"name": "liver", "mask": liver, "layer": 0, "value": 1}])
    said = []
    labels = sitk.GetArrayFromImage(read_segmentation_labels(path, Grid.of(scan), LABELS, "case: file", said.append))
    assert said == ["case: file: not on its scan's voxel grid (spacing 0.5 x 1 x 1.5 mm against the scan's 1 x 2 x 3 "
                    "mm); resampled onto it (nearest neighbour)",
                    "case: file: 48 segment voxels lie outside the scan; left out"]
    expected = np.zeros(scan.GetSize()[::-1], np.uint16)
    expected[2:4, 3:6, 8:10] = 1
    np.testing.assert_array_equal(labels, expected)


def test_a_file_from_before_slicer_4_11_has_a_layer_per_segment(tmp_path):
    """No Layer or LabelValue fields: segment N is layer N, of value 1."""
    scan = _scan()
    voxels = np.zeros((2, *scan.GetSize()), np.uint8)
    voxels[0, 1, 1, 1] = voxels[1, 1, 1, 1] = voxels[1, 2, 2, 2] = 1
    directions = np.vstack([np.full(3, np.nan), (np.array(scan.GetDirection()).reshape(3, 3) * scan.GetSpacing()).T])
    nrrd.write(str(tmp_path / "old.seg.nrrd"), voxels, {
        "space": "left-posterior-superior", "kinds": ["list", "domain", "domain", "domain"],
        "space directions": directions, "space origin": np.array(scan.GetOrigin()),
        "Segment0_Name": "kidney (left)", "Segment1_Name": "liver"})
    said = []
    labels = sitk.GetArrayFromImage(read_segmentation_labels(tmp_path / "old.seg.nrrd", Grid.of(scan), LABELS, "old",
                                                             said.append))
    assert said == ["old: 1 voxels lie in segments of two labels; each is read as the later segment's"]
    assert (labels[1, 1, 1], labels[2, 2, 2], int(np.count_nonzero(labels))) == (1, 1, 2)


def test_a_file_that_is_no_segmentation_is_refused_in_one_line(tmp_path):
    path = tmp_path / "label.seg.nrrd"
    path.write_bytes(b"NRRD0004\ntype: nonsense\n\n")
    with pytest.raises(UserError) as refused:
        read_segmentation_labels(path, Grid.of(_scan()), LABELS, "case: label.seg.nrrd", print)
    assert str(refused.value).startswith("case: label.seg.nrrd: not a readable Slicer segmentation: ")
    assert "\n" not in str(refused.value)
