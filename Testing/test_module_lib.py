"""HybridMIMSegmentLib, the Slicer module's logic that needs no Slicer: the real engine run as a
child process (progress in order, outputs, errors, cancel of the whole tree), the panel's
states, and every command line the panel builds, accepted by the real CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from importlib import metadata
from pathlib import Path

import numpy as np
import psutil
import pytest
import SimpleITK as sitk
from hybridmim.errors import UserError
from hybridmim.progress import parse_event

from conftest import MODELS, REPO, data_file, run_cli_here

sys.path.insert(0, str(REPO / "HybridMIMSegment"))
from hybridmim.runfiles import state_path  # noqa: E402
from HybridMIMSegmentLib.casefolders import (case_folder, case_labels, labels_from_segments,  # noqa: E402
                                             relabelled, scan_file, write_labels_file)
from HybridMIMSegmentLib.charts import FINETUNE_CHART, PRETRAIN_CHART, chart_row  # noqa: E402
from HybridMIMSegmentLib.commands import (PRETRAIN_METHODS, PRETRAIN_MODALITIES, convert_command,  # noqa: E402
                                          devices_command, finetune_command, pretrain_command, reconstruct_command,
                                          segment_command)
from HybridMIMSegmentLib.dependencies import (TORCH_REQUIREMENT, installed_version_fits,  # noqa: E402
                                              missing_requirements, requirement_names, skip_speedup,
                                              speedup_skipped, write_constraints)
from HybridMIMSegmentLib.engine import EngineProcess, kill_tree, run_to_end  # noqa: E402
from HybridMIMSegmentLib.inputs import shared_transform, volumes_named_as_channels  # noqa: E402
from HybridMIMSegmentLib.models import UserModels, catalog_choices, needs_conversion  # noqa: E402
from HybridMIMSegmentLib.results import segment_lines, training_stop_message  # noqa: E402
from HybridMIMSegmentLib.states import Processing, State  # noqa: E402
from HybridMIMSegmentLib.trainingruns import (TrainingRun, keep_for_resume, last_stopped_run,  # noqa: E402
                                              models_folder, new_run_paths)
from HybridMIMSegmentLib.workfolders import (new_work_folder, remove_stale_work_folders,  # noqa: E402
                                             remove_work_folder, removed_on_error)


def test_a_real_segment_run_streams_its_progress_in_order_and_returns_the_output(small_ct, tmp_path):
    # The panel's files: the scene's volume exported uncompressed into a work folder, the output beside it.
    folder = new_work_folder(tmp_path)
    source = folder / "input_0.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(small_ct)), str(source), useCompression=False)
    output = folder / "segmentation.seg.nrrd"
    events = []
    result = run_to_end(segment_command([str(source)], str(output), device="cpu"),
                        on_event=events.append)
    assert result.succeeded and result.error is None, result.log
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert stages[:4] == ["load model", "read", "preprocess", "inference"] and "write" in stages
    inference = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "inference"]
    assert inference == sorted(inference) and inference[-1] == [e for e in events if e["event"] == "progress"
                                                                and e["stage"] == "inference"][-1]["total"]
    assert events[-1]["event"] == "done" and result.outputs["segmentation"] == str(output)
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(small_ct)).GetSize()
    # The log's lines on the result: each segment found with its volume and mean HU, then those not found.
    lines = segment_lines(result.outputs["segments"])
    found = [s for s in result.outputs["segments"] if s["volume_ml"] > 0]
    assert found and len(lines) == len(found) + 1
    liver = next(line for line in lines if line.startswith("  liver: "))
    volume, mean, unsure, at_edge = next((s["volume_ml"], s["mean_CT"], s["unsure_ml"], s["at_edge"]) for s in found
                                         if s["name"] == "liver")
    assert len(at_edge) > 1 and unsure > 0  # the small crop cuts the liver on more than one side
    assert liver == (f"  liver: {volume:.1f} ml, mean CT {mean:.1f}, model unsure of {unsure:.1f} ml "
                     f"({round(100 * unsure / volume)} % of its volume) (reaches the scan's {' and '.join(at_edge)} "
                     "edges: may go on beyond it)")
    assert lines[-1].startswith("  not found: ") and "gallbladder" in lines[-1]
    remove_work_folder(folder)
    assert not folder.exists() and tmp_path.is_dir()


def test_the_channels_of_a_run_must_share_their_transform():
    assert shared_transform([("CT", None, None)]) is None
    assert shared_transform([("FLAIR", "vtkMRMLLinearTransformNode4", "Registration"),
                             ("T1c", "vtkMRMLLinearTransformNode4", "Registration")]) == "vtkMRMLLinearTransformNode4"
    with pytest.raises(RuntimeError, match=r"^The input volumes are under different transforms \(FLAIR: "
                                           r"Registration, T1c: none\): harden them"):
        shared_transform([("FLAIR", "vtkMRMLLinearTransformNode4", "Registration"), ("T1c", None, None)])
    with pytest.raises(RuntimeError, match="FLAIR: Registration, T1c: Registration"):  # two of the same name
        shared_transform([("FLAIR", "vtkMRMLLinearTransformNode4", "Registration"),
                          ("T1c", "vtkMRMLLinearTransformNode7", "Registration")])


def test_scene_volumes_named_as_a_models_channels_are_offered_for_them():
    """A two-channel model's second selector had started empty, and nothing stopped T1c being picked as FLAIR."""
    assert volumes_named_as_channels(["FLAIR", "T1c"], [
        "BraTS2021_00003_t1", "BraTS2021_00003_t1ce", "BraTS2021_00003_flair", "BraTS2021_00003_t2"]) == {
        "FLAIR": "BraTS2021_00003_flair", "T1c": "BraTS2021_00003_t1ce"}
    # the shared data's own names, a Decathlon spelling, and two volumes of one name: not a guess
    assert volumes_named_as_channels(["FLAIR", "T1c"], ["T1c_subtrMeanDivStd", "Flair_subtrMeanDivStd", "brainmask"]) \
        == {"FLAIR": "Flair_subtrMeanDivStd", "T1c": "T1c_subtrMeanDivStd"}
    assert volumes_named_as_channels(["FLAIR", "T1c"], ["pat3 FLAIR", "pat3 FLAIR_1", "T1-Gd"]) == {"T1c": "T1-Gd"}
    assert volumes_named_as_channels(["CT"], ["abdomen", "CT 2mm"]) == {}  # one channel: the volume on view


