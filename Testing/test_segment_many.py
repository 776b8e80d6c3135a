"""`hybridmim segment --data`: many real (cropped) CTs with one model load, a failed case, continuing a run."""

from __future__ import annotations

import csv
import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import run_cli
from hybridmim.batch import segment_cases
from hybridmim.errors import UserError
from hybridmim.imageio import read_volume
from hybridmim.progress import parse_event
from test_imageio import _write_dicom_series


@pytest.fixture(scope="module")
def cases(abdomen_crop, small_ct, tmp_path_factory):
    """Four cases in the layouts --data takes: image files (one with dots in its name), a case folder and a
    DICOM series folder, the last three of the same CT."""
    folder = tmp_path_factory.mktemp("many")
    shutil.copy(abdomen_crop["image"], folder / "abdomen.nii.gz")
    shutil.copy(small_ct, folder / "small.v2.nii.gz")
    (folder / "case3").mkdir()
    shutil.copy(small_ct, folder / "case3" / "image.nii.gz")
    shutil.copy(small_ct, folder / "case3" / "label.nii.gz")  # a label map is ignored
    (folder / "dicom4").mkdir()
    _write_dicom_series(sitk.ReadImage(str(small_ct)), folder / "dicom4")
    return folder


@pytest.fixture(scope="module")
def segmented_many(cases, tmp_path_factory):
    out = tmp_path_factory.mktemp("many-out") / "labels"
    result = run_cli("segment", "--data", cases, "-o", out, "--previews", "--progress", "json", check_rc=0)
    return out, [parse_event(line) for line in result.stdout.splitlines()]


def _statistics(path):
    """{(case, structure): (volume in ml, mean CT value or None)} from statistics.csv."""
    with open(path, encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    return {(r["case"], r["structure"]): (float(r["volume_ml"]), float(r["mean_CT"]) if r["mean_CT"] else None)
            for r in rows}


def _rows(path):
    """{(case, structure): the whole row} of statistics.csv."""
    with open(path, encoding="utf-8") as handle:
        return {(r["case"], r["structure"]): r for r in csv.DictReader(handle)}


def test_every_case_gets_the_label_map_that_segment_gives_it(segmented_many, cases, tmp_path):
    out, events = segmented_many
    assert sorted(p.name for p in out.iterdir()) == [
        "abdomen.png", "abdomen.seg.nrrd", "case3.png", "case3.seg.nrrd", "dicom4.png", "dicom4.seg.nrrd",
        "small.v2.png", "small.v2.seg.nrrd", "statistics.csv"]
    run_cli("segment", cases / "abdomen.nii.gz", "-o", tmp_path / "one.nii.gz", "--progress", "quiet", check_rc=0)
    alone = sitk.ReadImage(str(tmp_path / "one.nii.gz"))
    together = sitk.ReadImage(str(out / "abdomen.seg.nrrd"))
    assert together.GetSize() == alone.GetSize() and together.GetOrigin() == alone.GetOrigin()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(together), sitk.GetArrayFromImage(alone))
    small = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "small.v2.seg.nrrd")))
    for same in ("case3", "dicom4"):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(out / f"{same}.seg.nrrd"))), small)
    assert (sitk.GetArrayFromImage(together) == 6).sum() > 10000  # the liver is found
    assert together.GetMetaData("HybridMIM_model") == "abdomen-ct-scratch"  # what made it, as segment says


def test_each_series_of_a_study_in_one_folder_is_segmented_as_a_case(tmp_path):
    from test_imageio import write_study_in_one_folder

    images = write_study_in_one_folder(tmp_path / "study")
    result = run_cli("segment", "--data", tmp_path / "study", "-o", tmp_path / "out", "--progress", "quiet",
                     check_rc=0)
    assert result.stderr.splitlines()[0] == (f"warning: {tmp_path / 'study'}: 1 of its 3 DICOM series left out, of "
                                             "fewer than 10 images each (localisers?)")  # the localiser
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["statistics.csv", "study_1.seg.nrrd",
                                                                     "study_2.seg.nrrd"]
    for number, name in ((1, "abdomen"), (2, "chest")):
        assert sitk.ReadImage(str(tmp_path / "out" / f"study_{number}.seg.nrrd")).GetSize() == images[name].GetSize()


