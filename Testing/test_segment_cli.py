"""`hybridmim segment` end to end on a real CT with the bundled default model, and every bad input."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from PIL import Image

from conftest import DEFAULT_MODEL, REPO, data_file, run_cli, warnings_of, write_slicer_segmentation
from hybridmim.labels import parse_labels
from hybridmim.metrics import dice_per_label
from hybridmim.progress import parse_event
from hybridmim.segment import segment_statistics
from test_imageio import _rotation, assert_same_grid


@pytest.fixture(scope="module")
def segmented(abdomen_crop, tmp_path_factory):
    out = tmp_path_factory.mktemp("segment")
    result = run_cli("segment", abdomen_crop["image"], "-o", out / "seg.seg.nrrd", "--preview", out / "preview.png",
                     "--device", "cuda", "--progress", "json", check_rc=0)
    return out, result


def test_progress_protocol_stages_progress_and_done(segmented):
    out, result = segmented
    events = [parse_event(line) for line in result.stdout.splitlines()]
    assert None not in events, "stdout must carry protocol lines only"
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert stages == ["load model", "read", "preprocess", "inference", "postprocess", "write", "preview"]
    progress = [e for e in events if e["event"] == "progress"]
    assert progress and progress[-1]["done"] == progress[-1]["total"]
    assert all(p["stage"] == "inference" for p in progress)
    done = events[-1]
    assert done["event"] == "done" and done["outputs"]["segmentation"] == str(out / "seg.seg.nrrd")
    liver = next(s for s in done["outputs"]["segments"] if s["name"] == "liver")
    assert liver["volume_ml"] > 500 and 20 < liver["mean_CT"] < 90  # HU of a non-contrast liver
    # No GPU here: asking for CUDA falls back to the CPU and says so.
    warnings = warnings_of(result)
    assert not any("covers only" in w for w in warnings)  # 168 mm head–foot: not thin for 192 mm windows
    if done["outputs"]["device"] == "cpu":
        assert any("CUDA was requested" in w for w in warnings)


def test_segmentation_is_on_the_input_grid_with_named_segments(segmented, abdomen_crop):
    out, _ = segmented
    image = sitk.ReadImage(str(abdomen_crop["image"]))
    result = sitk.ReadImage(str(out / "seg.seg.nrrd"))
    assert_same_grid(result, image, 1e-6)
    seg = slicerio.read_segmentation(str(out / "seg.seg.nrrd"))
    names = [s["name"] for s in seg["segments"]]
    assert names[:3] == ["spleen", "right kidney", "left kidney"] and len(names) == 13
    assert all(s["terminology"]["category"][1] == "123037004" for s in seg["segments"])
    # The file says what made it: engine, model and the model file's SHA256.
    assert seg["HybridMIM_model"] == "abdomen-ct-scratch" and seg["HybridMIM_engine"].startswith("hybridmim ")
    assert seg["HybridMIM_model_sha256"] == hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest()


def test_default_model_finds_the_organs_of_its_training_case(segmented, abdomen_crop):
    out, _ = segmented
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg.seg.nrrd")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(abdomen_crop["label"])))
    # Floors a little under the shipped model's scores on this crop (liver 0.90, aorta 0.83, stomach 0.77,
    # spleen 0.68, kidneys 0.68 / 0.63): a broken pipeline scores near 0.
    floors = {6: 0.85, 8: 0.75, 7: 0.7, 1: 0.6, 2: 0.6, 3: 0.55}
    dice = dice_per_label(prediction, reference, floors)
    assert all(dice[v] > floor for v, floor in floors.items()), dice


def test_each_segment_says_at_which_sides_it_reaches_the_scans_edge(segmented, tmp_path):
    """Reaching the scan's edge, a structure may go on beyond it: its volume is then short of the whole."""
    reference = sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz")))
    labels = parse_labels(json.loads((REPO / "scripts/labels/btcv13.json").read_text(encoding="utf-8")))
    rows = segment_statistics(reference, labels)
    # ct_a begins in the upper abdomen: its top slice cuts these five; the rest lie inside, the esophagus is absent
    assert {r["name"]: r["at_edge"] for r in rows if r["at_edge"]} == {
        name: ["superior"] for name in ("spleen", "liver", "stomach", "aorta", "inferior vena cava")}
    assert next(r for r in rows if r["name"] == "esophagus") == {"value": 5, "name": "esophagus", "volume_ml": 0.0,
                                                                  "at_edge": [], "unsure_ml": None}
    # Cut through the spleen on the patient's left (ct_a's x runs from left to right), it is cut there too.
    spleen_x = np.flatnonzero((sitk.GetArrayViewFromImage(reference) == 1).any(axis=(0, 1)))
    cut = segment_statistics(reference[int(spleen_x.mean()):], labels)
    assert next(r["at_edge"] for r in cut if r["name"] == "spleen") == ["superior", "left"]
    # The run's summary agrees with the faces of the label map it wrote, named by hand for ct_a's direction
    # (x towards the patient's right, y towards the front, z towards the head).
    out, result = segmented
    written = sitk.ReadImage(str(out / "seg.seg.nrrd"))
    assert written.GetDirection() == (-1, 0, 0, 0, -1, 0, 0, 0, 1)
    array = sitk.GetArrayFromImage(written)
    faces = {"inferior": array[0], "superior": array[-1], "posterior": array[:, 0], "anterior": array[:, -1],
             "left": array[:, :, 0], "right": array[:, :, -1]}
    sides = {}
    for side, face in faces.items():
        for value in set(np.unique(face).tolist()) - {0}:
            sides.setdefault(value, set()).add(side)
    segments = [parse_event(line) for line in result.stdout.splitlines()][-1]["outputs"]["segments"]
    assert {s["value"]: set(s["at_edge"]) for s in segments if s["at_edge"]} == sides and sides
    # and the terminal names them with their sides
    plain = run_cli("segment", data_file("abdomen_ct/ct_b.nii.gz"), "-o", tmp_path / "b.nii.gz", "--device", "cpu",
                    check_rc=0)
    assert plain.stderr.strip().splitlines()[-1].startswith(
        "reaching the scan's edge, so perhaps cut off by it (their volumes then short of the whole): "
        "spleen (superior edge), right kidney (superior and inferior edges), ")