def test_work_folders_left_by_a_crash_go_a_day_later_and_nothing_else(tmp_path):
    day = 24 * 3600
    stale, fresh = new_work_folder(tmp_path), new_work_folder(tmp_path)
    (stale / "input_0.nrrd").write_bytes(b"x" * 1000)
    others = [tmp_path / "Slicer-DICOM", tmp_path / "hybridmim-notes.txt"]  # Slicer's own, or not a folder
    others[0].mkdir()
    others[1].write_text("kept")
    for path in (stale, *others):
        os.utime(path, (time.time() - 2 * day, time.time() - 2 * day))
    os.utime(fresh, (time.time() - day + 60, time.time() - day + 60))
    assert remove_stale_work_folders(tmp_path) == [stale]
    assert not stale.exists() and fresh.is_dir() and all(path.exists() for path in others)
    assert remove_stale_work_folders(tmp_path / "missing") == []


def test_an_engine_error_arrives_as_one_readable_line(tmp_path):
    result = run_to_end(segment_command([str(tmp_path / "missing.nii.gz")], str(tmp_path / "seg.nii.gz")))
    assert result.returncode == 2 and not result.succeeded
    assert result.error == f"{tmp_path / 'missing.nii.gz'}: no such file or folder"


def test_cancel_ends_the_run_within_two_seconds_and_leaves_no_output(tmp_path):
    """A whole abdominal CT, cancelled once inference has started."""
    output = tmp_path / "seg.seg.nrrd"
    engine = EngineProcess(segment_command([str(data_file("abdomen_ct/ct_a.nii.gz"))], str(output), device="cpu"))
    engine.start()
    deadline = time.time() + 120
    while time.time() < deadline:
        if any(e["event"] == "progress" and e["stage"] == "inference" for e in engine.drain()):
            break
        time.sleep(0.05)
    else:
        pytest.fail("inference never started")
    tree = [engine._process.pid] + [c.pid for c in psutil.Process(engine._process.pid).children(recursive=True)]
    started = time.time()
    engine.cancel()
    result = engine.wait(timeout=10)
    assert time.time() - started < 2.0
    assert result.cancelled and not result.succeeded and result.error is None
    assert not any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in tree)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("sent, said", [(signal.SIGKILL, "the engine was killed (SIGKILL), most often by the system "
                                                          "when memory runs out: close other programs"),
                                        (signal.SIGSEGV, "the engine crashed (SIGSEGV); the log holds")])
def test_an_engine_ended_by_a_signal_from_outside_says_so_not_its_last_warning(small_ct, tmp_path, sent, said):
    """The system's out-of-memory killer (SIGKILL) or a crash ends the engine without a word of its own: the panel
    says what happened, where it said "exit code -9" (or the last line on stderr: a library's earlier warning)."""
    engine = EngineProcess(segment_command([str(small_ct)], str(tmp_path / "seg.nii.gz"), device="cpu"))
    engine.start()
    deadline = time.time() + 60
    while time.time() < deadline and not any(e["event"] == "stage" for e in engine.drain()):
        time.sleep(0.02)
    os.kill(engine._process.pid, sent)
    result = engine.wait(timeout=30)
    assert result.returncode == -sent and not result.cancelled and not result.succeeded
    assert result.error.startswith(said), result.error


def test_kill_tree_reaches_grandchildren():
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, encoding="utf-8")
    grandchild = int(parent.stdout.readline())
    started = time.time()
    kill_tree(parent.pid)
    parent.wait(timeout=5)
    assert time.time() - started < 2.0
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE


