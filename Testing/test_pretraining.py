"""The pre-training trainer on real CT crops: loss goes down, exact resume, clean stop, DDP on gloo, data, CLI."""

from __future__ import annotations

import functools
import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import REPO, StopsAt, record_curve_drawings, run_cli_here, signalled_run, stop_while_preparing
from hybridmim.errors import UserError
from hybridmim.preprocessing import Preprocessing
from hybridmim.progress import Reporter, parse_event
from hybridmim.volumes import find_cases, load_prepared, prepare_cases
from hybridmim.pretraining.run import load_recipe, merge_recipes, run_pretrain
from hybridmim.pretraining.trainer import _Distributed, build_method, pretrain
from hybridmim.training import runstate
from hybridmim.runfiles import state_path
from hybridmim.training.runstate import step_generators

# Tiny U-Net (bottleneck stride 8), 8³ patches → 48³ crops, 3 mm voxels; fp32 weights for exact comparisons.
CT = [{"name": "CT", "modality": "CT"}]  # the input channels of the scans prepared here
TINY_RECIPE = {
    "network": {"features": [4, 8, 8, 16], "dropout": 0.1},
    "preprocessing": {"spacing": [3.0, 3.0, 3.0]},
    "hybridmim": {"patch_size": 8},
    "train": {"steps": 10, "volumes_per_step": 2, "crops_per_volume": 2, "lr": 3e-3, "warmup_steps": 2,
              "checkpoint_every": 2, "log_every": 2, "amp": "none", "half_precision": False, "num_threads": 1},
}


@pytest.fixture(scope="module")
def recipe_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("recipe") / "tiny.json"
    path.write_text(json.dumps(TINY_RECIPE), encoding="utf-8")
    return path


def load_resume_state(output: Path) -> dict:
    return runstate.load_resume_state(output, "pretrain")


def recipe_for(recipe_file: Path) -> dict:
    return load_recipe(None, None, str(recipe_file))


def initial_method(recipe: dict, data) -> torch.nn.Module:
    """The HybridMIM wrapper with the weights a run of ``recipe`` starts from."""
    torch.manual_seed(recipe["train"].get("seed", 0))
    return build_method(recipe, data.channels)


def terms_on_fixed_batches(method: torch.nn.Module, data, seed: int, batches: int = 4, volumes: int = 2,
                           crops: int = 4) -> list[dict]:
    """Loss terms (eval mode, no dropout) on ``batches`` batches of ``volumes`` × ``crops`` crops and masks
    drawn from ``seed``."""
    method.eval()
    results = []
    with torch.no_grad():
        for index in range(batches):
            rng, generator = step_generators(seed, 0, index, 0)
            stored, valid, _ = data.sample_crops(rng, volumes, crops, method.crop_size)
            valid = torch.from_numpy(valid)
            image = data.to_model(torch.from_numpy(stored), valid)
            loss, terms = method(image, valid, **method.sample(image.shape[0], generator))
            results.append({"loss": float(loss), **{name: float(value) for name, value in terms.items()}})
    return results


def mean_term(results: list[dict], name: str) -> float:
    return float(np.mean([r[name] for r in results]))


def test_a_few_steps_on_real_ct_crops_lower_the_loss(prepared, recipe_file, tmp_path, monkeypatch):
    recipe = recipe_for(recipe_file)
    recipe["train"].update(steps=40, lr=1e-2, log_every=10, checkpoint_every=10, num_threads=None)
    data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
    stream = io.StringIO()
    output = tmp_path / "tiny.safetensors"
    drawn = record_curve_drawings(monkeypatch)
    pretrain(recipe, data, output, Reporter("json", stream), device="cpu")
    assert drawn == [10, 40]  # the curve at the first checkpoint, then not within a minute but at the end

    events = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    metrics = [e for e in events if e["event"] == "metric"]
    assert [m["step"] for m in metrics] == [10, 20, 30, 40]
    assert set(metrics[0]) >= {"loss", "pixel", "count", "location", "consistency", "contrast", "lr", "seconds"}
    # Training windows are too noisy to compare (the pixel term of one step ranges 0.006–0.047 with the
    # crops drawn); the initial and the trained model are compared on the same fixed batches instead.
    data_seed = 1234  # batches the run never drew (its seed is 0)
    before = terms_on_fixed_batches(initial_method(recipe, data), data, data_seed)
    trained = initial_method(recipe, data)
    trained.load_state_dict(load_resume_state(output)["method"])
    after = terms_on_fixed_batches(trained, data, data_seed)
    assert all(a["pixel"] < b["pixel"] for a, b in zip(after, before)), (before, after)
    assert mean_term(after, "pixel") < 0.8 * mean_term(before, "pixel"), (before, after)
    assert mean_term(after, "count") < mean_term(before, "count") - 0.3, (before, after)
    assert mean_term(after, "loss") < 0.9 * mean_term(before, "loss"), (before, after)
    assert [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "pre-train"] == list(range(1, 41))
    assert events[-1]["event"] == "done" and events[-1]["outputs"]["stopped"] is False

    from hybridmim.checkpoint import load_model
    meta, network = load_model(output)
    assert meta.task == "reconstruction" and meta.labels == [] and meta.method == "hybridmim"
    assert meta.pretraining["patch_size"] == 8 and meta.roi_size == (48, 48, 48)
    assert meta.provenance["crops_seen"] == 40 * 2 * 2
    assert sorted(d["name"] for d in meta.provenance["data"]) == ["abdomen", "lung"]
    assert network.head.out_channels == 1
    assert output.with_name("tiny.curve.png").stat().st_size > 10_000


