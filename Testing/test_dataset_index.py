"""Dataset folders with a dataset.json: the Decathlon's (with its unlabelled "test" cases) and nnU-Net v2's raw
layout (cases found by name, a file per channel); the labels they name."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import DEFAULT_MODEL, MODELS, data_file, run_cli_here
from hybridmim.checkpoint import read_metadata
from hybridmim.channelnames import fitted_to_model
from hybridmim.datasetindex import dataset_labels
from hybridmim.errors import UserError
from hybridmim.evaluate import evaluate
from hybridmim.geometry import Grid
from hybridmim.imageio import read_channels
from hybridmim.progress import Reporter
from hybridmim.referencevalues import read_reference_values
from hybridmim.training.finetune import load_recipe
from hybridmim.training.start import resolve_start
from hybridmim.volumes import find_cases, prepare_cases

BRATS = "brain_tumor_mr/brats_2013_pat000{}_1"


def _link(path: Path, target: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.symlink_to(target)


def _nnunet_brain(root: Path) -> Path:
    """Two BRATS cases as nnU-Net v2's raw dataset: FLAIR as channel 0, T1c as 1; one of them in imagesTs."""
    dataset = root / "Dataset501_Glioma"
    for number, part in ((5, "imagesTr"), (6, "imagesTr"), (3, "imagesTs")):
        case = data_file(BRATS.format(number))
        _link(dataset / part / f"pat{number}_0000.nii.gz", case / "Flair_subtrMeanDivStd.nii.gz")
        _link(dataset / part / f"pat{number}_0001.nii.gz", case / "T1c_subtrMeanDivStd.nii.gz")
        if part == "imagesTr":
            _link(dataset / "labelsTr" / f"pat{number}.nii.gz", case / "OTMultiClass.nii.gz")
    (dataset / "imagesTr" / "._pat5_0000.nii.gz").write_bytes(b"\0" * 64)  # macOS's resource fork of a copy
    (dataset / "dataset.json").write_text(json.dumps({
        "channel_names": {"0": "FLAIR", "1": "T1c"}, "labels": {"background": 0, "necrosis": 1, "edema": 2},
        "numTraining": 2, "file_ending": ".nii.gz"}))
    return dataset


def test_an_nnunet_dataset_reads_its_channels_in_order_and_its_test_images_only_where_unlabelled(tmp_path):
    dataset = _nnunet_brain(tmp_path)
    labelled = find_cases([dataset], labelled=True)
    assert [(c.name, [p.name for p in c.channels], c.label.name) for c in labelled] == [
        ("pat5", ["pat5_0000.nii.gz", "pat5_0001.nii.gz"], "pat5.nii.gz"),
        ("pat6", ["pat6_0000.nii.gz", "pat6_0001.nii.gz"], "pat6.nii.gz")]
    everything = find_cases([dataset], dicom=True)
    assert [(c.name, c.channels[0].parent.name, c.label and c.label.name) for c in everything] == [
        ("pat5", "imagesTr", "pat5.nii.gz"), ("pat6", "imagesTr", "pat6.nii.gz"), ("pat3", "imagesTs", None)]

    (dataset / "labelsTr" / "pat6.nii.gz").unlink()
    with pytest.raises(UserError, match=r"labelsTr/pat6.nii.gz: missing; labelsTr holds the label map of each case in "
                                        r"imagesTr$"):
        find_cases([dataset], labelled=True)
    assert [c.label for c in find_cases([dataset]) if c.name == "pat6"] == [None]  # where labels are not read
    (dataset / "imagesTs" / "pat3_0001.nii.gz").unlink()
    with pytest.raises(UserError, match=r"imagesTs/pat3_0001.nii.gz: missing; .*dataset.json names 2 channels "
                                        r"\(FLAIR, T1c\), a file each$"):
        find_cases([dataset])
    index = dataset / "dataset.json"
    for written, message in (({"file_ending": ".png", "channel_names": {"0": "CT"}}, 'its images are ".png" files'),
                             ({"file_ending": ".nii.gz"}, "its 'channel_names' name no channel"),
                             ({"file_ending": ".mha", "channel_names": {"0": "CT"}},
                              r"no images named CASE_0000.mha in imagesTr \(nnU-Net v2's layout\)$"),
                             ({"name": "glioma", "labels": {}}, "lists no cases: a Decathlon index has 'training'")):
        index.write_text(json.dumps(written))
        with pytest.raises(UserError, match=message):
            find_cases([dataset], labelled=True)