def test_states_follow_the_run_and_drive_one_button():
    processing = Processing("Apply")
    assert processing.view().button_text == "Apply" and processing.view().button_enabled
    view = processing.go(State.STARTING)
    assert (view.button_text, view.button_enabled, view.inputs_enabled, view.progress_visible) == \
        ("Cancel", True, False, True)
    view = processing.on_event({"event": "stage", "name": "inference"})
    assert processing.state is State.RUNNING and view.status == "Inference…"
    view = processing.on_event({"event": "progress", "stage": "inference", "done": 3, "total": 4})
    assert view.status == "Inference: 75%" and processing.percent == 75
    view = processing.go(State.IMPORTING)
    assert not view.button_enabled and view.button_text == "Apply"
    view = processing.go(State.DONE, "3 segments")
    assert view.button_enabled and view.inputs_enabled and not view.progress_visible and view.status == "3 segments"

    processing.go(State.STARTING)
    assert processing.go(State.CANCELLING).button_text == "Cancelling…"
    assert processing.go(State.CANCELLED).status == "Cancelled: nothing was changed."
    processing.go(State.STARTING)
    assert processing.go(State.FAILED, "no such file").status == "Failed: no such file"
    with pytest.raises(ValueError, match="cannot go from failed to importing"):
        processing.go(State.IMPORTING)


def test_a_stage_shows_its_time_left_at_its_pace_over_the_whole_run():
    """Fine-tuning alternates its steps with each epoch's validation: the steps' pace includes the validations, whose
    own pace is that of their cases, counted again at each; a resumed run starts at its saved step; the first
    seconds give no estimate."""
    now = [100.0]
    processing = Processing("Start", clock=lambda: now[0])
    processing.go(State.STARTING)
    processing.on_event({"event": "stage", "name": "fine-tune"})
    assert processing.on_event({"event": "progress", "stage": "fine-tune", "done": 400, "total": 800}).status == \
        "Fine-tune: 50%"  # resumed at step 400
    now[0] += 3
    assert processing.on_event({"event": "progress", "stage": "fine-tune", "done": 401, "total": 800}).status == \
        "Fine-tune: 50%"  # 3 s of pace: too little to tell
    now[0] += 27  # 10 more steps, 30 s since step 400
    assert processing.on_event({"event": "progress", "stage": "fine-tune", "done": 410, "total": 800}).status == \
        "Fine-tune: 51% (about 20 min left)"  # 3 s a step, 390 steps
    now[0] += 30
    assert processing.on_event({"event": "stage", "name": "validate"}).status == "Validate…"

    def validate(done: int) -> str:
        return processing.on_event({"event": "progress", "stage": "validate", "done": done, "total": 4}).status

    now[0] += 15  # a validation of a minute: four cases of 15 s
    assert validate(1) == "Validate: 25%"
    now[0] += 15
    assert validate(2) == "Validate: 50% (about 30 s left)"
    now[0] += 30
    assert validate(4) == "Validate: 100%"
    # the next step: 120 s for 11 steps since step 400
    processing.on_event({"event": "stage", "name": "fine-tune"})
    assert processing.on_event({"event": "progress", "stage": "fine-tune", "done": 411, "total": 800}).status == \
        "Fine-tune: 51% (about 1 h 11 min left)"
    now[0] += 600  # the next epoch's validation counts its cases again, at its own pace
    assert processing.on_event({"event": "stage", "name": "validate"}).status == "Validate…"
    now[0] += 20
    assert validate(1) == "Validate: 25%"
    now[0] += 20
    assert validate(2) == "Validate: 50% (about 40 s left)"
    processing.on_event({"event": "stage", "name": "fine-tune"})
    assert processing.on_event({"event": "progress", "stage": "fine-tune", "done": 800, "total": 800}).status == \
        "Fine-tune: 100%"
    processing.go(State.CANCELLING)
    processing.go(State.CANCELLED)
    processing.go(State.STARTING)  # a new run measures its own pace
    processing.on_event({"event": "stage", "name": "fine-tune"})
    assert processing.view().status == "Fine-tune…"
    assert processing.seconds_left() is None