def test_an_oblique_or_mirrored_axis_is_named_by_the_side_it_mostly_faces():
    labels = sitk.Image(4, 4, 4, sitk.sitkUInt8)
    labels[0, 1, 1] = 1  # on the face where x is lowest
    table = parse_labels([{"value": 1, "name": "lesion", "color": [255, 0, 0]}])

    def sides(direction):
        labels.SetDirection(direction)
        return segment_statistics(labels, table)[0]["at_edge"]

    assert sides((1, 0, 0, 0, 1, 0, 0, 0, 1)) == ["right"]  # LPS: x grows towards the left
    assert sides((-1, 0, 0, 0, -1, 0, 0, 0, 1)) == ["left"]
    c, s = np.cos(np.radians(30)), np.sin(np.radians(30))
    assert sides((c, -s, 0, s, c, 0, 0, 0, 1)) == ["right"]  # x turned 30 degrees towards the back
    assert sides((s, -c, 0, c, s, 0, 0, 0, 1)) == ["anterior"]  # 60 degrees: mostly towards the back
    assert sides((0, 0, 1, 0, 1, 0, -1, 0, 0)) == ["superior"]  # x runs from head to foot


def test_preview_png_is_written(segmented):
    out, _ = segmented
    with Image.open(out / "preview.png") as png:
        assert png.format == "PNG" and png.width > 800 and png.height > 800
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.std() > 10  # not a blank canvas


def test_oblique_input_gives_the_same_labels_on_its_own_grid(segmented, abdomen_crop, tmp_path):
    out, _ = segmented
    image = sitk.ReadImage(str(abdomen_crop["image"]))
    image.SetDirection(_rotation(0.15, 0.2))
    sitk.WriteImage(image, str(tmp_path / "oblique.nrrd"))
    run_cli("segment", tmp_path / "oblique.nrrd", "-o", tmp_path / "oblique_seg.nii.gz", "--device", "cpu",
            "--progress", "quiet", check_rc=0)
    result = sitk.ReadImage(str(tmp_path / "oblique_seg.nii.gz"))
    assert_same_grid(result, image, 1e-5)
    straight = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "seg.seg.nrrd")))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result), straight)