def test_a_decathlon_dataset_leaves_its_test_cases_out_where_labels_are_read(tmp_path):
    """Every Decathlon task lists unlabelled "test" images: fine-tuning and evaluate had refused the folder for them
    ("no label map for …")."""
    dataset = tmp_path / "Task501_Sarcoma"
    for name in ("STS_036", "STS_037"):
        for kind in ("image", "label"):
            _link(dataset / f"{kind}sTr" / f"{name}.nii.gz", data_file(f"sarcoma_ct/{name}/{kind}.nii.gz"))
    _link(dataset / "imagesTs" / "STS_038.nii.gz", data_file("sarcoma_ct/STS_038/image.nii.gz"))
    index = {"modality": {"0": "CT"}, "labels": {"0": "background", "1": "tumour"},
             "training": [{"image": f"./imagesTr/{n}.nii.gz", "label": f"./labelsTr/{n}.nii.gz"}
                          for n in ("STS_036", "STS_037")],
             "test": ["./imagesTs/STS_038.nii.gz"]}
    (dataset / "dataset.json").write_text(json.dumps(index))
    assert [(c.name, c.label.name) for c in find_cases([dataset], labelled=True)] == [
        ("STS_036", "STS_036.nii.gz"), ("STS_037", "STS_037.nii.gz")]
    assert [c.name for c in find_cases([dataset])] == ["STS_036", "STS_037", "STS_038"]

    with pytest.raises(UserError, match="--exclude leaves out every case in the data"):
        find_cases([dataset], labelled=True, exclude=["STS_036", "STS_037"])
    for changed, message in (({"training": [], "test": index["test"]}, "lists no training cases$"),
                             ({"training": [{"image": "./imagesTr/STS_036.nii.gz"}]},
                              "the training case ./imagesTr/STS_036.nii.gz names no 'label'$"),
                             # a download cut short: refused before any case is read, not when it comes
                             ({"training": index["training"] + [{"image": "./imagesTr/STS_040.nii.gz",
                                                                 "label": "./labelsTr/STS_040.nii.gz"}]},
                              r"imagesTr/STS_040.nii.gz: missing; .*dataset.json lists it as an image of case "
                              r"STS_040 \(and 1 more of the 6 files it lists\)$")):
        (dataset / "dataset.json").write_text(json.dumps({**index, **changed}))
        with pytest.raises(UserError, match=message):
            find_cases([dataset], labelled=True)


def test_evaluate_scores_an_nnunet_dataset_as_the_same_case_folders(abdomen_crop, tmp_path):
    folders = tmp_path / "cases" / "abdomen"
    _link(folders / "image.nii.gz", abdomen_crop["image"])
    _link(folders / "label.nii.gz", abdomen_crop["label"])
    dataset = tmp_path / "Dataset502_Abdomen"
    _link(dataset / "imagesTr" / "abdomen_0000.nii.gz", abdomen_crop["image"])
    _link(dataset / "labelsTr" / "abdomen.nii.gz", abdomen_crop["label"])
    (dataset / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}))
    as_folders = evaluate(None, [str(tmp_path / "cases")], device="cpu")
    as_dataset = evaluate(None, [str(dataset)], device="cpu")
    assert as_dataset["cases"] == as_folders["cases"] and as_dataset["summary"] == as_folders["summary"]
    assert as_dataset["summary"]["liver"]["dice_mean"] > 0.8