def test_every_command_the_panel_builds_is_accepted_by_the_cli(tmp_path):
    from hybridmim.cli import build_parser

    parser = build_parser()
    commands = [
        segment_command(["ct.nii.gz"], "out.seg.nrrd"),
        segment_command(["flair.nii.gz", "t1c.nii.gz"], "out.seg.nrrd", model="brain-tumor-mr", device="cuda"),
        reconstruct_command(["ct.nii.gz"], "recon", mask_ratio=0.6, seed=3, device="cpu"),
        reconstruct_command(["ct.nii.gz"], "recon", model="ct-hybridmim-cnn"),
        finetune_command("abdomen-ct", ["cases"], "mine.safetensors", epochs=5, labels="labels.json", val=["val"],
                         max_minutes=30),
        finetune_command("abdomen-ct", ["cases"], "mine.safetensors", resume=True),
        *(pretrain_command(["scans", "dicom-export"], "pre.safetensors", method, max_minutes=60, modality=modality)
          for method, _ in PRETRAIN_METHODS for modality, _ in PRETRAIN_MODALITIES),
        pretrain_command(["scans"], "pre.safetensors", resume=True),
        convert_command("official.pt", "converted.safetensors"),
    ]
    for command in commands:
        args = parser.parse_args([*command, "--progress", "json"])
        assert args.command == command[0] and args.progress == "json"
    assert parser.parse_args(reconstruct_command(["ct.nii.gz"], "r", mask_ratio=0.6)).mask_ratio == 0.6
    assert parser.parse_args(finetune_command("x", ["d"], "o.safetensors", resume=True)).resume
    assert parser.parse_args(finetune_command("x", ["d"], "o.safetensors", max_minutes=7.5)).max_minutes == 7.5
    pretrain = parser.parse_args(pretrain_command(["s"], "o.safetensors", "hpm", "cuda", max_minutes=90, modality="MR"))
    assert (pretrain.method, pretrain.device, pretrain.max_minutes, pretrain.resume, pretrain.modality) == \
        ("hpm", "cuda", 90, False, "MR")
    with pytest.raises(ValueError, match="device"):
        segment_command(["ct.nii.gz"], "o.nii.gz", device="gpu")
    with pytest.raises(ValueError, match="method"):
        pretrain_command(["s"], "o.safetensors", "mae")
    with pytest.raises(ValueError, match="modality"):
        pretrain_command(["s"], "o.safetensors", modality="PET")
    with pytest.raises(ValueError, match="at least one"):
        pretrain_command([], "o.safetensors")


def test_a_reconstruct_command_runs_for_real(small_ct, tmp_path):
    result = run_to_end(reconstruct_command([str(small_ct)], str(tmp_path / "recon"), mask_ratio=0.5, seed=1,
                                            device="cpu"))
    assert result.succeeded, result.log
    assert {"mask", "masked", "reconstruction", "error"} <= set(result.outputs)


def test_a_run_polled_as_the_panel_does_gives_its_last_events_with_its_result(monkeypatch):
    """The panel's timer takes a run's new events and, once it has ended, its result, then stops following it:
    the lines the run wrote last (here its only one, read slowly, after the process has gone) come with that
    result, not after it, when nothing would take them."""
    import HybridMIMSegmentLib.engine as engine_module

    def read_slowly(line):
        time.sleep(1.0)  # longer than the process lives after writing it
        return parse_event(line)

    monkeypatch.setattr(engine_module, "parse_event", read_slowly)
    engine = EngineProcess(devices_command())
    engine.start()
    events, result = [], None
    while result is None:
        new, result = engine.poll()
        events += new
        time.sleep(0.1)  # the panel's timer interval
    assert result.succeeded and [e["event"] for e in events] == ["done"]
    assert events[-1]["outputs"] == result.outputs


def test_devices_are_reported_for_the_panel():
    from hybridmim.modelinfo import describe_devices

    result = run_to_end(devices_command())
    assert result.succeeded and result.outputs["cpu_threads"] >= 1
    import torch

    assert len(result.outputs["gpus"]) == (torch.cuda.device_count() if torch.cuda.is_available() else 0)
    text = describe_devices(result.outputs)
    assert text.startswith("GPU: ") if result.outputs["gpus"] else text.startswith("no GPU: the CPU will be used")
    assert describe_devices({"cpu_threads": 8, "gpus": [{"name": "NVIDIA H100", "memory_gib": 79.2}]}) == \
        "GPU: NVIDIA H100 (79.2 GiB)"


def test_the_catalog_models_come_with_their_details_and_the_default_first():
    from hybridmim.catalog import load_catalog

    choices = catalog_choices()
    assert choices[0].spec == load_catalog().default_model
    brain = next(c for c in choices if c.spec == "brain-tumor-mr")
    assert brain.channels == ("FLAIR", "T1c") and brain.modality == "MR" and brain.task == "segmentation"
    assert "Segments: " in brain.details and "Regions: whole tumour" in brain.details
    assert "Licence: CC-BY-NC-SA-3.0" in brain.details and "validation" in brain.details


def test_user_models_are_remembered_checked_and_forgotten_when_gone(tmp_path):
    store = tmp_path / "settings" / "user-models.json"
    mine = tmp_path / "mine.safetensors"
    mine.write_bytes((MODELS / "brain-tumor-mr.safetensors").read_bytes())
    models = UserModels(store)
    assert models.choices() == []
    choice = models.add(mine)
    assert choice.user and choice.spec == str(mine.resolve()) and "your model" in choice.label
    models.add(mine)  # once only
    assert [c.spec for c in UserModels(store).choices()] == [str(mine.resolve())]
    not_ours = tmp_path / "notes.safetensors"
    not_ours.write_text("text", encoding="utf-8")
    with pytest.raises(UserError, match="not a safetensors checkpoint"):
        models.add(not_ours)
    mine.unlink()
    assert models.choices() == [] and UserModels(tmp_path / "absent.json").choices() == []
    assert needs_conversion("official.pt") and not needs_conversion("ours.safetensors")


SPLEEN_TAG = ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure~"
              "SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^")


