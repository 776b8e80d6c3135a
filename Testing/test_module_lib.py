"""HybridMIMSegmentLib, the Slicer module's logic that needs no Slicer: the real engine run as a
child process (progress in order, outputs, errors, cancel of the whole tree), the panel's
states, and every command line the panel builds, accepted by the real CLI."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest
import SimpleITK as sitk

from conftest import REPO, data_file

sys.path.insert(0, str(REPO / "HybridMIMSegment"))
from HybridMIMSegmentLib.commands import (convert_command, finetune_command, reconstruct_command,  # noqa: E402
                                          segment_command)
from HybridMIMSegmentLib.engine import EngineProcess, kill_tree, run_to_end  # noqa: E402
from HybridMIMSegmentLib.states import Processing, State  # noqa: E402


def test_a_real_segment_run_streams_its_progress_in_order_and_returns_the_output(abdomen_crop, tmp_path):
    output = tmp_path / "seg.seg.nrrd"
    events = []
    result = run_to_end(segment_command([str(abdomen_crop["image"])], str(output), device="cpu"),
                        on_event=events.append)
    assert result.succeeded and result.error is None, result.log
    stages = [e["name"] for e in events if e["event"] == "stage"]
    assert stages[:4] == ["load model", "read", "preprocess", "inference"] and "write" in stages
    inference = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "inference"]
    assert inference == sorted(inference) and inference[-1] == [e for e in events if e["event"] == "progress"
                                                                and e["stage"] == "inference"][-1]["total"]
    assert events[-1]["event"] == "done" and result.outputs["segmentation"] == str(output)
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(abdomen_crop["image"])).GetSize()


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


def test_kill_tree_reaches_grandchildren():
    code = ("import subprocess, sys, time\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\ntime.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
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
    assert processing.state is State.RUNNING and view.status == "Inference: 0%"
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


def test_every_command_the_panel_builds_is_accepted_by_the_cli(tmp_path):
    from hybridmim.cli import build_parser

    parser = build_parser()
    commands = [
        segment_command(["ct.nii.gz"], "out.seg.nrrd"),
        segment_command(["flair.nii.gz", "t1c.nii.gz"], "out.seg.nrrd", model="brain-tumor-mr", device="cuda"),
        reconstruct_command(["ct.nii.gz"], "recon", mask_ratio=0.6, seed=3, device="cpu"),
        reconstruct_command(["ct.nii.gz"], "recon", model="ct-hybridmim-cnn"),
        finetune_command("abdomen-ct", ["cases"], "mine.safetensors", epochs=5, labels="labels.json", val=["val"]),
        finetune_command("abdomen-ct", ["cases"], "mine.safetensors", resume=True),
        convert_command("official.pt", "converted.safetensors"),
    ]
    for command in commands:
        args = parser.parse_args([*command, "--progress", "json"])
        assert args.command == command[0] and args.progress == "json"
    assert parser.parse_args(reconstruct_command(["ct.nii.gz"], "r", mask_ratio=0.6)).mask_ratio == 0.6
    assert parser.parse_args(finetune_command("x", ["d"], "o.safetensors", resume=True)).resume
    with pytest.raises(ValueError, match="device"):
        segment_command(["ct.nii.gz"], "o.nii.gz", device="gpu")


def test_a_reconstruct_command_runs_for_real(abdomen_crop, tmp_path):
    small = tmp_path / "small.nii.gz"  # one 96³ window of the pre-trained model
    sitk.WriteImage(sitk.ReadImage(str(abdomen_crop["image"]))[20:68, 10:58, 10:42], str(small))
    result = run_to_end(reconstruct_command([str(small)], str(tmp_path / "recon"), mask_ratio=0.5, seed=1,
                                            device="cpu"))
    assert result.succeeded, result.log
    assert {"mask", "masked", "reconstruction", "error"} <= set(result.outputs)