def test_a_dataset_json_names_the_labels_of_a_run_that_nothing_else_names(tmp_path):
    """Decathlon's {"1": "tumour"} and nnU-Net's {"tumour": 1}: the labels of a fine-tuning run without --labels,
    valued as in the label maps, before the init model's; a run on the Decathlon folder writes a model segmenting
    them by those names."""
    decathlon = tmp_path / "Task501_Sarcoma"
    for name in ("STS_036", "STS_037"):
        for kind in ("image", "label"):
            _link(decathlon / f"{kind}sTr" / f"{name}.nii.gz", data_file(f"sarcoma_ct/{name}/{kind}.nii.gz"))
    index = {"labels": {"0": "background", "1": "tumour"},
             "training": [{"image": f"imagesTr/{n}.nii.gz", "label": f"labelsTr/{n}.nii.gz"} for n in ("STS_036",
                                                                                                       "STS_037")]}
    (decathlon / "dataset.json").write_text(json.dumps(index))
    nnunet = tmp_path / "Dataset501_Sarcoma"
    (nnunet / "imagesTr").mkdir(parents=True)
    index_of = {"channel_names": {"0": "CT"}, "file_ending": ".nii.gz"}
    for labels, expected in (({"background": 0, "tumour": 1}, [(1, "tumour", [31, 119, 180])]),
                             ({"background": 0, "oedema": 4, "necrosis": 2},
                              [(2, "necrosis", [31, 119, 180]), (4, "oedema", [255, 127, 14])]),
                             ({"background": 0}, []), ({}, None)):
        (nnunet / "dataset.json").write_text(json.dumps({**index_of, "labels": labels}))
        named = dataset_labels(nnunet)
        assert named == (None if expected is None else
                         [{"value": v, "name": n, "color": c} for v, n, c in expected])
    for labels, message in (({"background": 0, "whole tumour": [1, 2, 3], "enhancing": 3},
                             "its labels are nnU-Net regions"),
                            ({"background": 0, "tumour": "1"}, "pair each label-map value with a name")):
        (nnunet / "dataset.json").write_text(json.dumps({**index_of, "labels": labels}))
        with pytest.raises(UserError, match=message):
            dataset_labels(nnunet)
    (nnunet / "dataset.json").write_text(json.dumps({**index_of, "labels": {"background": 0, "sarcoma": 1}}))
    with pytest.raises(UserError, match="the data's dataset.json files name different labels: name those to segment "
                                        "with --labels FILE"):
        resolve_start("scratch", load_recipe(None), None, Reporter("quiet"), [str(decathlon), str(nnunet)])
    # before the init model's: they say what the data's label maps hold (1: the abdominal model's spleen)
    start = resolve_start(str(DEFAULT_MODEL), load_recipe(None), None, Reporter("quiet"),
                          [str(decathlon), str(data_file("sarcoma_ct/STS_038"))])
    assert [(label.value, label.name) for label in start.labels] == [(1, "tumour")] and start.head_channels is None
    # one the init model segments by that name takes its colour and codes, and its output channel
    (decathlon / "dataset.json").write_text(json.dumps({**index, "labels": {"0": "background", "1": "Liver",
                                                                            "2": "tumour"}}))
    log = io.StringIO()
    start = resolve_start(str(DEFAULT_MODEL), load_recipe(None), None, Reporter("json", stream=log), [str(decathlon)])
    liver = next(label for label in read_metadata(DEFAULT_MODEL).labels if label.name == "liver")
    assert [(label.value, label.name, label.color, label.terminology) for label in start.labels] == [
        (1, "Liver", liver.color, liver.terminology), (2, "tumour", (255, 127, 14), {})]
    assert start.head_channels == [0, liver.value, None]
    said = ("labels of the data's dataset.json: Liver, tumour (tumour without terminology codes: --labels FILE gives "
            "them)")
    assert said in [json.loads(line).get("text") for line in log.getvalue().splitlines()]
    (decathlon / "dataset.json").write_text(json.dumps(index))

    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps({
        "scratch": {"network": {"name": "unet", "features": [8, 8, 16, 16], "dropout": 0.0},
                    "preprocessing": {"spacing": [3.0, 3.0, 3.0]}, "roi_size": [48, 48, 48]},
        "train": {"epochs": 1, "steps_per_epoch": 2, "volumes_per_step": 1, "crops_per_volume": 1, "amp": "none",
                  "window": [32, 32, 32], "warmup_steps": 0}}))
    output = tmp_path / "model.safetensors"
    run = run_cli_here("finetune", "--init", "scratch", "--data", decathlon, "--val-fraction", "0.5", "--recipe",
                       recipe, "--cache", tmp_path / "cache", "-o", output, "--device", "cpu", "--progress", "json",
                       check_rc=0)
    said = "labels of the data's dataset.json: tumour (without terminology codes: --labels FILE gives them)"
    assert said in run.stdout
    assert [(label.value, label.name) for label in read_metadata(output).labels] == [(1, "tumour")]


BRAIN_BOX = (slice(50, 170), slice(110, 210), slice(50, 146))  # x, y, z: pat0003's tumour with a margin


def _brain_crops(folder: Path) -> dict[str, Path]:
    """pat0003's FLAIR, T1c, brain mask and label map cut to BRAIN_BOX, the images as float32."""
    source, crops = data_file(BRATS.format(3)), {}
    folder.mkdir(parents=True)
    for name, file in (("FLAIR", "Flair_subtrMeanDivStd"), ("T1c", "T1c_subtrMeanDivStd"), ("mask", "brainmask"),
                       ("label", "OTMultiClass")):
        image = sitk.ReadImage(str(source / f"{file}.nii.gz"))[BRAIN_BOX]
        crops[name] = folder / f"{name}.nii.gz"
        sitk.WriteImage(image if name == "label" else sitk.Cast(image, sitk.sitkFloat32), str(crops[name]))
    return crops