def test_a_series_missing_a_slice_is_segmented_on_the_even_grid_it_was_cut_from(small_ct, segmented_many, tmp_path):
    ct = sitk.ReadImage(str(small_ct))
    _write_dicom_series(ct, tmp_path / "series", skip=(ct.GetDepth() // 2,))
    result = run_cli("segment", tmp_path / "series", "-o", tmp_path / "labels.nii.gz", "--progress", "quiet",
                     check_rc=0)
    assert "slice gaps are uneven" in result.stderr and "ITK" not in result.stderr
    labels = sitk.ReadImage(str(tmp_path / "labels.nii.gz"))
    assert labels.GetSize() == ct.GetSize()
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    whole = sitk.GetArrayFromImage(sitk.ReadImage(str(segmented_many[0] / "small.v2.seg.nrrd")))
    assert (sitk.GetArrayFromImage(labels) == whole).mean() > 0.98  # as the whole series is segmented


def test_a_tilted_series_is_segmented_on_the_untilted_grid_its_slices_were_shifted_onto(small_ct, tmp_path):
    ct = sitk.ReadImage(str(small_ct))
    origin, step = np.array(ct.GetOrigin()), ct.GetSpacing()[2]
    _write_dicom_series(ct, tmp_path / "series", position=lambda k: origin + k * step * np.array([0.1, 0.0, 1.0]))
    result = run_cli("segment", tmp_path / "series", "-o", tmp_path / "labels.nii.gz", "--progress", "quiet",
                     check_rc=0)
    assert "a tilted gantry" in result.stderr and "ITK" not in result.stderr
    labels, series = sitk.ReadImage(str(tmp_path / "labels.nii.gz")), read_volume(tmp_path / "series")
    # the last slice lies 9.3 mm aside (3.1 columns): 4 columns more; slices 3 mm apart (ITK alone: 3.015)
    assert labels.GetSize() == series.GetSize() == (ct.GetWidth() + 4, ct.GetHeight(), ct.GetDepth())
    np.testing.assert_allclose(labels.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(labels.GetOrigin(), series.GetOrigin(), atol=1e-3)
    assert sitk.GetArrayViewFromImage(labels).any()


def test_one_model_load_progress_per_case_and_a_statistics_table(segmented_many, cases):
    out, events = segmented_many
    assert None not in events
    assert [e["name"] for e in events if e["event"] == "stage"] == ["load model", "segment"]
    assert [(e["done"], e["total"]) for e in events if e["event"] == "progress"] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    done = events[-1]["outputs"]
    assert (done["cases"], done["segmented"], done["kept"]) == (4, 4, 0)
    statistics = _statistics(out / "statistics.csv")
    assert len(statistics) == 4 * 13
    labels = sitk.ReadImage(str(out / "abdomen.seg.nrrd"))
    liver = sitk.GetArrayFromImage(labels) == 6
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(cases / "abdomen.nii.gz")))
    volume, mean = statistics[("abdomen", "liver")]
    assert volume == pytest.approx(liver.sum() * np.prod(labels.GetSpacing()) / 1000, abs=0.01)
    assert mean == pytest.approx(ct[liver].mean(), abs=0.01) and 20 < mean < 90  # non-contrast liver, in HU
    assert statistics[("abdomen", "gallbladder")] == (0.0, None)  # not found: no mean
    with open(out / "statistics.csv", encoding="utf-8") as handle:
        edges = {(r["case"], r["structure"]): r["at_edge"] for r in csv.DictReader(handle)}
    # ct_a's direction: z towards the head, y towards the front, x towards the patient's right
    faces = {"superior": liver[-1], "inferior": liver[0], "right": liver[:, :, -1], "left": liver[:, :, 0],
             "anterior": liver[:, -1], "posterior": liver[:, 0]}
    assert edges[("abdomen", "liver")] == " ".join(side for side, face in faces.items() if face.any()) != ""
    assert edges[("abdomen", "gallbladder")] == ""  # not found
    assert all(set(value.split()) <= set(faces) or value == "no" for value in edges.values())


def test_a_failed_case_is_skipped_named_and_the_others_written(small_ct, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(small_ct, data / "good.nii.gz")
    (data / "broken.nii.gz").write_text("not an image", encoding="utf-8")
    result = run_cli("segment", "--data", data, "-o", tmp_path / "out", "--progress", "quiet")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: 1 of 2 cases failed (broken;") and "Traceback" not in result.stderr
    assert any(line.startswith("warning: broken: skipped: ") and "not a readable image" in line for line in lines)
    assert (tmp_path / "out" / "good.seg.nrrd").exists() and not (tmp_path / "out" / "broken.seg.nrrd").exists()
    assert {case for case, _ in _statistics(tmp_path / "out" / "statistics.csv")} == {"good"}


def test_images_that_are_no_3d_scan_are_left_out_not_failed(small_ct, tmp_path):
    """A PACS export holds a study's scout (one slice, here as a file and as a DICOM series of its own) beside its
    scans: each is left out with a warning, and the run succeeds with the scans segmented."""
    from conftest import run_cli_here

    data, out = tmp_path / "export", tmp_path / "out"
    data.mkdir()
    shutil.copy(small_ct, data / "good.nii.gz")
    scout = sitk.ReadImage(str(small_ct))[:, :, 10:11]
    sitk.WriteImage(scout, str(data / "scout.nii.gz"))
    _write_dicom_series(scout, data / "scout_series")
    result = run_cli_here("segment", "--data", data, "-o", out, "--progress", "json", check_rc=0)
    events = [e for e in map(parse_event, result.stdout.splitlines()) if e]
    assert sorted(events[-1]["outputs"]["left_out"]) == ["scout", "scout_series"]
    assert events[-1]["outputs"]["segmented"] == 1
    said = [e["text"] for e in events if e["event"] == "message" and e["level"] == "warning"]
    assert sorted(text.split(":")[0] for text in said if "left out, no 3-D scan: " in text) == ["scout",
                                                                                                 "scout_series"]
    assert sorted(p.name for p in out.iterdir()) == ["good.seg.nrrd", "statistics.csv"]
    assert {case for case, _ in _statistics(out / "statistics.csv")} == {"good"}


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full, a file every write to fails")
def test_a_full_disk_stops_the_run_at_that_case_and_skip_existing_continues_it(small_ct, tmp_path):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    for name in ("a", "b", "c"):
        shutil.copy(small_ct, data / f"{name}.nii.gz")
    out.mkdir()
    (out / f".b.partial-{os.getpid()}.seg.nrrd").symlink_to("/dev/full")  # b's label map finds no room (ENOSPC)
    with pytest.raises(UserError) as raised:
        segment_cases([str(data)], str(out), device="cpu")
    assert str(raised.value) == (f"the disk is full: stopped at b (2 of 3); 1 label maps are in {out}. Make room, "
                                 "then run the same command with --skip-existing to continue")
    assert sorted(p.name for p in out.iterdir()) == ["a.seg.nrrd", "statistics.csv"]  # c was not run for nothing
    assert {case for case, _ in _statistics(out / "statistics.csv")} == {"a"}
    summary = segment_cases([str(data)], str(out), device="cpu", skip_existing=True)
    assert (summary["segmented"], summary["kept"]) == (2, 1)
    assert {case for case, _ in _statistics(out / "statistics.csv")} == {"a", "b", "c"}


def test_an_interrupted_run_is_continued_with_skip_existing(segmented_many, cases, tmp_path):
    out = tmp_path / "labels"
    shutil.copytree(segmented_many[0], out)
    kept = (out / "abdomen.seg.nrrd").stat().st_mtime_ns
    (out / "small.v2.seg.nrrd").unlink()
    (out / "case3.png").unlink()
    refused = run_cli("segment", "--data", cases, "-o", out, "--previews")
    assert refused.returncode == 2 and "pass --skip-existing" in refused.stderr
    result = run_cli("segment", "--data", cases, "-o", out, "--previews", "--skip-existing", "--progress", "json",
                     check_rc=0)
    infos = [e["text"] for e in map(parse_event, result.stdout.splitlines()) if e and e["event"] == "message"]
    assert any(t.startswith("abdomen:") and "kept from an earlier run" in t for t in infos)
    assert any(t.startswith("small.v2:") and "kept" not in t for t in infos)
    assert (out / "abdomen.seg.nrrd").stat().st_mtime_ns == kept  # not written again
    assert (out / "small.v2.seg.nrrd").exists() and (out / "case3.png").exists()  # the preview of a kept case
    # the statistics of the uninterrupted run, how unsure the model was of a kept map read from its header
    assert _rows(out / "statistics.csv") == _rows(segmented_many[0] / "statistics.csv")
    assert float(_rows(out / "statistics.csv")[("abdomen", "liver")]["unsure_ml"]) > 0


def test_a_kept_nifti_map_has_how_unsure_the_model_was_from_the_earlier_table(abdomen_crop, small_ct, tmp_path):
    """A NIfTI header has no room for it: a run extended with --skip-existing takes it from the statistics.csv
    of the run that made the map (that run's figure, not blank)."""
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    shutil.copy(abdomen_crop["image"], data / "abdomen.nii.gz")
    segment_cases([str(data)], str(out), device="cpu", suffix=".nii.gz")
    earlier = _rows(out / "statistics.csv")
    assert float(earlier[("abdomen", "liver")]["unsure_ml"]) > 0
    shutil.copy(small_ct, data / "added.nii.gz")
    summary = segment_cases([str(data)], str(out), device="cpu", suffix=".nii.gz", skip_existing=True)
    assert (summary["segmented"], summary["kept"]) == (1, 1)
    rows = _rows(out / "statistics.csv")
    assert {key: row for key, row in rows.items() if key[0] == "abdomen"} == earlier
    assert rows[("added", "liver")]["unsure_ml"] != ""


def test_skip_existing_keeps_only_the_label_maps_of_the_model_that_goes_on(segmented_many, cases, tmp_path, refused):
    """Kept maps of another model would be counted with this one's labels: refused before any work; a map whose
    header names no model (made elsewhere) is kept with a warning."""
    out = tmp_path / "labels"
    shutil.copytree(segmented_many[0], out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    refused("segment", "--data", cases, "-o", out, "--skip-existing", "--model", "sarcoma-ct",
            message=f"{out / 'abdomen.seg.nrrd'}: made by the model abdomen-ct-scratch, not by sarcoma-ct; "
                    "--skip-existing keeps only label maps of the model that segments the rest: continue with "
                    "--model abdomen-ct-scratch, or pass --overwrite to replace them")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    plain, made = out / "case3.seg.nrrd", sitk.ReadImage(str(out / "case3.seg.nrrd"))
    voxels = sitk.GetImageFromArray(sitk.GetArrayFromImage(made))  # the same voxels, without our header fields
    voxels.CopyInformation(made)
    sitk.WriteImage(voxels, str(plain))
    result = run_cli("segment", "--data", cases, "-o", out, "--skip-existing", "--progress", "json", check_rc=0)
    warnings = [e["text"] for e in map(parse_event, result.stdout.splitlines()) if e and e.get("level") == "warning"]
    assert warnings == ["label maps kept whose headers name no model (made elsewhere?), counted with the labels of "
                        "abdomen-ct-scratch: case3.seg.nrrd"]
    assert _statistics(out / "statistics.csv") == _statistics(segmented_many[0] / "statistics.csv")
    rows = _rows(out / "statistics.csv")  # how unsure the model was is not known for a map made elsewhere
    assert rows[("case3", "liver")]["unsure_ml"] == "" and rows[("abdomen", "liver")]["unsure_ml"] != ""


def test_bad_batch_requests_are_refused_before_any_work(refused, cases, small_ct, tmp_path):
    out = tmp_path / "out"
    refused("segment", small_ct, "--data", cases, "-o", out, message="not both")
    refused("segment", "-o", out, message="or --data for many scans")
    refused("segment", small_ct, "-o", out / "x.nii.gz", "--previews", message="--previews: only with --data")
    refused("segment", "--data", cases, "-o", out, "--preview", "x.png", message="--previews draws one per case")
    refused("segment", "--data", cases, "-o", out, "--format", "png", message="use one of seg.nrrd, nii.gz")
    refused("segment", "--data", cases, "-o", out, "--overwrite", "--skip-existing", message="exclude each other")
    refused("segment", "--data", cases, cases / "case3", "-o", out, message="two cases are named 'case3'")
    refused("segment", "--data", cases / "abdomen.nii.gz", "-o", cases, "--format", "nii.gz",
            message="an output would overwrite this input")
    refused("segment", "--data", cases, "-o", small_ct, message="is a file; with --data, -o names a folder")
    refused("segment", "--data", cases, "-o", out, "--model", "brain-tumor-mr",
            message="case case3: model brain-tumor-mr.safetensors expects 2 input channel(s)")
    assert not out.exists()