def test_existing_output_needs_overwrite(segmented, abdomen_crop):
    out, _ = segmented
    target = out / "seg.seg.nrrd"
    before = target.read_bytes()
    result = run_cli("segment", abdomen_crop["image"], "-o", target, check_rc=2)
    assert result.stderr.strip().splitlines() == [f"error: {target}: already exists; pass --overwrite to replace it"]
    assert target.read_bytes() == before


def _truncated(suffix):
    """ITK itself reads truncated NIfTI files silently, filling the missing voxels with 0."""
    def make(tmp_path):
        whole = tmp_path / f"whole{suffix}"
        sitk.WriteImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz"))), str(whole))
        data = whole.read_bytes()
        path = tmp_path / f"truncated{suffix}"
        path.write_bytes(data[: len(data) // 3])
        return [path]
    return make


def _two_d(tmp_path):
    path = tmp_path / "slice.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))[:, :, 60], str(path))
    return [path]


def _one_slice_volume(tmp_path):
    path = tmp_path / "one_slice.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))[:, :, 60:61], str(path))
    return [path]


def _four_d(tmp_path):
    image = sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))[:40, :40, :40]
    path = tmp_path / "four_d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(path))
    return [path]


def _text_file(tmp_path):
    path = tmp_path / "notes.nii.gz"
    path.write_text("this is not an image", encoding="utf-8")
    return [path]


def _empty(tmp_path):
    path = tmp_path / "empty.nrrd"
    path.write_bytes(b"")
    return [path]


def _spacing_in_centimetres(tmp_path):
    """The real CT with its 3 mm voxels written as 30 mm (a header in the wrong unit): 3.7 x 3 x 3.4 m."""
    image = sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))
    image.SetSpacing([10 * s for s in image.GetSpacing()])
    path = tmp_path / "centimetres.nii.gz"
    sitk.WriteImage(image, str(path))
    return [path]


def _slicer_segmentation(tmp_path):
    """The reference of a real CT as Slicer saves it: ITK reads it as a volume of small whole numbers."""
    reference = sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz")))
    path = tmp_path / "ct_a.seg.nrrd"
    write_slicer_segmentation(path, reference, [
        {"name": "liver", "mask": sitk.GetArrayViewFromImage(reference) == 6, "layer": 0, "value": 1}])
    return [path]


def _two_channels(tmp_path):
    return [data_file("abdomen_ct/ct_a.nii.gz"), data_file("abdomen_ct/ct_a.nii.gz")]