def test_scene_segments_become_a_labels_file_the_engine_accepts(tmp_path):
    from hybridmim.training.start import read_labels

    labels = labels_from_segments([{"name": "spleen", "color": (0.616, 0.424, 0.635), "terminology": SPLEEN_TAG},
                                   {"name": "my lesion", "color": (1.0, 0.0, 0.0), "terminology": ""}])
    assert labels[0] == {"value": 1, "name": "spleen", "color": [157, 108, 162], "terminology": {
        "category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "78961009", "Spleen"]}}
    assert labels[1] == {"value": 2, "name": "my lesion", "color": [255, 0, 0]}
    path = write_labels_file(tmp_path / "labels.json", labels)
    parsed, _ = read_labels(str(path))
    assert [(l.value, l.name) for l in parsed] == [(1, "spleen"), (2, "my lesion")]
    assert parsed[0].terminology["type"][1] == "78961009"
    with pytest.raises(UserError, match="'name' must be a non-empty string"):
        labels_from_segments([{"name": " ", "color": (0, 0, 0)}])
    paths = case_folder(tmp_path, 3, "CT chest: 2024/05 (contrast)")
    assert paths["folder"].name == "003_CT_chest_2024_05_contrast" and paths["label"].name == "label.nii.gz"
    assert scan_file(tmp_path, 12, "CT.1 abdomen").name == "012_CT.1_abdomen.nrrd"


def _scene_segments(labels) -> list[dict]:
    """The segments Slicer shows for a label map the engine wrote as .seg.nrrd: name, colour in 0..1 and
    terminology tag, as the panel reads them."""
    from slicerio.segmentation import terminology_entry_to_string

    return [{"name": label.name, "color": tuple(c / 255 for c in label.color),
             "terminology": terminology_entry_to_string(label.slicer_terminology())} for label in labels]


def test_scene_segments_of_the_init_models_labels_keep_them_and_their_values():
    from hybridmim.labels import source_lookup

    organs = next(c for c in catalog_choices() if c.spec == "abdomen-ct-scratch").labels
    assert [label.name for label in organs[:2]] == ["spleen", "right kidney"] and len(organs) == 13
    # A model's output corrected in Slicer: reordered, one organ deleted (absent), one renamed in case only, and
    # one renamed freely but still carrying the spleen's terminology.
    first = _scene_segments(organs)[::-1]
    second = [s for s in _scene_segments(organs) if s["name"] != "gallbladder"]
    second[4] = {**second[4], "name": "  Liver "}
    second[0] = {**second[0], "name": "Milz"}
    plan = case_labels([("case A", first), ("case B", second)], organs)
    assert plan.labels is None  # no labels file: the run takes the model's own, and keeps its output layer
    assert plan.values[0] == list(range(13, 0, -1))
    assert plan.values[1] == [1, 2, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]
    assert plan.notes[1:] == ["case B: no segment for gallbladder; background there"]
    # The label maps the panel writes: Slicer's export numbers the segments 1, 2, … in the order given.
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz"))))
    exported = np.where(reference > 0, 14 - reference, 0)  # case A's order: its segment k is organ 14 - k
    assert np.array_equal(relabelled(exported, plan.values[0]), reference)
    # Brain: a segment is written as the label-map value the model's labels read as it (BraTS codes).
    brain = next(c for c in catalog_choices() if c.spec == "brain-tumor-mr").labels
    core = [s for s in _scene_segments(brain) if "core" in s["name"]]
    values = case_labels([("glioma", core)], brain).values[0]
    assert source_lookup(list(brain))[values[0]] == 2


def test_scene_segments_that_are_not_the_init_models_labels_become_the_runs_labels():
    organs = next(c for c in catalog_choices() if c.spec == "abdomen-ct-scratch").labels
    lesion = {"name": "my lesion", "color": (1.0, 0.0, 0.0), "terminology": ""}
    liver = next(s for s in _scene_segments(organs) if s["name"] == "liver")
    plan = case_labels([("case A", [liver, lesion]), ("case B", [{**lesion, "name": "My Lesion"}, liver])], organs)
    assert [(e["value"], e["name"]) for e in plan.labels] == [(1, "liver"), (2, "my lesion")]
    assert plan.values == [[1, 2], [2, 1]]
    assert plan.notes == ["segments that are none of the labels of the model the run starts from: my lesion, My "
                          "Lesion; the run learns the segments' own labels (those named as its labels keep their "
                          "output channels)"]
    # From a pre-trained model (no labels), the segments' own labels, said nothing about
    assert case_labels([("case A", [lesion])], ()).notes == []
    with pytest.raises(RuntimeError, match=r"case B has segments \['liver'\], case A \['liver', 'my lesion'\]: "
                                           "every case needs the same segments"):
        case_labels([("case A", [liver, lesion]), ("case B", [liver])], ())
    with pytest.raises(RuntimeError, match="case B has no segments"):
        case_labels([("case A", [liver]), ("case B", [])], organs)


def test_missing_requirements_are_named_before_anything_is_installed(tmp_path):
    resources = REPO / "HybridMIMSegment" / "Resources"
    required, speedup = resources / "requirements.txt", resources / "requirements-cpu-speedup.txt"
    assert requirement_names(required) == ["monai", "einops", "safetensors", "slicerio", "pynrrd", "matplotlib",
                                           "tqdm"]
    # apart, so that an OpenVINO that fits no release of Slicer's numpy cannot stop the required install
    assert requirement_names(speedup) == ["onnx", "openvino"]
    assert missing_requirements(required) == missing_requirements(speedup) == []  # the development environment
    wanted = tmp_path / "requirements.txt"
    wanted.write_text("# comment\n--index-url https://example.org\nmonai>=1.3\n"
                      "no-such-package-xyz==1.0 ; python_version>'3'\n")
    assert missing_requirements(wanted) == ["no-such-package-xyz"]


def test_the_torch_asked_of_the_pytorch_extension_is_read_from_metadata_and_agrees_with_pyproject():
    assert f'"torch{TORCH_REQUIREMENT}"' in (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert installed_version_fits("torch", TORCH_REQUIREMENT) and not installed_version_fits("torch", ">=99")
    assert not installed_version_fits("no-such-package-xyz", ">=0")


def test_constraints_pin_what_slicer_and_its_pytorch_extension_installed(tmp_path):
    pins = write_constraints(tmp_path / "user").read_text(encoding="utf-8").splitlines()
    # the development environment has all five (requirements-dev.txt)
    assert pins == [f"{name}=={metadata.version(name)}" for name in ("numpy", "scipy", "SimpleITK", "vtk", "torch")]


def test_a_skipped_cpu_speedup_is_offered_again_only_once_slicer_or_torch_changes(tmp_path):
    user = tmp_path / "user"
    assert not speedup_skipped(user)
    skip_speedup(user)
    assert speedup_skipped(user)
    marker = user / "cpu-speedup-skipped.txt"
    marker.write_text(marker.read_text(encoding="utf-8").replace(f"numpy=={metadata.version('numpy')}",
                                                                 "numpy==1.0"), encoding="utf-8")
    assert not speedup_skipped(user)  # skipped under another numpy: this one may take OpenVINO


def _wheel(folder, name, version, requires=()):
    """A minimal pure-Python wheel that pip can resolve (metadata only)."""
    info = f"{name}-{version}.dist-info"
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        wheel.writestr(f"{info}/WHEEL",
                       "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        wheel.writestr(f"{info}/RECORD", f"{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


def test_under_the_constraints_pip_picks_a_requirement_version_that_keeps_the_installed_torch(tmp_path):
    # as MONAI >= 1.6 does, the newest version of a requirement asks for a newer torch than the one installed
    index = tmp_path / "index"
    index.mkdir()
    _wheel(index, "torch", "999.0")
    _wheel(index, "needs_torch", "2.0", ["torch>=999"])
    _wheel(index, "needs_torch", "1.0", ["torch"])

    # pip as it comes, without this machine's pip settings (extra indexes, its own constraints)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PIP_")}, "PIP_CONFIG_FILE": os.devnull}

    def would_install(*options):
        report = tmp_path / "report.json"
        done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--no-index",
                               "--find-links", str(index), "--report", str(report), *options, "needs_torch"],
                              capture_output=True, text=True, timeout=120, env=env)
        assert done.returncode == 0, done.stderr
        return sorted((i["metadata"]["name"], i["metadata"]["version"])
                      for i in json.loads(report.read_text())["install"])

    assert would_install() == [("needs_torch", "2.0"), ("torch", "999.0")]  # torch replaced
    assert would_install("-c", str(write_constraints(tmp_path))) == [("needs_torch", "1.0")]


def test_stop_asks_a_real_finetune_to_save_its_state_and_resume_continues_it(tmp_path):
    from test_finetune import TINY

    cases = tmp_path / "cases"
    cases.mkdir()
    for number in (1, 2):
        (cases / f"STS_{number:03d}").symlink_to(data_file(f"sarcoma_ct/STS_{number:03d}"))
    recipe = tmp_path / "tiny.json"
    short = {**TINY["train"], "val_fraction": 0.0, "epochs": 2, "steps_per_epoch": 5}
    recipe.write_text(json.dumps({**TINY, "train": short}), encoding="utf-8")
    output = tmp_path / "mine.safetensors"
    extra = ["--recipe", str(recipe), "--cache", str(tmp_path / "cache")]
    engine = EngineProcess(finetune_command("scratch", [str(cases)], str(output), device="cpu") + extra)
    engine.start()
    deadline = time.time() + 300
    while time.time() < deadline and engine.running:
        if any(e["event"] == "progress" and e["stage"] == "fine-tune" and e["done"] >= 2 for e in engine.drain()):
            engine.stop()
            break
        time.sleep(0.05)
    result = engine.wait(timeout=120)
    assert result.succeeded and result.outputs["stopped"] and 2 <= result.outputs["step"] < 10, result.log
    resumed = run_to_end(finetune_command("scratch", [str(cases)], str(output), device="cpu", resume=True)
                         + ["--cache", str(tmp_path / "cache")])
    assert resumed.succeeded and resumed.outputs["step"] == 10 and not resumed.outputs["stopped"], resumed.log


def test_the_panels_pretraining_runs_stops_resumes_and_its_model_reconstructs(scans, small_ct, tmp_path):
    """What the panel's pre-training section does, with the real engine: its command on scans exported into the
    run's folder, progress and a loss curve per logged step, Slicer closing (the run stops and saves its state,
    the panel's message), the next session finding the run and resuming it to the end (then forgetting it and its
    exports), and the model it then offers, which the reconstruction view runs."""
    from test_pretraining import TINY_RECIPE

    output, exports = new_run_paths(tmp_path / "user", "pretrained-hybridmim")
    scans_folder = Path(exports) / "scans"
    scans_folder.mkdir(parents=True)
    for index, name in enumerate(("lung", "abdomen")):  # as the panel writes the checked scene volumes
        sitk.WriteImage(sitk.ReadImage(str(scans / f"{name}.nii.gz")), str(scan_file(scans_folder, index, name)))
    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps(TINY_RECIPE), encoding="utf-8")
    cache = ["--cache", str(tmp_path / "cache")]
    run = TrainingRun("pretrain", output, (*pretrain_command([str(scans_folder)], output, "hybridmim", "cpu",
                                                             resume=True), *cache), exports)
    run.save()
    engine = EngineProcess(pretrain_command([str(scans_folder)], output, "hybridmim", "cpu", max_minutes=5)
                           + ["--recipe", str(recipe), *cache])
    engine.start()
    events, deadline = [], time.time() + 300
    while time.time() < deadline and engine.running:
        events += engine.drain()
        if any(e["event"] == "progress" and e.get("stage") == "pre-train" and e["done"] >= 4 for e in events):
            break
        time.sleep(0.05)
    stopped = engine.finish(timeout=120)  # what the panel does when Slicer closes
    events += engine.drain()
    assert stopped.succeeded and stopped.outputs["stopped"], stopped.log
    assert training_stop_message(stopped.outputs) == \
        f"Stopped at step {stopped.outputs['step']} of 10: Resume continues."
    rows = [chart_row(PRETRAIN_CHART, e) for e in events if e["event"] == "metric"]
    assert rows and [r[0] for r in rows] == [2 * (i + 1) for i in range(len(rows))]  # a point every 2 steps
    assert all(r[1] > 0 for r in rows)
    assert keep_for_resume(run, stopped.succeeded, stopped.outputs)

    found = last_stopped_run(models_folder(tmp_path / "user"), "pretrain")  # the next session
    assert found == run and last_stopped_run(models_folder(tmp_path / "user"), "finetune") is None
    assert found.reminder().startswith(f"{Path(output).stem} was stopped (state saved ")
    resumed = run_to_end(list(found.resume))
    assert resumed.succeeded and resumed.outputs["step"] == 10, resumed.log
    assert training_stop_message(resumed.outputs) is None
    assert not keep_for_resume(found, resumed.succeeded, resumed.outputs)
    assert not found.record.exists() and not Path(exports).exists() and Path(output).is_file()
    assert last_stopped_run(models_folder(tmp_path / "user"), "pretrain") is None
    choice = UserModels(tmp_path / "user-models.json").add(output)
    assert choice.task == "reconstruction" and choice.channels == ("CT",)
    # in this process: the engine's own process runs a reconstruction in test_a_reconstruct_command_runs_for_real
    shown = run_cli_here(*reconstruct_command([str(small_ct)], str(tmp_path / "recon"), choice.spec, device="cpu"),
                         "--progress", "json", check_rc=0)
    done = [e for e in map(parse_event, shown.stdout.splitlines()) if e and e["event"] == "done"]
    assert os.path.isfile(done[0]["outputs"]["reconstruction"]), shown.stdout


def _stopped_run(user, prefix, kind="pretrain", state=True, exports=True):
    """A recorded run of ``kind`` as the panel leaves it: its record, its exports and (``state``) a saved state."""
    output, folder = new_run_paths(user, prefix)
    run = TrainingRun(kind, output, (kind, "--data", folder, "-o", output, "--resume"), folder if exports else None)
    Path(folder).mkdir(parents=True)
    run.save()
    if state:
        state_path(Path(output)).write_bytes(b"state")
    return run


def test_the_panel_offers_the_newest_stopped_run_of_each_kind_and_forgets_what_cannot_resume(tmp_path):
    user = tmp_path / "user"
    older = _stopped_run(user, "pretrained-mim")
    time.sleep(0.02)
    newer = _stopped_run(user, "pretrained-hpm")
    tuned = _stopped_run(user, "finetuned", kind="finetune", exports=False)
    never_saved = _stopped_run(user, "pretrained-hybridmim", state=False)
    preparing = _stopped_run(user, "pretrained-hybridmim-mr", state=False)  # another Slicer's run, reading its exports
    os.utime(never_saved.record, (time.time() - 2 * 24 * 3600,) * 2)
    os.utime(state_path(Path(older.output)), (time.time() + 60,) * 2)  # stopped last
    folder = models_folder(user)
    (folder / "damaged.run.json").write_text("{", encoding="utf-8")
    moved = json.loads(newer.record.read_text(encoding="utf-8"))
    (folder / "copied.run.json").write_text(json.dumps(moved), encoding="utf-8")  # names another model

    assert last_stopped_run(folder, "pretrain") == older
    assert last_stopped_run(folder, "finetune") == tuned and tuned.exports is None
    assert not never_saved.record.exists() and not Path(never_saved.exports).exists()  # a day old, nothing saved
    assert preparing.record.exists() and Path(preparing.exports).is_dir()
    assert older.record.exists() and newer.record.exists()
    assert re.fullmatch(r"pretrained-mim-\d{8}-\d{6} was stopped \(state saved \d\d \w+ \d\d:\d\d\): "
                        r"Resume continues it\.", older.reminder())

    assert keep_for_resume(older, False, None)  # failed after saving a state: Resume may continue it
    shutil.rmtree(older.exports)  # the exported scene data deleted: nothing to resume from
    assert not keep_for_resume(older, False, None) and not older.record.exists()
    older = _stopped_run(user, "pretrained-mim-again")
    assert keep_for_resume(older, True, {"stopped": True, "before_training": True})
    assert not keep_for_resume(newer, True, {"stopped": False})  # wrote its model
    assert not newer.record.exists() and not Path(newer.exports).exists()
    assert last_stopped_run(folder, "pretrain") == older
    with pytest.raises(ValueError, match="kind must be one of"):
        TrainingRun("segment", older.output, ())


def test_a_run_whose_export_fails_leaves_no_exports_behind(tmp_path):
    _, exports = new_run_paths(tmp_path / "user", "finetuned")
    with pytest.raises(RuntimeError, match="Could not write"):
        with removed_on_error(exports):
            (Path(exports) / "cases" / "000_CT").mkdir(parents=True)
            raise RuntimeError("Could not write CT for the engine.")
    assert not Path(exports).exists() and (tmp_path / "user" / "training-data").is_dir()
    with removed_on_error(exports):
        Path(exports).mkdir()
    assert Path(exports).is_dir()


def test_a_stop_that_does_not_end_the_run_in_time_cancels_it_and_its_last_save_stays(scans, tmp_path):
    from test_pretraining import TINY_RECIPE

    recipe = tmp_path / "tiny.json"
    recipe.write_text(json.dumps(TINY_RECIPE), encoding="utf-8")
    output = tmp_path / "pretrained.safetensors"
    engine = EngineProcess(pretrain_command([str(scans)], str(output), "hybridmim", "cpu")
                           + ["--recipe", str(recipe), "--cache", str(tmp_path / "cache")])
    engine.start()
    deadline = time.time() + 300
    while time.time() < deadline and engine.running:  # past the save at step 2, inside a later step
        if any(e["event"] == "progress" and e.get("stage") == "pre-train" and e["done"] >= 3 for e in engine.drain()):
            break
        time.sleep(0.05)
    result = engine.finish(timeout=0)  # a step takes about a second: it cannot end in no time
    assert result.cancelled and not result.succeeded and not engine.running
    from hybridmim.training.runstate import load_resume_state

    assert load_resume_state(output, "pretrain")["step"] >= 2  # what --resume continues from


def test_an_idle_section_reminds_of_a_run_stopped_in_an_earlier_session():
    processing = Processing("Start")
    assert processing.view().status == ""
    reminder = "mine was stopped: Resume continues it."
    assert processing.remind(reminder).status == reminder
    processing.go(State.STARTING)
    assert processing.view().status == "Starting…"
    with pytest.raises(ValueError, match="not a starting one"):
        processing.remind("late")


def test_training_charts_take_the_points_of_each_run():
    """Fine-tuning plots loss and validation Dice per epoch (epoch 0: Dice before training, no loss);
    pre-training its loss per logged step; events without the axis field add nothing."""
    assert FINETUNE_CHART.columns == ("epoch", "loss", "dice")
    before = chart_row(FINETUNE_CHART, {"event": "metric", "epoch": 0, "dice": 0.25})
    assert before[0] == 0 and math.isnan(before[1]) and before[2] == 0.25
    assert chart_row(FINETUNE_CHART, {"epoch": 3, "loss": 0.5, "dice": 0.7, "lr": 1e-4}) == [3, 0.5, 0.7]
    assert chart_row(PRETRAIN_CHART, {"step": 20, "loss": 0.12, "pixel": 0.1}) == [20, 0.12]
    assert chart_row(FINETUNE_CHART, {"step": 20, "loss": 0.12}) is None


def test_a_training_run_stopped_before_its_end_says_what_resume_does():
    assert training_stop_message({"before_training": True, "resume_state": None}) == \
        "Stopped before training began: nothing to resume."
    assert training_stop_message({"before_training": True, "resume_state": "x.resume.pt"}).endswith(
        "Resume continues the earlier run.")
    assert training_stop_message({"stopped": True, "step": 7, "steps": 40}) == \
        "Stopped at step 7 of 40: Resume continues."
    assert training_stop_message({"stopped": False, "step": 40, "steps": 40}) is None