def _weights(path: Path) -> dict:
    return load_file(str(path))


def _assert_same_weights(a: Path, b: Path) -> None:
    first, second = _weights(a), _weights(b)
    assert first.keys() == second.keys()
    different = [k for k in first if not (first[k] == second[k]).all()]
    assert not different, f"{len(different)} tensors differ, first {different[0]}"


@pytest.fixture(scope="module")
def uninterrupted(prepared, recipe_file, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("reference") / "reference.safetensors"
    run_cli_here("pretrain", "--recipe", recipe_file, "--data", prepared, "-o", output, "--device", "cpu",
                 "--progress", "quiet", check_rc=0)
    return output


def test_sigterm_then_kill_9_then_resume_continues_with_the_same_batches(prepared, recipe_file, uninterrupted,
                                                                       tmp_path):
    """A stop saves the state at the step it stopped (not at the last multiple of 2); the resumed run, killed
    without warning, falls back to its last checkpoint; resumed again, it runs exactly the missing steps and ends
    with exactly the uninterrupted run's weights."""
    output = tmp_path / "run.safetensors"
    stopped = run_cli_here("pretrain", "--recipe", recipe_file, "--data", prepared, "-o", output, "--device", "cpu",
                           "--progress", "json", stdout=StopsAt("pre-train", 1), check_rc=0)
    done = [e for e in map(parse_event, stopped.stdout.splitlines()) if e and e["event"] == "done"][0]
    stopped_at = done["outputs"]["step"]
    assert done["outputs"]["stopped"] is True and stopped_at == 1
    assert load_resume_state(output)["step"] == stopped_at

    def checkpointed(event) -> bool:  # a checkpoint at step 4 or later is on disk: then kill without warning
        deadline = time.time() + 30
        while event["event"] == "metric" and event["step"] >= 4 and time.time() < deadline:
            if load_resume_state(output)["step"] >= 4:
                return True
        return False

    process, _, _ = signalled_run(["pretrain", "--recipe", recipe_file, "--data", prepared, "-o", output, "--device",
                                   "cpu", "--progress", "json", "--resume"], checkpointed, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    state = load_resume_state(output)
    assert 4 <= state["step"] < 10, "the run finished before it could be killed"

    resumed = run_cli_here("pretrain", "--data", prepared, "-o", output, "--resume", "--device", "cpu",
                           "--progress", "json", check_rc=0)
    events = [e for e in map(parse_event, resumed.stdout.splitlines()) if e]
    assert any(e["event"] == "message" and f"resuming at step {state['step']} of 10" in e["text"] for e in events)
    steps_done = [e["done"] for e in events if e["event"] == "progress" and e["stage"] == "pre-train"]
    assert steps_done == list(range(state["step"] + 1, 11))
    assert [e["step"] for e in events if e["event"] == "metric"] == list(range(state["step"] + 2, 11, 2))
    # The interrupted-and-resumed run ends with exactly the weights of the uninterrupted one.
    _assert_same_weights(output, uninterrupted)
    assert load_resume_state(output)["step"] == 10
    assert [h["step"] for h in load_resume_state(output)["history"]] == [2, 4, 6, 8, 10]


def test_a_run_killed_unwarned_between_checkpoints_resumes_from_its_last_periodic_save(prepared, recipe_file,
                                                                                         uninterrupted, tmp_path):
    """With no checkpoint due for 1000 steps, the state is still saved every train.save_minutes (here, after
    every step): a run killed without warning (a MiM step on a CPU outlasts the minute Slicer closing waits)
    resumes where it was, and ends with exactly the uninterrupted run's weights."""
    recipe = recipe_for(recipe_file)
    recipe["train"].update(checkpoint_every=1000, save_minutes=1e-6)
    (tmp_path / "rare checkpoints.json").write_text(json.dumps(recipe), encoding="utf-8")
    output = tmp_path / "run.safetensors"

    def fifth_step(event) -> bool:
        return event["event"] == "progress" and event.get("stage") == "pre-train" and event["done"] == 5

    process, _, _ = signalled_run(["pretrain", "--recipe", tmp_path / "rare checkpoints.json", "--data", prepared, "-o",
                                   output, "--device", "cpu", "--progress", "json"], fifth_step, signal.SIGKILL)
    assert process.returncode == -signal.SIGKILL
    assert 4 <= load_resume_state(output)["step"] < 10
    run_cli_here("pretrain", "--data", prepared, "-o", output, "--resume", "--device", "cpu", "--progress", "quiet",
                 check_rc=0)
    _assert_same_weights(output, uninterrupted)


def test_a_pool_leaves_out_images_that_are_no_3d_scan_with_a_warning(scans, recipe_file, tmp_path):
    """A PACS export holds a study's scout (one slice) and a screenshot (colour) beside its scans, a folder of
    scans the masks made of them: a pre-training pool leaves them out, each named in a warning, and prepares the
    rest (a localiser's short series too); a pool of nothing else is refused."""
    from conftest import warnings_of

    abdomen = sitk.ReadImage(str(scans / "abdomen.nii.gz"))
    pool = tmp_path / "export"
    pool.mkdir()
    (pool / "abdomen.nii.gz").symlink_to(scans / "abdomen.nii.gz")
    sitk.WriteImage(abdomen[:, :, 20:21], str(pool / "scout.nii.gz"))
    grey = sitk.Cast(sitk.RescaleIntensity(abdomen[:, :, 20:23]), sitk.sitkUInt8)
    sitk.WriteImage(sitk.Compose(grey, grey, grey), str(pool / "screenshot.nii.gz"))
    sitk.WriteImage(sitk.Cast(abdomen > 100, sitk.sitkUInt8), str(pool / "bone_mask.nii.gz"))
    result = run_cli_here("pretrain", "--recipe", recipe_file, "--data", pool, "--cache", tmp_path / "cache",
                          "--prepare-only", "--progress", "json", check_rc=0)
    assert warnings_of(result) == [
        f"bone_mask: left out, no 3-D scan: {pool / 'bone_mask.nii.gz'}: holds only the values 0, 1, as a label map "
        "or mask does, not a scan: give the image it outlines",
        f"scout: left out, no 3-D scan: {pool / 'scout.nii.gz'}: a single slice (size (96, 72, 1)), not a 3-D "
        "volume",
        f"screenshot: left out, no 3-D scan: {pool / 'screenshot.nii.gz'}: has 3 values per voxel (colour or vector "
        "image); give one scalar volume per input channel"]
    prepared = json.loads((tmp_path / "cache" / "prepared.json").read_text(encoding="utf-8"))
    assert [v["name"] for v in prepared["volumes"]] == ["abdomen"]

    # a study's series in one folder: each a scan, but for the localiser, left out too and said
    from test_imageio import write_study_in_one_folder

    write_study_in_one_folder(tmp_path / "study")
    said = warnings_of(run_cli_here("pretrain", "--recipe", recipe_file, "--data", tmp_path / "study", "--cache",
                                    tmp_path / "cache", "--prepare-only", "--progress", "json", check_rc=0))
    assert said == [f"{tmp_path / 'study'}: 1 of its 3 DICOM series left out, of fewer than 10 images each "
                    "(localisers?)"]

    (pool / "abdomen.nii.gz").unlink()
    refused = run_cli_here("pretrain", "--recipe", recipe_file, "--data", pool, "--cache", tmp_path / "cache",
                           "--prepare-only", check_rc=2)
    assert refused.stderr.splitlines()[-1] == ("error: no 3-D scans to train on: the 3 images given were each left "
                                               "out (the warnings above say why)")


def test_stop_while_preparing_the_scans_ends_at_once(scans, recipe_file, tmp_path):
    output, cache = tmp_path / "run.safetensors", tmp_path / "cache"
    returncode, outputs, stderr = stop_while_preparing("pretrain", "--recipe", recipe_file, "--data", scans,
                                                       "--cache", cache, "-o", output, "--device", "cpu")
    assert returncode == 0, stderr
    assert outputs["stopped"] and outputs["before_training"] and outputs["resume_state"] is None
    assert not output.exists() and not state_path(output).exists()
    assert sum(p.suffix == ".npz" for p in cache.iterdir()) in (1, 2)  # the first scan's preparation kept


def test_max_minutes_keeps_the_steps_that_fit_and_ends_the_schedules_there(prepared, recipe_file, tmp_path):
    recipe = recipe_for(recipe_file)
    recipe["train"].update(steps=1000, checkpoint_every=1000, log_every=5, num_threads=None)
    data = load_prepared(prepared, Preprocessing.from_dict(recipe["preprocessing"]), Reporter("quiet"))
    output, stream = tmp_path / "timed.safetensors", io.StringIO()
    started = time.time()
    outputs = pretrain(recipe, data, output, Reporter("json", stream), device="cpu", max_minutes=0.25)
    seconds = time.time() - started
    messages = [e["text"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "message"]
    sized = [re.fullmatch(r"([0-9.]+) s a step: ([0-9]+) of 1000 steps fit in 0.25 minutes", m) for m in messages]
    assert sum(map(bool, sized)) == 1, messages
    pace, fit = next((float(m[1]), int(m[2])) for m in sized if m)
    assert 11 < fit < 1000 and outputs["step"] == outputs["steps"] == fit
    assert 15 - 5 < fit * pace <= 15 + pace, (pace, fit)  # the paced steps fill the 15 s, less the first step's
    assert seconds < 30, seconds
    final = load_resume_state(output)
    assert final["step"] == fit and final["history"][-1]["lr"] == 0.0  # the cosine ended on the new last step
    assert final["recipe"]["train"]["steps"] == fit and final["recipe"]["train"]["max_minutes"] is None
    assert final["recipe"]["train"]["warmup_steps"] == max(1, 2 * fit // 1000)  # the warm-up shortened alike
    assert recipe["train"]["steps"] == 1000  # the caller's recipe is left alone

    # Resumed, the finished run stays finished: its 1000-step recipe does not come back.
    def resumed(*exclude) -> list[dict]:
        stream = io.StringIO()
        run_pretrain([str(prepared)], str(output), Reporter("json", stream), resume=True, exclude=exclude,
                     device="cpu")
        return [e for e in map(parse_event, stream.getvalue().splitlines()) if e]

    events = resumed()
    done = [e for e in events if e["event"] == "done"]
    assert done[0]["outputs"]["step"] == done[0]["outputs"]["steps"] == fit
    assert not [e for e in events if e.get("level") == "warning"]
    # given other cases, it says so
    assert [e["text"] for e in resumed("lung") if e.get("level") == "warning"] == [
        "the cases differ from those the run stopped with (training cases gone: lung): it goes on with these, so it "
        "will not end as the uninterrupted run would have"]

    # A limit the timed steps would pass is kept too: the steps are fitted once the next one would pass it (a
    # 1-minute run of 21-s CPU steps took 4 minutes, its 11 timed steps).
    limit, short = 4 * pace, tmp_path / "short.safetensors"
    outputs = pretrain(recipe, data, short, Reporter("quiet"), device="cpu", max_minutes=limit / 60)
    trained = load_resume_state(short)["elapsed"]
    assert outputs["step"] == outputs["steps"] < 11 and trained < limit + 2 * pace, (outputs, trained, pace)


def test_two_process_gloo_run_completes(prepared, recipe_file, tmp_path):
    """Two ranks, each timing its own pace under --max-minutes: both stop at the same step. 30 s: with the suite's
    other worker busy, a step took 1.26 s, and a 15-s limit kept only the 11 timed steps."""
    output, recipe = tmp_path / "ddp.safetensors", tmp_path / "ddp.json"
    recipe.write_text(json.dumps({**TINY_RECIPE, "train": {**TINY_RECIPE["train"], "checkpoint_every": 1000}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "hybridmim", "pretrain", "--recipe", str(recipe), "--data", str(prepared), "-o", str(output),
         "--steps", "500", "--max-minutes", "0.5", "--device", "cpu", "--progress", "json"],
        capture_output=True, text=True, encoding="utf-8", errors="replace", cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    done = [e for e in map(parse_event, result.stdout.splitlines()) if e and e["event"] == "done"]
    assert len(done) == 1  # only rank 0 reports
    steps = done[0]["outputs"]["steps"]
    assert 11 < steps < 500 and done[0]["outputs"]["step"] == steps, result.stdout[-2000:]
    from hybridmim.checkpoint import read_metadata
    meta = read_metadata(output)
    assert meta.provenance["machine"].startswith("2 × ")
    assert meta.provenance["crops_seen"] == steps * 2 * 2 * 2
    assert load_resume_state(output)["step"] == steps


def test_leaving_the_process_group_waits_until_the_backend_threads_drop_the_collectives_tensors():
    """gloo's worker threads drop a collective's tensors after the caller has its result, and a process that
    ends before then aborts (the flake the two-process runs had). A timer thread stands in for the worker."""
    group = _Distributed("cpu", Reporter("quiet"))
    held = [torch.ones(1)]
    group._sent.append(weakref.ref(held[0]))
    threading.Timer(0.3, held.clear).start()
    started = time.monotonic()
    group.close()
    assert not held and time.monotonic() - started >= 0.25
    never_dropped = torch.ones(1)
    group._sent.append(weakref.ref(never_dropped))
    started = time.monotonic()
    group.close(timeout=0.2)  # bounded: a stuck backend does not hold the process forever
    assert 0.15 < time.monotonic() - started < 2


def test_find_cases_reads_every_dataset_layout(scans, tmp_path):
    lung, abdomen = scans / "lung.nii.gz", scans / "abdomen.nii.gz"
    case_folder = tmp_path / "cases" / "case_1"
    case_folder.mkdir(parents=True)
    (case_folder / "image.nii.gz").symlink_to(lung)
    (case_folder / "label.nii.gz").symlink_to(abdomen)  # labels are not scans
    two_channels = tmp_path / "cases" / "case_2"
    two_channels.mkdir()
    (two_channels / "image_0000.nii.gz").symlink_to(lung)
    (two_channels / "image_0001.nii.gz").symlink_to(abdomen)
    decathlon = tmp_path / "decathlon"
    (decathlon / "imagesTr").mkdir(parents=True)
    (decathlon / "imagesTr" / "ct_7.nii.gz").symlink_to(lung)
    (decathlon / "dataset.json").write_text(json.dumps({"training": [{"image": "./imagesTr/ct_7.nii.gz"}]}))

    cases = find_cases([tmp_path / "cases", decathlon, lung, case_folder])
    assert [(c.name, [p.name for p in c.channels]) for c in cases] == [
        ("case_1", ["image.nii.gz"]), ("case_2", ["image_0000.nii.gz", "image_0001.nii.gz"]),
        ("ct_7", ["ct_7.nii.gz"]), ("lung", ["lung.nii.gz"]), ("case_1", ["image.nii.gz"])]
    assert [c.name for c in find_cases([scans], exclude=["lung"])] == ["abdomen"]

    with pytest.raises(UserError, match="--exclude names no case in the data: nothing"):
        find_cases([scans], exclude=["nothing"])
    with pytest.raises(UserError, match="no such file or folder"):
        find_cases([tmp_path / "missing"])
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(UserError, match="not an image file"):
        find_cases([tmp_path / "notes.txt"])
    (tmp_path / "case.seg.nrrd").write_text("x")
    with pytest.raises(UserError, match="case.seg.nrrd: a Slicer segmentation, not a scan"):
        find_cases([tmp_path / "case.seg.nrrd"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        find_cases([tmp_path / "empty"])
    # two label files: refused where the labels are read, left out where they are not (segmenting, pre-training)
    (case_folder / "label.seg.nrrd").write_text("a Slicer segmentation")
    with pytest.raises(UserError, match=f"^{case_folder}: holds label.nii.gz and label.seg.nrrd; keep the one label "):
        find_cases([case_folder], labelled=True)
    assert [(c.name, c.label) for c in find_cases([case_folder])] == [("case_1", None)]
    (case_folder / "image.nrrd").symlink_to(abdomen)  # which image would be read is the file system's choice
    with pytest.raises(UserError, match=f"^{case_folder}: holds image.nii.gz and image.nrrd; keep the one image file"):
        find_cases([tmp_path / "cases"])
    # a Decathlon index that is damaged or names no image: one line (they had been json's or a KeyError's traceback)
    index = decathlon / "dataset.json"
    for written, message in (('{"training": [', "unreadable dataset index (Expecting value"),
                             ('[{"image": "ct_7.nii.gz"}]', 'a dataset index is a JSON object ({…}), not '
                                                            '[{"image": "ct_7.nii.gz"}]'),
                             ('{"training": {"image": "ct_7.nii.gz"}}', "its 'training' and 'test' are lists of cases"),
                             ('{"training": [{"label": "labelsTr/ct_7.nii.gz"}]}',
                              'a case whose image (or label) is no file name: {"label": "labelsTr/ct_7.nii.gz"}')):
        index.write_text(written)
        with pytest.raises(UserError) as refused:
            find_cases([decathlon])
        assert str(refused.value).startswith(f"{index}: {message}")


def test_prepared_cache_is_reused_and_checked(scans, recipe_file, tmp_path, monkeypatch):
    from hybridmim import download
    from hybridmim.volumes import SOURCE_DIGESTS

    recipe = recipe_for(recipe_file)
    preprocessing = Preprocessing.from_dict(recipe["preprocessing"])
    cache = tmp_path / "cache"
    first = prepare_cases(find_cases([scans]), preprocessing, cache, Reporter("quiet"), None, CT)
    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    assert len(stamps) == 2
    with monkeypatch.context() as patch:  # a cached volume's sources are not read again, not even to hash them
        patch.setattr(download, "file_sha256", lambda path: pytest.fail(f"{path} hashed again"))
        second = prepare_cases(find_cases([scans]), preprocessing, cache, Reporter("quiet"), None, CT)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == stamps  # nothing prepared again
    assert second.sources == first.sources
    older = next(cache.glob("*.npz"))  # a volume cached by an earlier version, without the digests: hashed
    with np.load(older) as stored:
        np.savez_compressed(older, **{k: stored[k] for k in stored.files if k != SOURCE_DIGESTS})
    again = prepare_cases(find_cases([scans]), preprocessing, cache, Reporter("quiet"), None, CT)
    assert again.sources == first.sources
    for a, b in zip(first.volumes, second.volumes):
        assert a.stored.dtype == np.uint8 and np.array_equal(a.stored, b.stored)
        assert np.array_equal(a.centres, b.centres)
    # 3 mm voxels, RAS, cropped to the body: the abdomen crop (96 × 72 × 56 at 3 mm) is at most that big
    abdomen = next(v for v in first.volumes if v.name == "abdomen")
    assert abdomen.stored.shape[0] == 1 and all(n <= 96 for n in abdomen.stored.shape[1:])
    assert first.sources[0]["sha256"][0] and len(first.sources[0]["sha256"][0]) == 64

    other = Preprocessing.from_dict({**recipe["preprocessing"], "spacing": [2.0, 2.0, 2.0]})
    with pytest.raises(UserError, match="other pre-processing than the recipe's"):
        load_prepared(cache, other, Reporter("quiet"))


def test_a_damaged_prepared_case_is_prepared_again_or_refused_in_a_prepared_folder(scans, recipe_file, tmp_path):
    """A prepared case cut short (a full disk, a partial copy) or with changed bytes is prepared again from its scan
    with a warning; in a folder given as data, where there is no scan, it is refused in one line (both had been
    zipfile's traceback)."""
    preprocessing = Preprocessing.from_dict(recipe_for(recipe_file)["preprocessing"])
    cache = tmp_path / "cache"
    prepare_cases(find_cases([scans]), preprocessing, cache, Reporter("quiet"), None, CT)
    index = {entry["name"]: cache / entry["file"] for entry in json.loads((cache / "prepared.json").read_text())[
        "volumes"]}
    whole = index["abdomen"].read_bytes()
    for damage in (whole[:1000], whole[:3000] + bytes(4) + whole[3004:]):
        index["abdomen"].write_bytes(damage)
        stream = io.StringIO()
        prepare_cases(find_cases([scans]), preprocessing, cache, Reporter("json", stream), None, CT)
        said = [e["text"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "message"]
        assert said == [f"abdomen: its prepared copy ({index['abdomen']}) is damaged; preparing it again"]
        assert index["abdomen"].read_bytes() == whole
    index["lung"].write_bytes(index["lung"].read_bytes()[:1000])
    with pytest.raises(UserError) as refused:
        load_prepared(cache, preprocessing, Reporter("quiet"))
    assert str(refused.value) == (f"{cache}: the prepared copy of lung ({index['lung'].name}) is missing or damaged; "
                                  "prepare the data again")
    index["lung"].unlink()
    with pytest.raises(UserError, match="the prepared copy of lung .* is missing or damaged"):
        load_prepared(cache, preprocessing, Reporter("quiet"))
    (cache / "prepared.json").write_text('{"format": ')
    with pytest.raises(UserError) as refused:
        load_prepared(cache, preprocessing, Reporter("quiet"))
    assert str(refused.value) == (f"{cache / 'prepared.json'}: unreadable index of prepared cases (Expecting value: "
                                  "line 1 column 12 (char 11)); prepare the data again")


def test_dicom_series_folders_are_scans_to_pre_train_on(scans, recipe_file, tmp_path):
    """A disc or PACS export (a DICOMDIR index, the series nested as PATIENT/STUDY/SERIES folders) pre-trains like
    the same CTs as NIfTI files; the series' files are the prepared cache's key and the checkpoint's provenance."""
    import SimpleITK as sitk
    from hybridmim.checkpoint import read_metadata
    from test_imageio import _write_dicom_series

    series = tmp_path / "export" / "PA000000" / "ST000000" / "SE000000"
    series.mkdir(parents=True)
    _write_dicom_series(sitk.ReadImage(str(scans / "abdomen.nii.gz")), series)
    (tmp_path / "export" / "DICOMDIR").write_bytes(bytes(128) + b"DICM" + bytes(64))  # an index, not an image
    cache, output = tmp_path / "cache", tmp_path / "dicom.safetensors"
    run_cli_here("pretrain", "--data", tmp_path / "export", scans / "lung.nii.gz", "-o", output, "--recipe",
                 recipe_file, "--steps", 2, "--cache", cache, "--progress", "quiet", check_rc=0)
    preprocessing = Preprocessing.from_dict(recipe_for(recipe_file)["preprocessing"])
    from_dicom = load_prepared(cache, preprocessing, Reporter("quiet"))
    from_nifti = prepare_cases(find_cases([scans / "abdomen.nii.gz"]), preprocessing, tmp_path / "nifti",
                               Reporter("quiet"), None, CT)
    assert [v.name for v in from_dicom.volumes] == ["PA000000_ST000000_SE000000", "lung"]
    assert np.array_equal(from_dicom.volumes[0].stored, from_nifti.volumes[0].stored)
    provenance = read_metadata(output).provenance["data"]
    assert provenance[0]["files"] == ["SE000000"] and provenance[0]["sha256"] == from_dicom.sources[0]["sha256"]

    stamps = {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")}
    again = prepare_cases(find_cases([tmp_path / "export"], dicom=True), preprocessing, cache, Reporter("quiet"), None,
                          CT)
    assert {p.name: p.stat().st_mtime_ns for p in cache.glob("*.npz")} == stamps  # the series was not read again
    first_slice = sorted(series.iterdir())[0]
    first_slice.write_bytes(first_slice.read_bytes())  # rewritten: the series may have changed
    changed = prepare_cases(find_cases([tmp_path / "export"], dicom=True), preprocessing, cache, Reporter("quiet"),
                            None, CT)
    assert len(list(cache.glob("*.npz"))) == len(stamps) + 1
    assert changed.sources[0]["sha256"] == again.sources[0]["sha256"]  # same bytes, same digest
    first_slice.write_bytes(first_slice.read_bytes()[:-2] + b"\x00\x01")
    edited = prepare_cases(find_cases([tmp_path / "export"], dicom=True), preprocessing, cache, Reporter("quiet"),
                           None, CT)
    assert edited.sources[0]["sha256"] != again.sources[0]["sha256"]


def test_a_folder_holding_a_studys_series_gives_a_scan_per_series_without_the_localiser(recipe_file, tmp_path):
    """An export that puts a study's files in one folder: each 3-D series is a scan (prepared exactly as the same
    image read alone, its UID in the provenance, its own files the cache key); the two-image localiser is not."""
    import SimpleITK as sitk
    from test_imageio import SERIES_UIDS, write_study_in_one_folder

    images = write_study_in_one_folder(tmp_path / "export" / "study")
    cases = find_cases([tmp_path / "export"], dicom=True)
    assert [(c.name, c.series) for c in cases] == [("study_1", SERIES_UIDS["abdomen"]),
                                                    ("study_2", SERIES_UIDS["chest"])]
    preprocessing = Preprocessing.from_dict(recipe_for(recipe_file)["preprocessing"])
    prepared = prepare_cases(cases, preprocessing, tmp_path / "cache", Reporter("quiet"), None, CT)
    for volume, name in zip(prepared.volumes, ("abdomen", "chest")):
        sitk.WriteImage(images[name], str(tmp_path / f"{name}.nii.gz"))
        alone = prepare_cases(find_cases([tmp_path / f"{name}.nii.gz"]), preprocessing, tmp_path / "alone",
                              Reporter("quiet"), None, CT)
        assert np.array_equal(volume.stored, alone.volumes[0].stored), name
    assert [s["series"] for s in prepared.sources] == [SERIES_UIDS["abdomen"], SERIES_UIDS["chest"]]
    assert prepared.sources[0]["sha256"] != prepared.sources[1]["sha256"]

    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")}
    chest_slice = tmp_path / "export" / "study" / "chest000.dcm"
    chest_slice.write_bytes(chest_slice.read_bytes())  # rewritten: only the chest series is prepared again
    prepare_cases(find_cases([tmp_path / "export"], dicom=True), preprocessing, tmp_path / "cache", Reporter("quiet"),
                  None, CT)
    now = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")}
    assert len(now) == 3 and all(now[name] == stamp for name, stamp in stamps.items())  # the abdomen's kept


def test_a_scan_unlike_the_recipes_modality_is_prepared_with_a_warning(scans, recipe_file, tmp_path):
    """The CT recipes window Hounsfield units: an MR among the scans is named, the CTs are not."""
    import SimpleITK as sitk

    from conftest import data_file, warnings_of

    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "abdomen.nii.gz").symlink_to(scans / "abdomen.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(data_file("abdomen_mr/mr.nii.gz")))[20:100, 10:80, :], str(folder / "mr.nii.gz"))
    result = run_cli_here("pretrain", "--prepare-only", "--recipe", recipe_file, "--cache", tmp_path / "cache",
                          "--data", folder, "--progress", "json", check_rc=0)
    unlike = [w for w in warnings_of(result) if "unlike a CT" in w]
    assert len(unlike) == 1 and unlike[0].startswith("mr: mr.nii.gz: no voxel below -200"), warnings_of(result)


def test_the_mr_modality_replaces_the_ct_windowing_of_every_method():
    for method, backbone in (("hybridmim", "cnn"), ("hybridmim", "swin"), ("mim", "hybrid"), ("hpm", "hybrid")):
        ct, mr = load_recipe(method, backbone, None), load_recipe(method, backbone, None, "MR")
        assert ct["channels"] == [{"name": "CT", "modality": "CT"}] and ct["title"].startswith("CT encoder-decoder")
        assert ct["preprocessing"]["intensity"]["type"] == "window" and "unlabelled CT" in ct["description"]
        assert mr["channels"] == [{"name": "MR", "modality": "MR"}] and mr["title"].startswith("MR encoder-decoder")
        assert mr["preprocessing"] == {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5],
                                       "intensity": {"type": "zscore"}, "foreground": None}
        assert "unlabelled MR" in mr["description"] and "{modality}" not in mr["title"] + mr["description"]
        assert {k: v for k, v in mr.items() if k not in ("channels", "preprocessing", "title", "description")} == \
            {k: v for k, v in ct.items() if k not in ("channels", "preprocessing", "title", "description")}
    with pytest.raises(UserError, match="unknown modality 'PET'"):
        load_recipe(None, None, None, "PET")


def test_mr_scans_pre_train_with_the_mr_modality_and_the_model_reconstructs_mr(scans, recipe_file, tmp_path):
    """Real MR (an abdominal MR and a brain FLAIR, cropped) with --modality MR: z-scored, named MR, a CT among them
    named; the model it writes is an MR reconstruction model that `reconstruct` runs on MR."""
    import SimpleITK as sitk

    from conftest import data_file, warnings_of
    from hybridmim.checkpoint import read_metadata

    folder = tmp_path / "scans"
    folder.mkdir()
    abdomen = sitk.ReadImage(str(data_file("abdomen_mr/mr.nii.gz")))
    sitk.WriteImage(abdomen[10:110, 5:85, :], str(folder / "abdomen.nii.gz"))
    flair = sitk.ReadImage(str(data_file("brain_tumor_mr/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz")))
    sitk.WriteImage(flair[40:200, 30:210, 20:140], str(folder / "flair.nii.gz"))
    (folder / "ct.nii.gz").symlink_to(scans / "abdomen.nii.gz")
    output = tmp_path / "mr.safetensors"
    result = run_cli_here("pretrain", "--modality", "MR", "--recipe", recipe_file, "--steps", "4", "--data", folder,
                          "--cache", tmp_path / "cache", "-o", output, "--device", "cpu", "--progress", "json",
                          check_rc=0)
    like_ct = [w for w in warnings_of(result) if "like a CT" in w]
    assert len(like_ct) == 1 and like_ct[0].startswith("ct: ct.nii.gz: values down to"), warnings_of(result)

    meta = read_metadata(output)
    assert meta.task == "reconstruction" and meta.channels == [{"name": "MR", "modality": "MR"}]
    assert meta.preprocessing.intensity.kind == "zscore" and meta.preprocessing.foreground_threshold is None
    assert meta.preprocessing.spacing == (3.0, 3.0, 3.0)  # the tiny recipe's, merged over the MR settings
    assert meta.title == "MR encoder-decoder pre-trained with HybridMIM (U-Net)"
    shown = run_cli_here("reconstruct", folder / "abdomen.nii.gz", "-o", tmp_path / "recon", "--model", output,
                         "--device", "cpu", "--progress", "json", check_rc=0)
    done = [e for e in map(parse_event, shown.stdout.splitlines()) if e and e["event"] == "done"][0]["outputs"]
    assert Path(done["reconstruction"]).is_file() and Path(done["masked"]).is_file()


def test_crops_pad_small_volumes_and_map_back_to_the_window(scans, recipe_file, tmp_path):
    import torch

    recipe = recipe_for(recipe_file)
    preprocessing = Preprocessing.from_dict(recipe["preprocessing"])
    data = prepare_cases(find_cases([scans]), preprocessing, tmp_path, Reporter("quiet"), None, CT)
    rng = np.random.default_rng(0)
    stored, valid, labels = data.sample_crops(rng, volumes=3, crops_per_volume=2, size=64)
    assert labels is None
    assert stored.shape == (6, 1, 64, 64, 64) and valid.shape == (6, 1, 64, 64, 64)
    # the lung crop is 40 slices of 3 mm: along z, every 64-voxel crop holds padding
    assert (valid == 0).any() and (valid == 1).any()
    image = data.to_model(torch.from_numpy(stored), torch.from_numpy(valid))
    assert float(image[torch.from_numpy(valid) == 0].abs().max()) == 0.0
    inside = image[torch.from_numpy(valid) == 1]
    low, high = data.preprocessing.intensity.output_range
    assert float(inside.min()) >= low - 1e-6 and float(inside.max()) <= high + 1e-6
    # 8-bit storage: within half a step (2000 HU / 255 / 2 ≈ 4 HU) of the float pre-processing
    from hybridmim.imageio import read_channels
    from hybridmim.modelgrid import prepare

    exact = prepare(read_channels([scans / "abdomen.nii.gz"]), data.preprocessing).array
    abdomen = next(v for v in data.volumes if v.name == "abdomen")
    decoded = abdomen.stored.astype(np.float32) * ((high - low) / 255.0) + low
    assert np.abs(decoded - exact).max() <= (high - low) / 255.0 / 2 + 1e-6


def test_cli_refuses_bad_requests_with_one_line(prepared, recipe_file, uninterrupted, tmp_path, refused):
    refused = functools.partial(refused, "pretrain")
    refused("--data", prepared, "-o", uninterrupted, message="already exists; pass --resume")
    refused("--data", prepared, "-o", tmp_path / "new.safetensors", "--resume", message="nothing to resume")
    refused("--data", prepared, "-o", tmp_path / "model.pt", message="a checkpoint is a .safetensors file")
    refused("--data", prepared, message="give the checkpoint to write with -o")
    refused("--data", tmp_path / "missing", "-o", tmp_path / "m.safetensors", message="no such file or folder")
    refused("--data", prepared, "--recipe", recipe_file, "--exclude", "nothing", "-o", tmp_path / "m.safetensors",
            message="--exclude names no case in the data: nothing")
    (tmp_path / "bad.json").write_text("{not json")
    refused("--data", prepared, "--recipe", tmp_path / "bad.json", "-o", tmp_path / "m.safetensors",
            message="unreadable recipe")
    (tmp_path / "list.json").write_text("[]")
    refused("--data", prepared, "--recipe", tmp_path / "list.json", "-o", tmp_path / "m.safetensors",
            message="list.json: a recipe is a JSON object ({…}), not []")
    (tmp_path / "typo.json").write_text(json.dumps({**TINY_RECIPE, "train": {"stpes": 3}}))
    refused("--data", prepared, "--recipe", tmp_path / "typo.json", "-o", tmp_path / "m.safetensors",
            message="unknown settings ['stpes']")
    (tmp_path / "typo2.json").write_text(json.dumps({**TINY_RECIPE, "hybridmim": {"mask_ration": 0.5}}))
    refused("--data", prepared, "--recipe", tmp_path / "typo2.json", "-o", tmp_path / "m.safetensors",
            message="recipe 'hybridmim': unknown settings ['mask_ration']")
    refused("--data", prepared, "--recipe", recipe_file, "--max-minutes", "0", "-o", tmp_path / "m.safetensors",
            message="the time limit must be a positive number of minutes, got 0.0")
    refused("--data", prepared, "--recipe", recipe_file, "--steps", "0", "-o", tmp_path / "m.safetensors",
            message="recipe 'train.steps' must be ≥ 1, got 0")
    for changes, message in [({"train": {"steps": 2.5}}, "recipe 'train.steps' must be a whole number, got 2.5"),
                             ({"train": {"lr": "fast"}}, "recipe 'train.lr' must be a finite number, got \"fast\""),
                             ({"train": {"grad_clip": True}}, "recipe 'train.grad_clip' must be a finite number or "
                                                              "null, got true"),
                             ({"hybridmim": {"mask_ratio": "0.4"}},
                              "recipe 'hybridmim.mask_ratio' must be a finite number, got \"0.4\""),
                             ({"hybridmim": {"mask_ratio": 1.5}},  # else refused at the first step, a traceback
                              "recipe 'hybridmim': mask_ratio must be in [0, 1), got 1.5"),
                             ({"hybridmim": {"network": 3}}, "recipe 'hybridmim': unknown settings ['network']"),
                             ({"train": {"checkpoint_every": 0}},  # else a ZeroDivisionError at the first step
                              "recipe 'train.checkpoint_every' must be ≥ 1, got 0"),
                             ({"train": {"save_minutes": 0}},
                              "recipe 'train.save_minutes' must be a positive number of minutes, got 0"),
                             # tracebacks before, each of these
                             ({"train": {"seed": -1}},
                              "recipe 'train.seed' must be a whole number from 0 to 2^63 - 1, got -1"),
                             ({"train": {"seed": 2 ** 64}},
                              f"recipe 'train.seed' must be a whole number from 0 to 2^63 - 1, got {2 ** 64}"),
                             ({"train": {"lr": -1e-4}}, "recipe 'train.lr' must be above 0, got -0.0001"),
                             ({"network": "unet"}, "recipe 'network' must be an object, got \"unet\""),
                             ({"channels": "CT"}, "recipe 'channels' must be a list, got \"CT\""),
                             ({"preprocessing": {"intensity": {"type": "window", "window": [-1000, "max"]}}},
                              "pre-processing 'intensity.window' must be 2 numbers, got [-1000, \"max\"]"),
                             # a block of the wrong kind or name: taken in the defaults' stead, or ignored
                             ({"hybridmim": []}, "recipe 'hybridmim' must be an object, got []"),
                             ({"crop_size": 64}, "recipe: unknown settings ['crop_size']")]:
        (tmp_path / "hand.json").write_text(json.dumps(merge_recipes(TINY_RECIPE, changes)))
        refused("--data", prepared, "--recipe", tmp_path / "hand.json", "-o", tmp_path / "m.safetensors",
                message=message)
    for content in (b"not a torch file", b""):  # an empty one: a disk that filled up while it was written
        state_path(tmp_path / "broken.safetensors").write_bytes(content)
        refused("--data", prepared, "-o", tmp_path / "broken.safetensors", "--resume",
                message="not a readable resume state (not a file that torch.save writes)")
    assert not (tmp_path / "m.safetensors").exists() and not (tmp_path / "new.safetensors").exists()