def test_a_decathlon_multimodal_image_gives_a_model_the_volumes_its_channels_name(tmp_path):
    """The Decathlon's BrainTumour and Prostate images hold their channels as the volumes of one 4-D file, named by
    the index's "modality" ("t1gd" for a model's "T1c"): each had been refused as "a 4-D image"."""
    crops = _brain_crops(tmp_path / "crops")
    task = tmp_path / "Task501_BrainTumour"
    (task / "imagesTr").mkdir(parents=True)
    sitk.WriteImage(sitk.JoinSeries([sitk.ReadImage(str(crops[n])) for n in ("mask", "T1c", "FLAIR")]),
                    str(task / "imagesTr" / "BRATS_003.nii.gz"))
    _link(task / "labelsTr" / "BRATS_003.nii.gz", crops["label"])
    index = {"modality": {"0": "brain mask", "1": "T1-Gd", "2": "FLAIR"},
             "training": [{"image": "./imagesTr/BRATS_003.nii.gz", "label": "./labelsTr/BRATS_003.nii.gz"}]}
    (task / "dataset.json").write_text(json.dumps(index))
    case_folder = tmp_path / "cases" / "BRATS_003"
    for name, target in (("FLAIR", "image_0000"), ("T1c", "image_0001"), ("label", "label")):
        _link(case_folder / f"{target}.nii.gz", crops[name])

    brain = read_metadata(MODELS / "brain-tumor-mr.safetensors")
    said = []
    case, = fitted_to_model(find_cases([task], labelled=True), brain.channels, said.append)
    assert case.volumes == (2, 1) and case.channel_files() == ["BRATS_003.nii.gz volume 2 (FLAIR)",
                                                               "BRATS_003.nii.gz volume 1 (T1-Gd)"] and not said
    for read, original in zip(read_channels(case.channels, volumes=case.volumes), ("FLAIR", "T1c")):
        expected = sitk.ReadImage(str(crops[original]))
        assert Grid.of(read).matches(Grid.of(expected), tolerance=1e-6)
        assert np.array_equal(sitk.GetArrayViewFromImage(read), sitk.GetArrayViewFromImage(expected))

    # evaluate, segment --data and training read the task as they read the case folder
    as_task, as_folder = (evaluate("brain-tumor-mr", [str(data)], device="cpu") for data in (task, case_folder))
    assert as_task["cases"] == as_folder["cases"] and as_task["summary"] == as_folder["summary"]
    for data, output in ((task, "from_task"), (case_folder.parent, "from_folder")):
        run_cli_here("segment", "--model", "brain-tumor-mr", "--data", data, "-o", tmp_path / output, "--device",
                     "cpu", check_rc=0)
    segmented = [sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{o}/BRATS_003.seg.nrrd")))
                 for o in ("from_task", "from_folder")]
    assert np.array_equal(*segmented) and segmented[0].any()
    prepared = [prepare_cases(find_cases([data], labelled=True), brain.preprocessing, tmp_path / "cache",
                              Reporter("quiet"), brain.labels, brain.channels) for data in (task, case_folder)]
    assert np.array_equal(prepared[0].volumes[0].stored, prepared[1].volumes[0].stored)
    assert prepared[0].sources[0]["files"] == ["BRATS_003.nii.gz volume 2 (FLAIR)", "BRATS_003.nii.gz volume 1 "
                                               "(T1-Gd)", "BRATS_003.nii.gz"]

    with pytest.raises(UserError, match=r"case BRATS_003: model sarcoma-ct.safetensors expects 1 input channel\(s\) "
                                        r"\(CT\); got 3 \(BRATS_003.nii.gz volume 0 \(brain mask\), BRATS_003.nii.gz "
                                        r"volume 1 \(T1-Gd\), BRATS_003.nii.gz volume 2 \(FLAIR\)\)$"):
        evaluate("sarcoma-ct", [str(task)], device="cpu")
    with pytest.raises(UserError, match=r"BRATS_003.nii.gz: a 4-D image \(120, 100, 96, 3\); give one 3-D volume per "
                                        r"input channel, or \(a Decathlon image\) its dataset folder"):
        read_channels([task / "imagesTr" / "BRATS_003.nii.gz"])
    (task / "dataset.json").write_text(json.dumps({**index, "modality": {"0": "T1-Gd", "1": "FLAIR", "3": "T2"}}))
    with pytest.raises(UserError, match=r"its 'modality' numbers the channels from 0"):
        find_cases([task])
    (task / "dataset.json").write_text(json.dumps({**index, "modality": {"0": "a", "1": "b", "2": "T1-Gd",
                                                                         "3": "FLAIR"}}))
    with pytest.raises(UserError, match=r"BRATS_003.nii.gz: has no volume 3 \(it is a 4-D image of size "
                                        r"\(120, 100, 96, 3\)\), where its dataset.json's 'modality' names one"):
        evaluate("brain-tumor-mr", [str(task)], device="cpu")


def test_an_nnunet_case_gives_a_model_the_files_its_channels_name_and_says_where_it_reads_them_in_order(tmp_path):
    """A model taking FLAIR and T1c reads them from an nnU-Net case of three channels, spelled "T2-FLAIR" and
    "T1ce"; where the names are not the model's, the channels are read in the index's order, with a warning."""
    crops = _brain_crops(tmp_path / "crops")
    dataset = tmp_path / "Dataset505_Brain"
    for number, name in enumerate(("mask", "T1c", "FLAIR")):
        _link(dataset / "imagesTr" / f"pat3_{number:04d}.nii.gz", crops[name])
    _link(dataset / "labelsTr" / "pat3.nii.gz", crops["label"])
    index = {"channel_names": {"0": "mask", "1": "T1ce", "2": "T2-FLAIR"}, "file_ending": ".nii.gz"}
    (dataset / "dataset.json").write_text(json.dumps(index))
    brain, said = read_metadata(MODELS / "brain-tumor-mr.safetensors"), []
    case, = fitted_to_model(find_cases([dataset]), brain.channels, said.append)
    assert [p.name for p in case.channels] == ["pat3_0002.nii.gz", "pat3_0001.nii.gz"] and not case.volumes
    assert case.channel_names == ("T2-FLAIR", "T1ce") and not said

    (dataset / "imagesTr" / "pat3_0002.nii.gz").unlink()
    (dataset / "dataset.json").write_text(json.dumps({**index, "channel_names": {"0": "A", "1": "B"}}))
    cases = find_cases([dataset]) * 2
    assert fitted_to_model(cases, brain.channels, said.append) == cases
    assert said == ["pat3 (and the cases like it): its data name its channels otherwise than the model; they are "
                    "read in order: A as FLAIR, B as T1c"]