@pytest.mark.parametrize("make_inputs, extra, message", [
    (lambda t: [t / "missing.nii.gz"], [], "no such file or folder"),
    (_empty, [], "empty file"),
    (_text_file, [], "not a readable image"),
    (_truncated(".nii.gz"), [], "truncated"),
    (_truncated(".nii"), [], "truncated file"),
    (_truncated(".nrrd"), [], "not a readable image"),
    (_two_d, [], "2-D image"),
    (_one_slice_volume, [], "a single slice"),
    (_four_d, [], "4-D image"),
    (_spacing_in_centimetres, [], "/centimetres.nii.gz: its header makes it 3660 x 3030 x 3360 mm (voxels of 30 x 30 "
                                  "x 30 mm), larger than any patient"),  # the path as given, as the others
    (_slicer_segmentation, [], "ct_a.seg.nrrd: a Slicer segmentation, not a scan; give the scan it outlines"),
    (lambda t: [data_file("abdomen_ct/ct_a_btcv13.nii.gz")], [], "ct_a_btcv13.nii.gz: holds only the values 0, 1, 2, "
                                                                 "3, 4, 6, 7, 8 …, as a label map or mask does"),
    (_two_channels, [], "expects 1 input channel"),
    (lambda t: [data_file("abdomen_ct/ct_a.nii.gz")], ["--model", "no-such-model"], "unknown model"),
    (lambda t: [data_file("abdomen_ct/ct_a.nii.gz")], ["--model", "__TEXT__"], "not a safetensors checkpoint"),
    (lambda t: [data_file("abdomen_ct/ct_a.nii.gz")], ["--device", "tpu"], "invalid choice"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, make_inputs, extra, message):
    inputs = make_inputs(tmp_path)
    fake_model = tmp_path / "model.safetensors"
    fake_model.write_text("just text", encoding="utf-8")
    extra = [str(fake_model) if e == "__TEXT__" else e for e in extra]
    output = tmp_path / "out" / "result.seg.nrrd"
    result = run_cli("segment", *inputs, "-o", output, *extra)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not output.parent.exists() or not any(output.parent.iterdir())


def test_json_mode_reports_errors_on_the_protocol(tmp_path):
    result = run_cli("segment", tmp_path / "missing.nii.gz", "-o", tmp_path / "x.nii.gz", "--progress", "json")
    assert result.returncode == 2
    events = [parse_event(line) for line in result.stdout.splitlines()]
    assert events[-1]["event"] == "error" and "no such file" in events[-1]["message"]


def test_unsupported_output_type_is_refused_before_work(tmp_path):
    result = run_cli("segment", data_file("abdomen_ct/ct_a.nii.gz"), "-o", tmp_path / "result.png")
    assert result.returncode == 2 and "unsupported output type" in result.stderr


def test_every_option_of_every_command_says_what_it_does():
    import argparse

    from hybridmim.cli import build_parser

    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    silent = [f"{name} {action.option_strings[-1]}" for name, command in commands.items()
              for action in command._actions if action.option_strings and not action.help]
    assert len(commands) == 10 and silent == []


def test_info_and_models_describe_the_default_model():
    info = run_cli("info", DEFAULT_MODEL, check_rc=0).stdout
    assert "spleen" in info and "78961009" in info and "window -200..300" in info
    as_json = json.loads(run_cli("info", "abdomen-ct-scratch", "--json", check_rc=0).stdout)
    assert as_json["format"] == "hybridmim-checkpoint" and len(as_json["labels"]) == 13
    models = json.loads(run_cli("models", "--json", check_rc=0).stdout)
    default = next(m for m in models if m["default"])
    assert default["name"] == "abdomen-ct-scratch" and default["status"] == "bundled"
    assert "liver" in default["segments"] and default["task"] == "segmentation"
    pretrained = next(m for m in models if m["default_pretrained"])
    assert pretrained["name"] == "ct-hybridmim-cnn" and pretrained["task"] == "reconstruction"
    run_cli("info", "not-a-model", check_rc=2)


def test_default_model_on_unseen_contrast_ct(segmented, tmp_path):
    """ct_b: contrast-enhanced, 20 slices, never seen in training (reference: TotalSegmentator predictions).

    The stand-in model generalises poorly to this thin slab (docs/models/abdomen-ct-scratch.md); the aorta
    (measured 0.72) is the organ it does find, so its floor guards pre-processing, inference and the inverse
    mapping on an anisotropic LPS scan. The user is told why the other organs may be missing, and the model
    is unsure of several times more of the organs it does claim than on its training scan.
    """
    result = run_cli("segment", data_file("abdomen_ct/ct_b.nii.gz"), "-o", tmp_path / "ct_b.nii.gz",
                     "--progress", "json", check_rc=0)
    assert any("covers only 40 mm head–foot" in w for w in warnings_of(result))
    prediction = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct_b.nii.gz")))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_b_btcv13.nii.gz"))))
    assert prediction.shape == reference.shape
    assert dice_per_label(prediction, reference, [8])[8] > 0.6

    def unsure_shares(result):
        segments = [parse_event(line) for line in result.stdout.splitlines()][-1]["outputs"]["segments"]
        return {s["name"]: s["unsure_ml"] / s["volume_ml"] for s in segments if s["volume_ml"]}

    # unsure volume / volume, measured: liver 4.4 here against 1.1 on the training crop, IVC 5.7 against 0.9;
    # the aorta, which it does find here, 1.4 against 0.9
    unseen, trained = unsure_shares(result), unsure_shares(segmented[1])
    assert unseen["liver"] > 3 * trained["liver"] and unseen["inferior vena cava"] > 3 * trained["inferior vena cava"]
    assert unseen["aorta"] < 2 * trained["aorta"], (unseen, trained)