def test_an_nnunet_index_listing_its_training_cases_by_name_reads_them_from_that_list(tmp_path):
    """nnU-Net v2's optional "dataset": {CASE: {"images": [...], "label": ...}}, its files relative to the folder or
    absolute, in place of imagesTr and labelsTr (which had been looked in: "no images named CASE_0000")."""
    dataset = tmp_path / "Dataset506_Glioma"
    source = data_file(BRATS.format(5))
    _link(dataset / "scans" / "p5_flair.nii.gz", source / "Flair_subtrMeanDivStd.nii.gz")
    _link(dataset / "imagesTs" / "pat3_0000.nii.gz", data_file(BRATS.format(3)) / "Flair_subtrMeanDivStd.nii.gz")
    _link(dataset / "imagesTs" / "pat3_0001.nii.gz", data_file(BRATS.format(3)) / "T1c_subtrMeanDivStd.nii.gz")
    listed = {"pat5": {"images": ["scans/p5_flair.nii.gz", str(source / "T1c_subtrMeanDivStd.nii.gz")],
                       "label": str(source / "OTMultiClass.nii.gz")}}
    index = {"channel_names": {"0": "FLAIR", "1": "T1c"}, "file_ending": ".nii.gz", "dataset": listed}
    (dataset / "dataset.json").write_text(json.dumps(index))
    case, = find_cases([dataset], labelled=True)
    assert case.name == "pat5" and case.label == source / "OTMultiClass.nii.gz"
    assert case.channels == (dataset / "scans" / "p5_flair.nii.gz", source / "T1c_subtrMeanDivStd.nii.gz")
    assert [c.name for c in find_cases([dataset])] == ["pat5", "pat3"]  # imagesTs where labels are not read

    for entries, message in (({}, r"its 'dataset' lists no case"),
                             ({"pat5": {"images": "a.nii.gz", "label": "b.nii.gz"}}, r"its case pat5 is no \{"),
                             ({"pat5": {**listed["pat5"], "images": ["scans/p5_flair.nii.gz"]}},
                              r"its case pat5 lists 1 image\(s\), where 'channel_names' names 2 channels "
                              r"\(FLAIR, T1c\)$"),
                             ({"pat5": {**listed["pat5"], "images": ["scans/p5_t2.nii.gz", "scans/p5_flair.nii.gz"]}},
                              r"scans/p5_t2.nii.gz: missing; .*dataset.json lists it as an image of case pat5$"),
                             ({"pat5": {**listed["pat5"], "label": "labels/p5.nii.gz"}},
                              r"labels/p5.nii.gz: missing; .*dataset.json lists it as the label map of case pat5$")):
        (dataset / "dataset.json").write_text(json.dumps({**index, "dataset": entries}))
        with pytest.raises(UserError, match=message):
            find_cases([dataset], labelled=True)


def test_evaluate_scores_the_values_a_dataset_json_names_as_the_model_labels_of_those_names(tmp_path):
    """A Decathlon BrainTumour map codes oedema 1, necrosis and non-enhancing tumour 2, enhancing 3, where
    brain-tumor-mr reads BraTS codes (oedema 2, necrosis and non-enhancing 1 and 3, enhancing 4): scored by value,
    every label had been another. The names the dataset.json
    gives decide where they are the model's, the others are background (said once); a --reference-values file
    says what each value is, and then scores it exactly as the BraTS-coded maps."""
    crops = _brain_crops(tmp_path / "crops")
    brats = sitk.ReadImage(str(crops["label"]))
    decathlon_coded = sitk.GetImageFromArray(np.choose(sitk.GetArrayFromImage(brats).astype(np.uint8), [0, 2, 1, 2, 3])
                                             .astype(np.uint8))
    decathlon_coded.CopyInformation(brats)
    dataset = tmp_path / "Dataset507_BrainTumour"
    _link(dataset / "imagesTr" / "pat3_0000.nii.gz", crops["FLAIR"])
    _link(dataset / "imagesTr" / "pat3_0001.nii.gz", crops["T1c"])
    (dataset / "labelsTr").mkdir()
    sitk.WriteImage(decathlon_coded, str(dataset / "labelsTr" / "pat3.nii.gz"))
    index = {"channel_names": {"0": "FLAIR", "1": "T1c"}, "file_ending": ".nii.gz",
             "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}
    (dataset / "dataset.json").write_text(json.dumps(index))
    case_folder = tmp_path / "cases" / "pat3"
    for name, target in (("FLAIR", "image_0000"), ("T1c", "image_0001"), ("label", "label")):
        _link(case_folder / f"{target}.nii.gz", crops[name])
    brats_scores = evaluate("brain-tumor-mr", [str(case_folder)], device="cpu")["cases"][0]["scores"]

    stream = io.StringIO()
    named = evaluate("brain-tumor-mr", [str(dataset)], device="cpu", reporter=Reporter("json", stream))
    warnings = [e["text"] for e in map(json.loads, stream.getvalue().splitlines()) if e.get("level") == "warning"]
    assert warnings == [f"{dataset}: its dataset.json names values that are no label of the model, counted as "
                        "background: 1 'edema', 2 'non-enhancing tumor' (a --reference-values FILE says which label "
                        "each value is)"]
    scores = named["cases"][0]["scores"]
    assert scores["enhancing tumour"] == brats_scores["enhancing tumour"] and brats_scores["whole tumour"]["dice"] > 0.5
    assert scores["peritumoral oedema"]["dice"] == 0 and scores["whole tumour"]["dice"] < 0.5  # the oedema unscored

    shipped = Path(__file__).parents[1] / "scripts" / "labels" / "values-decathlon-braintumour.json"
    run = run_cli_here("evaluate", "--model", "brain-tumor-mr", "--data", dataset, "--reference-values", shipped,
                       "-o", tmp_path / "report.json", "--device", "cpu", check_rc=0)
    assert "warning" not in run.stderr
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["cases"][0]["scores"] == brats_scores
    assert report["reference_values"] == {str(dataset): {"1": "peritumoral oedema", "2": "necrotic and non-enhancing "
                                                         "tumour core", "3": "enhancing tumour"}}
    assert named["reference_values"] == {str(dataset): {"1": "background", "2": "background",
                                                        "3": "enhancing tumour", "4": "enhancing tumour"}}
    assert "reference_values" not in evaluate("brain-tumor-mr", [str(case_folder)], device="cpu")  # the model's

    # BraTS-coded and named by none of the model's names: the values are the only link, scored as the model's, as
    # the warning spells out
    sitk.WriteImage(brats, str(dataset / "labelsTr" / "pat3.nii.gz"))
    (dataset / "dataset.json").write_text(json.dumps({**index, "labels": {"background": 0, "ED": 2, "NET": 1}}))
    stream = io.StringIO()
    assert evaluate("brain-tumor-mr", [str(dataset)], device="cpu", reporter=Reporter("json", stream))["cases"][0][
        "scores"] == brats_scores
    assert f"{dataset}: its dataset.json names none of the model's labels; its values are scored as the model's: " \
           "1 'NET' as 'necrotic and non-enhancing tumour core', 2 'ED' as 'peritumoral oedema' (a " \
           "--reference-values FILE says which label each value is)" in stream.getvalue()
    # nnU-Net's regions (lists of values) name no value alone: scored as the model's, as before they were read
    (dataset / "dataset.json").write_text(json.dumps({**index, "labels": {"background": 0, "whole tumour": [1, 2, 3, 4],
                                                                          "enhancing": 4}}))
    assert evaluate("brain-tumor-mr", [str(dataset)], device="cpu")["cases"][0]["scores"] == brats_scores
    brain = read_metadata(MODELS / "brain-tumor-mr.safetensors")  # BraTS 2023's: 1 necrosis, 2 oedema, 3 enhancing
    assert read_reference_values(shipped.with_name("values-brats2023.json"), brain) == {1: 2, 2: 1, 3: 3}
    values = tmp_path / "values.json"
    for written, message in (({"1": "oedema"}, r"'oedema' is no label of the model \(peritumoral oedema, necrotic "),
                             ({"0": "peritumoral oedema"}, r"pairs each label-map value from 1 with the name of a "
                                                           r"label of the model, .* not '0': 'peritumoral oedema'$"),
                             ({}, "names no label-map value"), ([1], "a reference values file is a JSON object")):
        values.write_text(json.dumps(written))
        with pytest.raises(UserError, match=message):
            evaluate("brain-tumor-mr", [str(dataset)], device="cpu", reference_values=str(values))


def test_a_labels_file_reading_a_value_as_another_label_than_its_dataset_json_names_it_is_refused(tmp_path):
    """scripts/labels/brats.json reads BraTS codes: on a Decathlon BrainTumour map it would teach 3 ("enhancing
    tumour") as tumour core, 1 (oedema) as core and 2 as oedema; the dataset.json's names say so before any case is
    read. A dataset that names its values as the labels file reads them is taken."""
    crops = _brain_crops(tmp_path / "crops")
    dataset = tmp_path / "Dataset508_BrainTumour"
    _link(dataset / "imagesTr" / "pat3_0000.nii.gz", crops["FLAIR"])
    _link(dataset / "imagesTr" / "pat3_0001.nii.gz", crops["T1c"])
    _link(dataset / "labelsTr" / "pat3.nii.gz", crops["label"])
    index = {"channel_names": {"0": "FLAIR", "1": "T1c"}, "file_ending": ".nii.gz",
             "labels": {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}}
    (dataset / "dataset.json").write_text(json.dumps(index))
    brats = str(Path(__file__).parents[1] / "scripts" / "labels" / "brats.json")
    with pytest.raises(UserError, match=r"Dataset508_BrainTumour: its dataset.json names the value 3 'enhancing "
                                        r"tumour', which the labels read as 'necrotic and non-enhancing tumour core': "
                                        r"give 'enhancing tumour' that value \(or \"source_values\": \[3\]\)"):
        resolve_start("brain-tumor-mr", load_recipe(None), brats, Reporter("quiet"), [str(dataset)])
    (dataset / "dataset.json").write_text(json.dumps({**index, "labels": {"background": 0, "oedema": 2,
                                                                          "enhancing tumour": 4}}))
    start = resolve_start("brain-tumor-mr", load_recipe(None), brats, Reporter("quiet"), [str(dataset)])
    assert [label.name for label in start.labels] == ["peritumoral oedema", "necrotic and non-enhancing tumour core",
                                                      "enhancing tumour"]
    # nnU-Net's regions, which --labels is asked for in their place, name no value alone: nothing to check
    (dataset / "dataset.json").write_text(json.dumps({**index, "labels": {"background": 0, "whole tumour": [1, 2, 3],
                                                                          "enhancing tumour": 3}}))
    assert resolve_start("brain-tumor-mr", load_recipe(None), brats, Reporter("quiet"), [str(dataset)]).labels == \
        start.labels


def test_brats_case_folders_give_a_model_the_files_their_names_end_in(tmp_path):
    """BraTS lays a case out as CASE/CASE_flair.nii.gz, CASE_t1ce.nii.gz, CASE_t1.nii.gz, CASE_t2.nii.gz and
    CASE_seg.nii.gz (2023: CASE-t2f, -t1c, -t1n, -t2w, -seg), which had been "no images found": brain-tumor-mr reads
    the FLAIR and T1c files by those names and scores the case as the same files in our case-folder layout; so too
    from MONAI's datalist of them ("image": a file per channel, which had been refused). A folder of scans that
    merely start with its name is still a folder of cases."""
    crops = _brain_crops(tmp_path / "crops")
    brats_2021, brats_2023 = tmp_path / "BraTS2021" / "BraTS2021_00003", tmp_path / "BraTS2023" / "BraTS-GLI-00003-000"
    for end, crop in (("t1", "mask"), ("t1ce", "T1c"), ("flair", "FLAIR"), ("seg", "label")):
        _link(brats_2021 / f"BraTS2021_00003_{end}.nii.gz", crops[crop])
    for end, crop in (("t1n", "mask"), ("t1c", "T1c"), ("t2f", "FLAIR"), ("seg", "label")):
        _link(brats_2023 / f"BraTS-GLI-00003-000-{end}.nii.gz", crops[crop])
    brain = read_metadata(MODELS / "brain-tumor-mr.safetensors")
    for data, name, files in ((brats_2021.parent, "BraTS2021_00003", ["_flair", "_t1ce", "_seg"]),
                              (brats_2023, "BraTS-GLI-00003-000", ["-t2f", "-t1c", "-seg"])):
        case, = fitted_to_model(find_cases([data], labelled=True), brain.channels, pytest.fail)
        assert case.name == name
        assert [p.name for p in (*case.channels, case.label)] == [f"{name}{end}.nii.gz" for end in files]
    case_folder = tmp_path / "cases" / "BraTS2021_00003"
    for name, target in (("FLAIR", "image_0000"), ("T1c", "image_0001"), ("label", "label")):
        _link(case_folder / f"{target}.nii.gz", crops[name])
    as_brats, as_folder = (evaluate("brain-tumor-mr", [str(data)], device="cpu") for data in (brats_2021.parent,
                                                                                             case_folder.parent))
    assert as_brats["cases"] == as_folder["cases"]

    one_file = {"image": ["BraTS2021_00003/BraTS2021_00003_flair.nii.gz"],  # a list of one file: that file
                "label": "BraTS2021_00003/BraTS2021_00003_seg.nii.gz"}
    (brats_2021.parent / "dataset.json").write_text(json.dumps({"training": [one_file]}))
    assert [c.name for c in find_cases([brats_2021.parent], labelled=True)] == ["BraTS2021_00003_flair"]
    # MONAI's datalist of the same folder: a file per channel, named by the ends of the files' names
    listed = [f"BraTS2021_00003/BraTS2021_00003_{end}.nii.gz" for end in ("t1", "t1ce", "flair")]
    (brats_2021.parent / "dataset.json").write_text(json.dumps({"training": [
        {"fold": 0, "image": listed, "label": "BraTS2021_00003/BraTS2021_00003_seg.nii.gz"}]}))
    case, = fitted_to_model(find_cases([brats_2021.parent], labelled=True), brain.channels, pytest.fail)
    assert case.name == "BraTS2021_00003" and case.channel_names == ("flair", "t1ce")
    assert case.channels == (brats_2021 / "BraTS2021_00003_flair.nii.gz", brats_2021 / "BraTS2021_00003_t1ce.nii.gz")

    scans = tmp_path / "ct"  # two patients' scans, not one case's channels
    for number in (1, 2):
        _link(scans / f"ct_{number}.nii.gz", data_file("sarcoma_ct/STS_036/image.nii.gz"))
    assert [(c.name, len(c.channels)) for c in find_cases([scans])] == [("ct_1", 1), ("ct_2", 1)]
    # a file more whose name ends in no channel: said where labels are read (it had been "no label map for
    # BraTS2021_00003_flair", the folder read as one of single scans, as it still is for a pre-training pool)
    _link(brats_2021 / "BraTS2021_00003_seg_corrected.nii.gz", crops["label"])
    with pytest.raises(UserError, match=r"BraTS2021_00003: BraTS2021_00003_seg_corrected.nii.gz is no channel of this "
                                        r"BraTS-style case .* move it out of the folder$"):
        find_cases([brats_2021], labelled=True)
    assert len(find_cases([brats_2021])) == 5


def test_a_one_channel_pre_training_pool_takes_each_sequence_of_a_brats_case_as_a_volume(tmp_path):
    """Pre-training an MR model (one channel, "MR") on BraTS cases of several sequences had been refused ("3
    image(s) where the model takes 1 channel(s)"), with no way round it but moving the files: each sequence is a
    volume of the pool, named after it, and a mask among them is left out with a warning."""
    from conftest import warnings_of

    crops = _brain_crops(tmp_path / "crops")
    case = tmp_path / "BraTS2021" / "BraTS2021_00003"
    for end, crop in (("flair", "FLAIR"), ("t1ce", "T1c"), ("t1", "mask"), ("seg", "label")):
        _link(case / f"BraTS2021_00003_{end}.nii.gz", crops[crop])
    result = run_cli_here("pretrain", "--modality", "MR", "--data", case.parent, "--cache", tmp_path / "cache",
                          "--prepare-only", "--progress", "json", check_rc=0)
    assert warnings_of(result) == [f"BraTS2021_00003_t1: left out, no 3-D scan: {case / 'BraTS2021_00003_t1.nii.gz'}: "
                                   "holds only the values 0, 1, as a label map or mask does, not a scan: give the "
                                   "image it outlines"]
    prepared = json.loads((tmp_path / "cache" / "prepared.json").read_text())
    assert [(v["name"], v["files"]) for v in prepared["volumes"]] == [
        ("BraTS2021_00003_flair", ["BraTS2021_00003_flair.nii.gz (flair)"]),
        ("BraTS2021_00003_t1ce", ["BraTS2021_00003_t1ce.nii.gz (t1ce)"])]


def test_case_folders_and_indexes_as_windows_writes_them_are_read(tmp_path):
    """A case folder's Image.nii.gz and Label.nii.gz (Windows and macOS file systems ignore case, so their users
    do) had been "no images found"; a dataset.json saved with a byte-order mark (Windows PowerShell, Notepad) had
    been "unreadable dataset index (Unexpected UTF-8 BOM …)", and its files listed as .\\imagesTr\\CASE "missing"."""
    case = tmp_path / "cases" / "STS_036"
    _link(case / "Image.nii.gz", data_file("sarcoma_ct/STS_036/image.nii.gz"))
    _link(case / "Label.NII.GZ", data_file("sarcoma_ct/STS_036/label.nii.gz"))
    found, = find_cases([case.parent], labelled=True)
    assert (found.name, found.channels, found.label) == ("STS_036", (case / "Image.nii.gz",), case / "Label.NII.GZ")

    task = tmp_path / "Task501_Sarcoma"
    _link(task / "imagesTr" / "STS_036.nii.gz", data_file("sarcoma_ct/STS_036/image.nii.gz"))
    _link(task / "labelsTr" / "STS_036.nii.gz", data_file("sarcoma_ct/STS_036/label.nii.gz"))
    index = {"labels": {"0": "background", "1": "tumour"},  # its folders parted as Windows parts them
             "training": [{"image": ".\\imagesTr\\STS_036.nii.gz", "label": ".\\labelsTr\\STS_036.nii.gz"}]}
    (task / "dataset.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(index).encode())
    assert [c.name for c in find_cases([task], labelled=True)] == ["STS_036"]
    assert [entry["name"] for entry in dataset_labels(task)] == ["tumour"]
