"""`hybridmim finetune` on real sarcoma CTs: Dice rises, weights transfer, exact resume, clear refusals."""

from __future__ import annotations

import functools
import io
import json
import re
import signal
import subprocess
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from safetensors.torch import load_file

from conftest import (DEFAULT_MODEL, MODELS, REPO, StopsAt, around_the_tumour, data_file, record_curve_drawings,
                      run_cli_here, signalled_run, stop_while_preparing, warning_texts, warnings_of)
from test_convert import _RunsCode, official_state
from hybridmim.checkpoint import read_metadata
from hybridmim.errors import UserError
from hybridmim.labels import parse_labels
from hybridmim.memory import GIB
from hybridmim.networks import build_network
from hybridmim.progress import Reporter, parse_event
from hybridmim.runfiles import curve_path
from hybridmim.training import finetune, runstate
from hybridmim.training.finetune import FinetuneSchedule, load_recipe, run_finetune, split_cases
from hybridmim.training.schedule import StepPace
from hybridmim.training.start import head_summary, resolve_start, transfer_weights

SARCOMA = parse_labels(json.loads((REPO / "scripts/labels/sarcoma.json").read_text(encoding="utf-8")))

# A small U-Net at 3 mm on 48³ windows; tumour only. Everything else from Resources/Recipes/finetune.json.
TINY = {
    "scratch": {"network": {"name": "unet", "features": [8, 16, 16, 32], "dropout": 0.0},
                "preprocessing": {"spacing": [3.0, 3.0, 3.0],
                                  "intensity": {"type": "window", "window": [-200, 300], "output_range": [0.001, 1.0]}},
                "roi_size": [48, 48, 48], "overlap": 0.25},  # validation's windows are most of these tests' time
    "labels": [{"value": 1, "name": "soft-tissue sarcoma", "color": [230, 60, 60]}],
    "train": {"epochs": 4, "steps_per_epoch": 10, "volumes_per_step": 2, "crops_per_volume": 1, "lr": 3e-3,
              "warmup_steps": 5, "patience": 0, "amp": "none", "half_precision": False,
              "window": [32, 32, 32]},  # 32³ crops: the short fine-tune takes 20 s, not 30 s, Dice rising alike
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    """Dataset folders (case folders with image.nii.gz and label.nii.gz): the real sarcoma cases, the
    validation ones cut to their tumour."""
    root = tmp_path_factory.mktemp("sarcoma")
    for split, cases in {"train": (1, 2, 3, 4), "val": (36, 37)}.items():
        (root / split).mkdir()
        for number in cases:
            source = data_file(f"sarcoma_ct/STS_{number:03d}")
            if split == "train":
                (root / split / source.name).symlink_to(source)
            else:
                around_the_tumour(source, root / split / source.name)
    recipe = root / "tiny.json"
    recipe.write_text(json.dumps(TINY), encoding="utf-8")
    short = root / "short.json"  # for the interrupted runs: 3 epochs of 6 steps, validated at 0, 2 and 3
    short.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 3, "steps_per_epoch": 6,
                                                   "validate_every": 2}}), encoding="utf-8")
    return {"train": root / "train", "val": root / "val", "recipe": recipe, "short": short, "cache": root / "cache"}


def test_a_short_finetune_raises_validation_dice(folders, tmp_path, monkeypatch):
    stream = io.StringIO()
    output = tmp_path / "sarcoma.safetensors"
    drawn = record_curve_drawings(monkeypatch)
    outputs = run_finetune("scratch", [str(folders["train"])], str(output), Reporter("json", stream),
                           val_paths=[str(folders["val"])], recipe_file=str(folders["recipe"]),
                           cache=str(folders["cache"]), device="cpu")
    assert drawn == [10, 40]  # the curve at the first epoch, then not within a minute but at the end
    events = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    metrics = [e for e in events if e["event"] == "metric"]
    assert [m["epoch"] for m in metrics] == [0, 1, 2, 3, 4]
    validating = [(e["done"], e["total"]) for e in events if e["event"] == "progress" and e["stage"] == "validate"]
    assert validating == [(1, 2), (2, 2)] * 5  # each validation's progress, case by case
    start, best = metrics[0]["dice"], max(m["dice"] for m in metrics)
    assert best > start + 0.15, [m["dice"] for m in metrics]
    assert set(metrics[1]["dice_per_label"]) == {"soft-tissue sarcoma"}
    assert outputs["best_dice"] == pytest.approx(best)

    meta = read_metadata(output)
    assert meta.task == "segmentation" and [label.name for label in meta.labels] == ["soft-tissue sarcoma"]
    assert meta.metrics["validation"]["cases"] == ["STS_036", "STS_037"]
    assert meta.metrics["validation"]["mean_dice"] == pytest.approx(best, abs=1e-4)
    assert meta.provenance["epoch"] == outputs["best_epoch"] and meta.method == "supervised from scratch"
    assert sorted(d["name"] for d in meta.provenance["train_data"]) == ["STS_001", "STS_002", "STS_003", "STS_004"]
    assert output.with_name("sarcoma.curve.png").stat().st_size > 10_000
    assert warning_texts(events) == []

    # Refined on the same labels, it starts where it ended: its output layer is kept, not drawn anew. At a learning
    # rate far too high, its one epoch scores below that start, and the run says the model it started from is better.
    stream = io.StringIO()
    reckless = tmp_path / "reckless.json"
    reckless.write_text(json.dumps({**TINY, "train": {**TINY["train"], "lr": 1.0, "warmup_steps": 0}}), "utf-8")
    run_finetune(str(output), [str(folders["train"])], str(tmp_path / "refined.safetensors"), Reporter("json", stream),
                 val_paths=[str(folders["val"])], recipe_file=str(reckless), cache=str(folders["cache"]),
                 device="cpu", epochs=1)
    events = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    assert any(e["event"] == "message" and e["text"].endswith("tensors transferred, the output layer kept too: the "
                                                              "same labels") for e in events)
    first, refined = [e for e in events if e["event"] == "metric"]
    assert first["epoch"] == 0 and first["dice"] == pytest.approx(best, abs=0.01)
    assert refined["dice"] < first["dice"] - 0.1
    assert warning_texts(events) == [
        f"the model the run started from scored a higher validation Dice ({first['dice']:.3f}) than any epoch of the "
        f"run (best {refined['dice']:.3f}, epoch 1): on these cases it is the better model"]

    # The model it wrote is a working segmentation model.
    seg = tmp_path / "sts036.nii.gz"
    run_cli_here("segment", folders["val"] / "STS_036" / "image.nii.gz", "-o", seg, "--model", output, check_rc=0)
    assert seg.is_file()


def test_an_official_swinunetr_checkpoint_converted_fine_tunes_into_a_working_model(folders, tmp_path):
    """The path of a user with the official HybridMIM code's checkpoint: convert, fine-tune, segment."""
    official, converted = tmp_path / "model_final_epoch.pt", tmp_path / "official.safetensors"
    torch.save({"epoch": 100, "state_dict": official_state()}, official)
    run_cli_here("convert", official, "-o", converted, check_rc=0)
    (tmp_path / "one_epoch.json").write_text(json.dumps({
        "labels": TINY["labels"], "train": {**TINY["train"], "epochs": 1, "steps_per_epoch": 2}}))
    refused = run_cli_here("finetune", "--init", converted, "--data", folders["val"], "--recipe",
                           tmp_path / "one_epoch.json", "-o", tmp_path / "small.safetensors", check_rc=2)
    assert refused.stderr.strip() == ("error: training crops of 32×32×32 voxels: the swinunetr network takes at "
                                      "least 64 a side, in multiples of 32 (train.window in a recipe)")
    (tmp_path / "one_epoch.json").write_text(json.dumps({
        "labels": TINY["labels"], "train": {**TINY["train"], "epochs": 1, "steps_per_epoch": 2,
                                            "window": [64, 64, 64]}}))
    output = tmp_path / "swin.safetensors"
    run_cli_here("finetune", "--init", converted, "--data", folders["val"], "--val-fraction", "0", "--recipe",
                 tmp_path / "one_epoch.json", "--cache", tmp_path / "cache", "-o", output, "--device", "cpu",
                 check_rc=0)  # the small cases around the tumour, no validation: the path, not the Dice
    meta = read_metadata(output)
    assert meta.network["name"] == "swinunetr" and meta.method.startswith("fine-tuned from official.safetensors")
    seg = tmp_path / "sts036.nii.gz"
    run_cli_here("segment", folders["val"] / "STS_036" / "image.nii.gz", "-o", seg, "--model", output, check_rc=0)
    assert seg.is_file()


def test_transfer_loads_encoder_and_decoder_and_only_the_head_is_new(tmp_path):
    recipe = load_recipe(None)
    start = resolve_start("ct-hybridmim-cnn", recipe, str(REPO / "scripts/labels/btcv13.json"),
                          Reporter("quiet"))
    assert start.init["task"] == "reconstruction" and not start.keep_head and start.head_channels is None
    assert start.roi_size == (96, 96, 96) and start.preprocessing.spacing == (1.5, 1.5, 2.0)
    network = build_network(start.network)
    summary = transfer_weights(network, start.weights, start.head_channels)
    assert summary["new"] == ["head.bias", "head.weight"]
    pretrained = load_file(str(MODELS / "ct-hybridmim-cnn.safetensors"))
    loaded = network.state_dict()
    assert summary["transferred"] == len(loaded) - 2
    for name, tensor in pretrained.items():
        if name.startswith("head."):
            assert loaded[name].shape[0] == 14 and tensor.shape[0] == 1
        else:
            assert torch.equal(loaded[name], tensor.float()), name
    assert any(k.startswith("downs.") for k in pretrained) and any(k.startswith("ups.") for k in pretrained)

    # A segmentation model refined on its own labels keeps its output layer too.
    start = resolve_start(str(DEFAULT_MODEL), recipe, None, Reporter("quiet"))
    assert start.keep_head and len(start.labels) == 13
    network = build_network(start.network)
    assert transfer_weights(network, start.weights, start.head_channels)["new"] == []
    assert torch.equal(network.state_dict()["head.weight"], load_file(str(DEFAULT_MODEL))["head.weight"].float())

    # So does one given its labels without the largest-piece clean-up: that flag changes no output channel.
    plain = [{k: v for k, v in label.items() if k != "largest_component"}
             for label in json.loads((REPO / "scripts/labels/sarcoma.json").read_text())]
    (tmp_path / "plain.json").write_text(json.dumps(plain))
    start = resolve_start(str(MODELS / "sarcoma-ct.safetensors"), recipe, str(tmp_path / "plain.json"),
                          Reporter("quiet"))
    assert start.keep_head and not start.labels[0].largest_component

    # A structure added to a segmentation model's: the channels of the labels it shares (by name) carry over.
    (tmp_path / "added.json").write_text(json.dumps([{"value": 1, "name": "Liver", "color": [1, 2, 3]},
                                                     {"value": 2, "name": "liver tumour", "color": [4, 5, 6]}]))
    start = resolve_start(str(DEFAULT_MODEL), recipe, str(tmp_path / "added.json"), Reporter("quiet"))
    assert start.head_channels == [0, 6, None] and not start.keep_head
    assert [label.name for label in start.kept_labels()] == ["Liver"]
    network = build_network(start.network)
    fresh = {k: v.clone() for k, v in network.state_dict().items()}
    assert transfer_weights(network, start.weights, start.head_channels)["new"] == []
    init = load_file(str(DEFAULT_MODEL))
    for name in ("head.weight", "head.bias"):
        rows = network.state_dict()[name]
        assert torch.equal(rows[0], init[name][0].float()) and torch.equal(rows[1], init[name][6].float())
        assert torch.equal(rows[2], fresh[name][2])
    assert head_summary(start, []) == ("of the output layer, the channels of background, Liver kept (labels of the "
                                        "init model), of liver tumour new; its other labels left out")
    # Renamed, a structure is known by its terminology codes: "Hepar" with the liver's codes is the liver, "kidney"
    # with the left kidney's is that one; codes of no label, or a channel a label of its name takes, start anew.
    codes = {label.name: label.terminology for label in read_metadata(DEFAULT_MODEL).labels}
    renamed = [("Hepar", codes["liver"]), ("kidney", codes["left kidney"]), ("Leber", codes["liver"]),
               ("liver", {}), ("lesion", {**codes["liver"], "type": ["SCT", "52988006", "Lesion"]})]
    (tmp_path / "renamed.json").write_text(json.dumps([{"value": value, "name": name, "color": [1, 2, 3],
                                                         **({"terminology": entry} if entry else {})}
                                                        for value, (name, entry) in enumerate(renamed, start=1)]))
    start = resolve_start(str(DEFAULT_MODEL), recipe, str(tmp_path / "renamed.json"), Reporter("quiet"))
    assert start.head_channels == [0, None, 3, None, 6, None]
    assert head_summary(start, []) == ("of the output layer, the channels of background, kidney (its left kidney), "
                                        "liver kept (labels of the init model), of Hepar, Leber, lesion new; its other "
                                        "labels left out")
    (tmp_path / "hepar.json").write_text(json.dumps([{"value": 1, "name": "Hepar", "color": [1, 2, 3],
                                                      "terminology": codes["liver"]}]))
    assert resolve_start(str(DEFAULT_MODEL), recipe, str(tmp_path / "hepar.json"),
                         Reporter("quiet")).head_channels == [0, 6]
    # All its labels in another order: every channel kept, none left out.
    (tmp_path / "reordered.json").write_text(json.dumps([{**label.to_dict(), "value": value} for value, label in
                                                         enumerate(start.init_labels[::-1], start=1)]))
    start = resolve_start(str(DEFAULT_MODEL), recipe, str(tmp_path / "reordered.json"), Reporter("quiet"))
    assert start.head_channels == [0, *range(13, 0, -1)] and not start.keep_head
    assert head_summary(start, []).endswith("spleen kept (labels of the init model)")
    (tmp_path / "fewer.json").write_text(json.dumps([{"value": 1, "name": "liver", "color": [1, 2, 3]}]))
    start = resolve_start(str(DEFAULT_MODEL), recipe, str(tmp_path / "fewer.json"), Reporter("quiet"))
    assert start.head_channels == [0, 6] and not start.keep_head
    assert head_summary(start, []) == ("of the output layer, the channels of background, liver kept (labels of the "
                                        "init model); its other labels left out")


def _short_run(folders, output, *extra) -> list[str]:
    """The arguments of the interrupted runs' fine-tuning (the short recipe)."""
    return ["finetune", "--init", "scratch", "--data", str(folders["train"]), "--val", str(folders["val"]), "--recipe",
            str(folders["short"]), "--cache", str(folders["cache"]), "-o", str(output), "--device", "cpu",
            "--progress", "json", *extra]


def _killed_at(folders, output, step: int, *extra) -> tuple[subprocess.Popen, list[dict]]:
    """A run killed without warning (SIGKILL) once it reports fine-tuning step ``step``: the process and the events
    it reported up to the kill."""
    process, before, _ = signalled_run(_short_run(folders, output, *extra), lambda e: e["event"] == "progress" and
                                       e["stage"] == "fine-tune" and e["done"] == step, signal.SIGKILL)
    return process, before


@pytest.fixture(scope="module")
def uninterrupted(folders, tmp_path_factory) -> Path:
    reference = tmp_path_factory.mktemp("uninterrupted") / "reference.safetensors"
    run_cli_here(*_short_run(folders, reference), check_rc=0)
    return reference


def _resume(folders, output) -> subprocess.CompletedProcess:
    return run_cli_here("finetune", "--init", "scratch", "--data", folders["train"], "--val", folders["val"],
                        "--cache", folders["cache"], "-o", output, "--resume", "--device", "cpu", "--progress", "json",
                        check_rc=0)


def _assert_same_run(output: Path, reference: Path) -> None:
    final, expected = runstate.load_resume_state(output, "finetune"), runstate.load_resume_state(reference, "finetune")
    assert final["step"] == expected["step"] == 18
    for name, tensor in expected["network"].items():
        assert torch.equal(final["network"][name], tensor), name
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in expected["history"]]
    assert [{k: v for k, v in h.items() if k != "seconds"} for h in final["history"]] == strip
    assert load_file(str(output)).keys() == load_file(str(reference)).keys()


def test_stop_then_kill_9_then_resume_ends_exactly_like_an_uninterrupted_run(folders, uninterrupted, tmp_path):
    """A stop mid-epoch saves the state where it stopped; the resumed run, killed without warning (no chance to
    save), falls back to its last epoch's state with no file half-written; resumed again, the run ends with exactly
    the weights and history of an uninterrupted one."""
    output = tmp_path / "run.safetensors"
    run_cli_here(*_short_run(folders, output), stdout=StopsAt("fine-tune", 8), check_rc=0)
    stopped = runstate.load_resume_state(output, "finetune")
    assert stopped["step"] == 8  # inside epoch 2 (of 6 steps each)

    process, events = _killed_at(folders, output, 15, "--resume")
    assert any(e["event"] == "message" and f"resuming at step {stopped['step']}" in e["text"] for e in events)
    assert runstate.load_resume_state(output, "finetune")["step"] == 12  # the end of epoch 2
    assert load_file(str(output)).keys()  # the best checkpoint so far is whole
    _resume(folders, output)
    _assert_same_run(output, uninterrupted)


def test_a_run_killed_unwarned_mid_epoch_resumes_from_its_last_periodic_save(folders, uninterrupted, tmp_path):
    """Between epoch ends the state is saved every train.save_minutes (here, after every step): a run killed
    without warning in its second epoch (Slicer closing kills a run that has not stopped within a minute) resumes
    within that epoch, not from its start, and ends exactly like an uninterrupted run."""
    frequent = tmp_path / "frequent saves.json"
    short = json.loads(folders["short"].read_text(encoding="utf-8"))
    frequent.write_text(json.dumps({**short, "train": {**short["train"], "save_minutes": 1e-6}}), encoding="utf-8")
    output = tmp_path / "run.safetensors"
    process, _ = _killed_at(folders, output, 9, "--recipe", frequent)
    assert process.returncode == -signal.SIGKILL
    assert runstate.load_resume_state(output, "finetune")["step"] >= 8  # epoch 2 is steps 7-12
    _resume(folders, output)
    _assert_same_run(output, uninterrupted)


@pytest.mark.parametrize("stop_at, drawing_due_on_the_way", [(8, False), (6, True)])
def test_a_stop_draws_the_curve_of_the_epochs_not_drawn_yet_and_only_those(folders, tmp_path, monkeypatch, stop_at,
                                                                           drawing_due_on_the_way):
    """Stopped in its second epoch, the first not drawn (no drawing due on the way), the curve shows it; stopped
    at the end of the first, drawn there (the first drawing is always due), it is not drawn again."""
    from hybridmim.training.schedule import Interval

    if not drawing_due_on_the_way:
        monkeypatch.setattr(Interval, "due", lambda self, final: final)  # the state too: saved at epoch ends
    drawn = record_curve_drawings(monkeypatch)
    output = tmp_path / "run.safetensors"
    reporter = Reporter("json", StopsAt("fine-tune", stop_at))
    outputs = run_finetune("scratch", [str(folders["train"])], str(output), reporter, val_paths=[str(folders["val"])],
                           recipe_file=str(folders["short"]), cache=str(folders["cache"]), device="cpu")
    assert outputs["stopped"] and outputs["step"] == stop_at and outputs["curve"] == str(curve_path(output))
    assert drawn == [6]


@pytest.mark.parametrize("validation, step, history, pending", [(1, 0, [], None), (2, 12, [0, 1], 2)])
def test_a_stop_during_a_validation_ends_it_and_the_resume_validates_first(folders, uninterrupted, tmp_path,
                                                                            validation, step, history, pending):
    """A stop ends a validation before its next case (on a CPU it takes minutes, and Slicer closing waits one):
    the first, of the model the run starts from, leaves a state at step 0 with no history; a later one, at its
    epoch's end (here epoch 2 of 6-step epochs, epoch 1 not validated), that epoch's entry pending and no model yet.
    No model or curve is written then. The resumed run validates first and ends exactly like an uninterrupted one."""
    output = tmp_path / "run.safetensors"
    stopped = run_cli_here(*_short_run(folders, output), stdout=StopsAt("validate", None, validation), check_rc=0)
    events = [e for e in map(parse_event, stopped.stdout.splitlines()) if e]
    outputs = events[-1]["outputs"]
    assert events[-1]["event"] == "done" and outputs["stopped"] and outputs["step"] == step
    assert outputs["checkpoint"] is None and outputs["best_dice"] is None and not output.exists()
    assert len([e for e in events if "dice" in e]) == validation - 1  # the stopped validation reports nothing
    state = runstate.load_resume_state(output, "finetune")
    assert state["step"] == step and [h["epoch"] for h in state["history"]] == history
    assert (state["pending"] or {}).get("epoch") == pending
    if pending:
        assert "stopped during the validation of epoch 2 (step 12 of 18)" in json.dumps(events)
        assert outputs["curve"] == str(curve_path(output))  # epoch 1, which has a loss
    else:
        assert outputs["curve"] is None and not curve_path(output).exists()
    resumed = [e for e in map(parse_event, _resume(folders, output).stdout.splitlines()) if e]
    stages = [e["name"] for e in resumed if e["event"] == "stage"]
    assert stages[stages.index("validate"):stages.index("fine-tune") + 1] == ["validate", "fine-tune"], stages
    _assert_same_run(output, uninterrupted)


def test_stop_while_preparing_the_data_ends_at_once_with_nothing_to_resume(folders, tmp_path):
    """Stop before the first step: exit 0 with a done event that says so (not killed by the signal), no model
    or state written, and the cases prepared before the stop stay cached, whole (written atomically)."""
    output, cache = tmp_path / "run.safetensors", tmp_path / "cache"  # an empty cache: every case is prepared
    returncode, outputs, stderr = stop_while_preparing(
        "finetune", "--init", "scratch", "--data", folders["train"], "--val", folders["val"], "--recipe",
        folders["short"], "--cache", cache, "-o", output, "--device", "cpu")
    assert returncode == 0, stderr
    assert outputs["stopped"] and outputs["before_training"] and outputs["resume_state"] is None
    assert not output.exists() and not runstate.state_path(output).exists()
    cached = sorted(p.name for p in cache.iterdir())
    assert 1 <= sum(n.endswith(".npz") for n in cached) < 6 and not any("partial" in n for n in cached), cached


def test_a_time_limit_keeps_the_epochs_that_fit_and_a_resumed_run_keeps_them_too(folders, tmp_path):
    # 300 epochs of 3 steps: far more than a quarter of a minute (0.4 s an epoch on 2 cores; 30 had all fit)
    recipe = tmp_path / "long.json"
    recipe.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 300, "steps_per_epoch": 3}}))
    output, stream = tmp_path / "timed.safetensors", io.StringIO()
    run_finetune("scratch", [str(folders["train"])], str(output), Reporter("json", stream),
                 val_paths=[str(folders["val"])], recipe_file=str(recipe), cache=str(folders["cache"]), device="cpu",
                 max_minutes=0.25)
    messages = [e["text"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "message"]
    sized = [re.fullmatch(r"the first epoch took ([0-9.]+) s: ([0-9]+) of 300 epochs fit in 0.25 minutes", m)
             for m in messages]
    assert sum(map(bool, sized)) == 1, messages
    seconds, epochs = next((float(m[1]), int(m[2])) for m in sized if m)
    assert 15 // (seconds + 0.05) <= epochs <= 15 // (seconds - 0.05) and 1 <= epochs < 300
    final = runstate.load_resume_state(output, "finetune")
    assert final["step"] == 3 * epochs and final["epochs"] == epochs
    assert [h["epoch"] for h in final["history"]] == list(range(epochs + 1))
    assert final["history"][-1]["lr"] == 0.0  # the cosine ended on the new last step
    assert final["elapsed"] < 30

    # Resumed, the finished run stays finished: its 300-epoch recipe does not come back.
    resumed = run_finetune("scratch", [str(folders["train"])], str(output), Reporter("quiet"),
                           val_paths=[str(folders["val"])], cache=str(folders["cache"]), device="cpu", resume=True)
    assert resumed["step"] == resumed["steps"] == 3 * epochs
    # Resumed on other cases, it goes on with them, and says how they differ from the run's.
    stream = io.StringIO()
    run_finetune("scratch", [str(folders["train"])], str(output), Reporter("json", stream), val_paths=[
        str(folders["train"] / "STS_001")], cache=str(folders["cache"]), device="cpu", resume=True, exclude=["STS_002"])
    events = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    warnings = [e["text"] for e in events if e.get("level") == "warning"]
    assert warnings == ["validation cases that are training cases too (the same files): STS_001; their Dice flatters "
                        "the model, which has learnt them",
                        "the cases differ from those the run stopped with (training cases gone: STS_002; validation "
                        "cases added: STS_001; validation cases gone: STS_036, STS_037): it goes on with these, so it "
                        "will not end as the uninterrupted run would have"]


@pytest.mark.parametrize("minutes", [0.15, 0.001])
def test_a_time_limit_shorter_than_the_first_epoch_ends_that_epoch_at_the_steps_that_fit(folders, tmp_path, minutes):
    """200 steps an epoch: timed over the steps after the first, the epoch is cut to the steps that fit with its
    validation, the run's only epoch, validated and written, within the limit; one too short for a second step
    ends the epoch at the first."""
    recipe = tmp_path / "long.json"
    recipe.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 30, "steps_per_epoch": 200}}))
    output, stream = tmp_path / "short.safetensors", io.StringIO()
    short = run_finetune("scratch", [str(folders["train"])], str(output), Reporter("json", stream),
                         val_paths=[str(folders["val"])], recipe_file=str(recipe), cache=str(folders["cache"]),
                         device="cpu", max_minutes=minutes)
    messages = [e["text"] for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "message"]
    cut = [re.fullmatch(rf"([0-9.]+) s a step: the first epoch's 200 steps and its validation would pass the "
                        rf"{minutes:g} minutes; it ends at step ([0-9]+), the run's only epoch", m) for m in messages]
    assert sum(map(bool, cut)) == 1, messages
    steps = int(next(m for m in cut if m)[2])
    assert short["step"] == short["steps"] == steps and short["checkpoint"] and short["best_epoch"] == 1
    assert (steps > 1 + finetune.PACE_STEPS) if minutes == 0.15 else steps == 1
    final = runstate.load_resume_state(output, "finetune")
    assert [h["epoch"] for h in final["history"]] == [0, 1]
    # The rate after the cut is the fitted schedule's: the cosine's end; for a one-step run, all warm-up, the full
    # rate (the replaced schedule's warm-up would have given 2 of its 5 steps' share, 0.4 of it)
    assert final["history"][-1]["lr"] == (0.0 if minutes == 0.15 else TINY["train"]["lr"])
    assert final["recipe"]["train"] | {"epochs": 1, "steps_per_epoch": steps, "max_minutes": None} == final[
        "recipe"]["train"] and final["recipe"]["train"]["warmup_steps"] == 1  # 5 of 6000 steps, in proportion
    if minutes == 0.15:
        assert final["elapsed"] < 9 * 1.5  # the limit, give or take a step's or a validation's wobble


def test_a_time_limit_is_judged_from_the_steps_after_the_first():
    """Hand-timed steps: the first (warm-up) is not the pace; the epoch is cut once PACE_STEPS are timed, or at
    once where the next step would pass the limit; an epoch that fits is timed whole and the epochs fitted."""
    def fit(limit_minutes, step_ends, steps_per_epoch=50):
        schedule = FinetuneSchedule(epochs=10, steps_per_epoch=steps_per_epoch, warmup_steps=100,
                                    max_minutes=limit_minutes)
        recipe, run, pace = {"train": {}}, {"epochs": 10, "validation_seconds": 30.0}, StepPace(step_ends[0])
        for step in range(1, len(step_ends)):
            run["step"] = step
            pace.step_ended(step_ends[step])
            fitted = finetune._fit_to_time_limit(recipe, schedule, run, step_ends[step], pace, Reporter("quiet"))
            if fitted is not recipe:
                return step, fitted["train"], (schedule.epochs, schedule.steps_per_epoch, schedule.max_minutes)
        return None

    # Training began at 30 s (the validation before it); a first step of 90 s, then 78 s each, 10 minutes in all:
    # at step 4, 216 s are left once the epoch's validation is kept aside: two steps more.
    assert fit(10, [30, 120, 198, 276, 354, 432]) == (4, {"epochs": 1, "steps_per_epoch": 6, "warmup_steps": 1,
                                                          "max_minutes": None}, (1, 6, None))
    # 3 minutes: after the first step 30 s are left, less than one more: the epoch ends there.
    assert fit(3, [30, 120, 198])[:2] == (1, {"epochs": 1, "steps_per_epoch": 1, "warmup_steps": 1,
                                              "max_minutes": None})
    # A slow first step (a GPU's autotuning), then fast ones: the epoch fits; at its end (33 s spent) the epochs that
    # fit in 2 minutes: 3 of 10, the warm-up 100 of 50 steps scaled to 30.
    assert fit(2, [30, 32, 32.25, 32.5, 32.75, 33.0], steps_per_epoch=5) == (
        5, {"epochs": 3, "steps_per_epoch": 5, "warmup_steps": 30, "max_minutes": None}, (3, 5, None))


def test_a_resume_state_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    payload = _RunsCode()
    payload.marker = marker
    output = tmp_path / "m.safetensors"
    torch.save({"format": runstate.STATE_FORMAT, "kind": "finetune", "extra": payload}, runstate.state_path(output))
    with pytest.raises(UserError, match="refused: it holds more than tensors .*GLOBAL posix.system"):
        runstate.load_resume_state(output, "finetune")
    assert not marker.exists()


def test_validation_split_is_seeded_and_disjoint():
    cases = [f"case{i}" for i in range(10)]
    train, val = split_cases(cases, 0.2, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and sorted(train + val) == sorted(cases)
    assert split_cases(cases, 0.2, seed=0) == (train, val)
    assert split_cases(["only"], 0.5, seed=0) == (["only"], [])


def test_with_memory_for_one_crop_the_cpu_takes_the_crops_one_at_a_time_and_with_none_refuses(folders, tmp_path,
                                                                                             monkeypatch, refused):
    """The memory free is set (the machine's own would fit all): room for 1.5 of the step's 2 crops, then for none;
    then a GPU's out-of-memory error on every group (injected) halves it to one crop, then refuses."""
    import hybridmim.memory
    from hybridmim.training import cropgroups

    per_crop = cropgroups.crop_bytes(TINY["scratch"]["network"], TINY["train"]["window"])
    weights = sum(p.numel() for p in build_network({**TINY["scratch"]["network"], "in_channels": 1,
                                                    "out_channels": 2}).parameters())
    fixed = cropgroups.RESERVE_BYTES + cropgroups.BYTES_PER_PARAMETER * weights
    monkeypatch.setattr(hybridmim.memory, "available_bytes", lambda: fixed + int(1.5 * per_crop))
    groups, passes = [], cropgroups.forward_backward
    monkeypatch.setattr(cropgroups, "forward_backward", lambda *args, **kwargs: (groups.append(args[4]),
                                                                                 passes(*args, **kwargs))[1])
    recipe = tmp_path / "one-epoch.json"
    recipe.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 1, "steps_per_epoch": 4}}))
    output = tmp_path / "m.safetensors"
    result = run_cli_here("finetune", "--init", "scratch", "--data", folders["train"], "--val", folders["val"],
                          "--recipe", recipe, "--cache", folders["cache"], "-o", output, "--device", "cpu",
                          "--progress", "json", check_rc=0)
    needed, free = fixed + 2 * per_crop, fixed + int(1.5 * per_crop)
    assert warnings_of(result) == [f"the 2 crops of a step would need about {needed / GIB:.1f} GiB of memory and "
                                   f"{free / GIB:.1f} GiB is available: they go through the network 1 at a time (the "
                                   "Dice part of the loss taken over those)"]
    assert groups == [1] * 4 and output.exists()
    assert all(np.isfinite(h["loss"]) for h in runstate.load_resume_state(output, "finetune")["history"][1:])

    monkeypatch.setattr(hybridmim.memory, "available_bytes", lambda: fixed + per_crop // 2)
    refused("finetune", "--init", "scratch", "--data", folders["train"], "--recipe", recipe, "--cache",
            folders["cache"], "-o", tmp_path / "none.safetensors", "--device", "cpu", "--progress", "json",
            message="a training crop of 32×32×32 voxels needs about")
    assert not list(tmp_path.glob("none*"))  # neither model nor resume state

    def out_of_gpu_memory(*args, **kwargs):  # fault injection: no GPU here; halved down to one crop, then refused
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(hybridmim.memory, "available_bytes", lambda: None)
    monkeypatch.setattr(cropgroups, "forward_backward", out_of_gpu_memory)
    refused("finetune", "--init", "scratch", "--data", folders["train"], "--recipe", recipe, "--cache",
            folders["cache"], "-o", tmp_path / "none.safetensors", "--device", "cpu", "--progress", "json",
            message="out of GPU memory with one training crop of 32×32×32 voxels: train on the CPU (--device cpu) "
                    "or on smaller crops (train.window in a recipe)")
    assert not list(tmp_path.glob("none*"))


def test_bad_requests_are_refused_with_one_line(folders, tmp_path, refused):
    refused = functools.partial(refused, "finetune")
    out = tmp_path / "m.safetensors"
    refused("--init", "scratch", "--data", folders["train"], "-o", out,
            message="name the structures to segment with --labels FILE (a JSON list of value, name, colour and "
                    "terminology; see scripts/labels/), or give every case as a Slicer segmentation (label.seg.nrrd), "
                    "whose segments name them")
    refused("--init", "scratch", "--data", folders["train"], "--val", folders["val"], "--val-fraction", "0.2",
            "--recipe", folders["recipe"], "-o", out, message="either --val or --val-fraction")
    unlabelled = tmp_path / "unlabelled"
    (unlabelled / "case").mkdir(parents=True)
    (unlabelled / "case" / "image.nii.gz").symlink_to(data_file("sarcoma_ct/STS_005/image.nii.gz"))
    refused("--init", "scratch", "--data", unlabelled, "--recipe", folders["recipe"], "-o", out,
            message="no label map for case")
    refused("--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"], "-o", tmp_path / "m.pt",
            message="a checkpoint is a .safetensors file")
    refused("--init", "no-such-model", "--data", folders["train"], "--recipe", folders["recipe"], "-o", out,
            message="no-such-model")
    refused("--init", "scratch", "--data", folders["train"], "-o", out, "--resume", message="nothing to resume")
    for window, message in (([32, 32], "recipe 'train.window' must be three whole numbers of voxels, got [32, 32]"),
                            ([30, 32, 32], "training crops of 30×32×32 voxels: the unet network takes at least 16 a "
                                           "side, in multiples of 8 (train.window in a recipe)"),
                            ([8, 32, 32], "training crops of 8×32×32 voxels: the unet network takes at least 16")):
        (tmp_path / "window.json").write_text(json.dumps({**TINY, "train": {**TINY["train"], "window": window}}))
        refused("--init", "scratch", "--data", folders["train"], "--recipe", tmp_path / "window.json", "-o", out,
                message=message)
    # what the network takes, not a fixed multiple: 24 and 40 for a U-Net whose bottleneck is 8 voxels a cell (the
    # run goes on to read the cases, where these have no label map)
    (tmp_path / "window.json").write_text(json.dumps({**TINY, "train": {**TINY["train"], "window": [24, 40, 16]}}))
    refused("--init", "scratch", "--data", unlabelled, "--recipe", tmp_path / "window.json", "-o", out,
            message="no label map for case")
    refused("--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"], "-o", out,
            "--max-minutes", "0", message="the time limit must be a positive number of minutes, got 0.0")
    refused("--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"], "-o", out,
            "--epochs", "0", message="recipe 'train.epochs' must be ≥ 1, got 0")
    hand_written = {  # a recipe's values of the wrong kind, or out of range: refused before any case is prepared
        "text for a number": ({"train": {**TINY["train"], "steps_per_epoch": "10"}},
                              "recipe 'train.steps_per_epoch' must be a whole number, got \"10\""),
        "an overlap of 1.5 (a window a voxel apart)": (
            {"scratch": {**TINY["scratch"], "overlap": 1.5}},
            "recipe 'scratch': bad inference settings (roi_size [48, 48, 48], overlap 1.5): give a window of three "
            "whole numbers ≥ 1 and an overlap in [0, 1)"),
        "features as text": ({"scratch": {**TINY["scratch"], "network": {"name": "unet", "features": "big"}}},
                             "network 'unet': bad settings {\"features\": \"big\", \"dropout\": 0.1, "
                             "\"in_channels\": 1, \"out_channels\": 2} (invalid literal for int() with base 10: "
                             "'b')"),
        # each of these had been a traceback, or was taken without a word (a list for the train block dropped the
        # defaults'; a misspelt block was ignored; a share of 2 or a negative warm-up went into training)
        "a list for an object": ({"train": []}, "recipe 'train' must be an object, got []"),
        "a misspelt block": ({"trian": TINY["train"]}, "recipe: unknown settings ['trian']"),
        "channels as text": ({"scratch": {**TINY["scratch"], "channels": "CT"}},
                             "recipe 'scratch.channels' must be a list, got \"CT\""),
        "no channels": ({"scratch": {**TINY["scratch"], "channels": []}},
                        "recipe 'scratch': 'channels' must list the input channels with their names (and modalities, "
                        "such as CT or MR)"),
        "a number for a modality": ({"scratch": {**TINY["scratch"], "channels": [{"name": "CT", "modality": 5}]}},
                                    "recipe 'scratch': 'channels' must list the input channels with their names"),
        "a word for the spacing": ({"scratch": {**TINY["scratch"], "preprocessing": {"spacing": "fine"}}},
                                   "pre-processing 'spacing' must be 3 numbers, got \"fine\""),
        "a word for the body crop": ({"scratch": {**TINY["scratch"], "preprocessing": {"foreground": "yes"}}},
                                     "pre-processing 'foreground' must be an object, got \"yes\""),
        "a share of 2": ({"train": {**TINY["train"], "labelled_fraction": 2}},
                         "recipe 'train.labelled_fraction' must be in [0, 1], got 2"),
        "every case validating": ({"train": {**TINY["train"], "val_fraction": 1.0}},
                                  "recipe 'train.val_fraction' must be in [0, 1), got 1.0"),
        "a negative weight decay": ({"train": {**TINY["train"], "weight_decay": -1}},
                                    "recipe 'train.weight_decay' must be ≥ 0, got -1"),
        "a negative warm-up": ({"train": {**TINY["train"], "warmup_steps": -5}},
                               "recipe 'train.warmup_steps' must be ≥ 0, got -5"),
        "no threads": ({"train": {**TINY["train"], "num_threads": 0}},
                       "recipe 'train.num_threads' must be ≥ 1 or null, got 0"),
        "a learning rate of 0": ({"train": {**TINY["train"], "lr": 0}}, "recipe 'train.lr' must be above 0, got 0"),
    }
    for changes, message in hand_written.values():
        (tmp_path / "hand.json").write_text(json.dumps({**TINY, **changes}))
        refused("--init", "scratch", "--data", folders["train"], "--recipe", tmp_path / "hand.json", "--cache",
                tmp_path / "c", "-o", out, message=message)
    refused("--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"], "--prepare-only",
            message="--prepare-only needs --cache")
    refused("--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"], "--exclude", "STS_099",
            "-o", out, message="--exclude names no case in the data: STS_099")
    (tmp_path / "labels.json").write_text(json.dumps([{"value": 1, "name": "x", "color": [1, 2]}]))
    refused("--init", "scratch", "--data", folders["train"], "--labels", tmp_path / "labels.json", "-o", out,
            message="'color' must be [r, g, b]")
    coarse = tmp_path / "coarse" / "STS_005"
    coarse.mkdir(parents=True)
    (coarse / "image.nii.gz").symlink_to(data_file("sarcoma_ct/STS_005/image.nii.gz"))
    label = sitk.ReadImage(str(data_file("sarcoma_ct/STS_005/label.nii.gz")))
    sitk.WriteImage(label[::2, ::2, :], str(coarse / "label.nii.gz"))
    refused("--init", "scratch", "--data", coarse.parent, "--recipe", folders["recipe"], "--cache", tmp_path / "c",
            "-o", out, message="case STS_005: the label map's grid (size, spacing, origin or direction) differs")
    assert not out.exists() and not (tmp_path / "c").exists()
    with pytest.raises(UserError, match="resume state of a pretrain run"):
        state = runstate.state_path(tmp_path / "p.safetensors")
        torch.save({"format": runstate.STATE_FORMAT, "kind": "pretrain"}, state)
        runstate.load_resume_state(tmp_path / "p.safetensors", "finetune")


def test_prepare_only_writes_a_folder_that_trains_on_a_subset(folders, tmp_path):
    from hybridmim.preprocessing import Preprocessing
    from hybridmim.volumes import load_prepared

    cache = tmp_path / "prepared"
    run_cli_here("finetune", "--init", "scratch", "--data", folders["train"], "--recipe", folders["recipe"],
                 "--cache", cache, "--prepare-only", check_rc=0)
    index = json.loads((cache / "prepared.json").read_text())
    assert [v["name"] for v in index["volumes"]] == ["STS_001", "STS_002", "STS_003", "STS_004"]
    assert index["classes"] == {"1": 1}
    recipe = load_recipe(str(folders["recipe"]))
    preprocessing = Preprocessing.from_dict(recipe["scratch"]["preprocessing"])
    subset = load_prepared(cache, preprocessing, Reporter("quiet"), SARCOMA, exclude=["STS_002", "STS_004"])
    assert [v.name for v in subset.volumes] == ["STS_001", "STS_003"]
    assert all(v.label is not None and v.label.max() == 1 for v in subset.volumes)

    # Train on that subset, validating every second epoch (and the last).
    recipe = tmp_path / "every2.json"
    recipe.write_text(json.dumps({**TINY, "train": {**TINY["train"], "epochs": 3, "steps_per_epoch": 2,
                                                    "validate_every": 2}}))
    stream = io.StringIO()
    outputs = run_finetune("scratch", [str(cache)], str(tmp_path / "subset.safetensors"), Reporter("json", stream),
                           val_paths=[str(folders["val"])], recipe_file=str(recipe), cache=str(folders["cache"]),
                           device="cpu", exclude=["STS_002", "STS_004"])
    metrics = [e for e in map(parse_event, stream.getvalue().splitlines()) if e and e["event"] == "metric"]
    assert [(m["epoch"], "dice" in m) for m in metrics] == [(0, True), (1, False), (2, True), (3, True)]
    meta = read_metadata(tmp_path / "subset.safetensors")
    assert sorted(d["name"] for d in meta.provenance["train_data"]) == ["STS_001", "STS_003"]
    assert outputs["best_epoch"] in (2, 3)


def test_cases_unlike_the_models_modality_are_prepared_with_a_warning(folders, tmp_path):
    """A CT model fine-tuned on an MR case (here a z-scored FLAIR) says so; its CT cases do not."""
    from conftest import warnings_of

    mr = tmp_path / "cases" / "pat0003"
    mr.mkdir(parents=True)
    brain = data_file("brain_tumor_mr/brats_2013_pat0003_1")
    (mr / "image.nii.gz").symlink_to(brain / "Flair_subtrMeanDivStd.nii.gz")
    (mr / "label.nii.gz").symlink_to(brain / "OTMultiClass.nii.gz")
    (tmp_path / "cases" / "STS_001").symlink_to(folders["train"] / "STS_001")
    result = run_cli_here("finetune", "--init", "scratch", "--data", tmp_path / "cases", "--recipe", folders["recipe"],
                          "--cache", tmp_path / "prepared", "--prepare-only", "--progress", "json", check_rc=0)
    unlike = [w for w in warnings_of(result) if "unlike a CT" in w]
    assert len(unlike) == 1 and unlike[0].startswith("pat0003: image.nii.gz:"), warnings_of(result)


def test_cases_of_another_channel_count_than_the_models_are_refused_before_they_are_read(folders, tmp_path, refused):
    """A case of two images given to a model of one channel: refused before anything is prepared, as training or as
    validation data (a validation case of two channels had ended the run with torch's traceback at its first
    validation); a prepared folder of such cases, given as data, is refused too."""
    two = tmp_path / "two channels" / "STS_036"
    two.mkdir(parents=True)
    for index in (0, 1):
        (two / f"image_000{index}.nii.gz").symlink_to(folders["val"] / "STS_036" / "image.nii.gz")
    (two / "label.nii.gz").symlink_to(folders["val"] / "STS_036" / "label.nii.gz")
    message = ("STS_036: 2 image(s) (image_0000.nii.gz, image_0001.nii.gz) where the model takes 1 channel(s) (CT); a "
               "recipe's channels make a new model's (as in scripts/recipes/finetune-brain-tumor-mr.json)")
    output = tmp_path / "m.safetensors"
    refused("finetune", "--init", "scratch", "--data", two.parent, "--recipe", folders["recipe"], "--cache",
            tmp_path / "never", "-o", output, "--progress", "quiet", message=message)
    assert not (tmp_path / "never").exists()
    one = tmp_path / "one case"
    one.mkdir()
    (one / "STS_036").symlink_to(folders["val"] / "STS_036")
    refused("finetune", "--init", "scratch", "--data", one, "--val", two.parent, "--recipe", folders["recipe"],
            "--cache", tmp_path / "cache", "-o", output, "--progress", "quiet", message=message)
    assert not output.exists()

    recipe = tmp_path / "two.json"
    recipe.write_text(json.dumps({**TINY, "scratch": {**TINY["scratch"], "channels": [
        {"name": "CT", "modality": "CT"}, {"name": "CT again", "modality": "CT"}]}}), encoding="utf-8")
    run_cli_here("finetune", "--init", "scratch", "--data", two.parent, "--recipe", recipe, "--cache",
                 tmp_path / "prepared", "--prepare-only", "--progress", "quiet", check_rc=0)
    refused("finetune", "--init", "scratch", "--data", one, "--val", tmp_path / "prepared", "--recipe",
            folders["recipe"], "--cache", tmp_path / "cache", "-o", output, "--progress", "quiet",
            message="the model takes 1 channel(s); the validation data have 2")
    assert not output.exists()


def test_a_float_label_map_with_nan_background_trains_like_its_whole_number_twin(folders, tmp_path, refused):
    """NaN in a float label map is "no label": background, with a warning (ITK had made it 0 in NIfTI files without
    a word); a label map with fractions (resampled with linear interpolation) is refused with one line."""
    from conftest import warnings_of
    from hybridmim.preprocessing import Preprocessing
    from hybridmim.volumes import load_prepared

    source = folders["train"] / "STS_001"
    label = sitk.ReadImage(str(source / "label.nii.gz"))
    values = sitk.GetArrayFromImage(label).astype("float32")
    prepared = {}
    for variant in ("as given", "float, NaN background", "fractions"):
        case = tmp_path / variant / "STS_001"
        case.mkdir(parents=True)
        (case / "image.nii.gz").symlink_to(source / "image.nii.gz")
        if variant == "as given":
            (case / "label.nii.gz").symlink_to(source / "label.nii.gz")
            written = values
        else:
            written = values.copy()
            written[values == 0] = float("nan") if variant.startswith("float") else 0.0
            written[values == 1] = 1.0 if variant.startswith("float") else 0.5
            float_label = sitk.GetImageFromArray(written)
            float_label.CopyInformation(label)
            sitk.WriteImage(float_label, str(case / "label.nii.gz"))
        command = ("finetune", "--init", "scratch", "--data", case.parent, "--recipe", folders["recipe"],
                   "--cache", tmp_path / f"prepared {variant}", "--prepare-only", "--progress", "json")
        if variant == "fractions":
            refused(*command, message=f"STS_001: label.nii.gz: {int((values == 1).sum())} voxels hold fractions "
                                      "(such as 0.5), not label values: resampled with linear interpolation?")
            continue
        said = [w for w in warnings_of(run_cli_here(*command, check_rc=0)) if "label.nii.gz" in w]
        assert said == ([] if variant == "as given" else
                        [f"STS_001: label.nii.gz: {int((values == 0).sum())} voxels are NaN or infinite; they are "
                         "taken as background (0)"])
        preprocessing = Preprocessing.from_dict(load_recipe(str(folders["recipe"]))["scratch"]["preprocessing"])
        prepared[variant] = load_prepared(tmp_path / f"prepared {variant}", preprocessing, Reporter("quiet"),
                                          SARCOMA).volumes[0].label
    assert prepared["as given"].max() == 1
    np.testing.assert_array_equal(prepared["float, NaN background"], prepared["as given"])


def test_a_slicer_segmentation_in_a_case_folder_is_read_by_its_segments_names_and_codes(folders, tmp_path):
    """label.seg.nrrd as Slicer saves a corrected case (cut to the box its segments fill, an overlapping segment in
    a layer of its own, label values that only number a layer's segments) prepares exactly like the label map:
    the tumour segment is found by its terminology, another segment is named as no label; with labels that name
    the tumour otherwise (no codes, another name), no segment is a label and the case is refused before any is
    prepared."""
    from conftest import warnings_of, write_slicer_segmentation
    from hybridmim.preprocessing import Preprocessing
    from hybridmim.volumes import load_prepared

    source = folders["train"] / "STS_001"
    label = sitk.ReadImage(str(source / "label.nii.gz"))
    z, y, x = np.nonzero(sitk.GetArrayViewFromImage(label))
    box = label[int(x.min()) - 3:int(x.max()) + 4, int(y.min()) - 3:int(y.max()) + 4, int(z.min()):int(z.max()) + 1]
    tumour = sitk.GetArrayFromImage(box) == 1
    first_slice = np.zeros_like(tumour)
    first_slice[0] = True  # overlaps the tumour: a layer of its own
    sarcoma = json.loads((REPO / "scripts" / "labels" / "sarcoma.json").read_text())[0]
    codes_only = {"category": sarcoma["terminology"]["category"], "type": sarcoma["terminology"]["type"]}
    variants = {"label map": None, "segmentation": [
        {"name": "Segment_1", "mask": first_slice, "layer": 0, "value": 1},
        {"name": "Tumour", "mask": tumour, "layer": 1, "value": 1, "terminology": codes_only}]}
    prepared = {}
    for variant, segments in variants.items():
        case = tmp_path / variant / "STS_001"
        case.mkdir(parents=True)
        (case / "image.nii.gz").symlink_to(source / "image.nii.gz")
        if segments is None:
            (case / "label.nii.gz").symlink_to(source / "label.nii.gz")
        else:
            write_slicer_segmentation(case / "label.seg.nrrd", box, segments)
        result = run_cli_here("finetune", "--init", "scratch", "--data", case.parent, "--recipe", folders["recipe"],
                              "--labels", REPO / "scripts" / "labels" / "sarcoma.json", "--cache",
                              tmp_path / "prepared", "--prepare-only", "--progress", "json", check_rc=0)
        assert [w for w in warnings_of(result) if "label" in w] == ([] if segments is None else [
            "STS_001: label.seg.nrrd: segment 'Segment_1' is none of the labels ('soft-tissue sarcoma') by "
            "terminology or name; read as background"])
        preprocessing = Preprocessing.from_dict(load_recipe(str(folders["recipe"]))["scratch"]["preprocessing"])
        prepared[variant] = load_prepared(tmp_path / "prepared", preprocessing, Reporter("quiet"), SARCOMA)
    assert prepared["label map"].volumes[0].label.max() == 1
    np.testing.assert_array_equal(prepared["segmentation"].volumes[0].label, prepared["label map"].volumes[0].label)
    assert prepared["segmentation"].sources[0]["files"] == ["image.nii.gz", "label.seg.nrrd"]

    index = (tmp_path / "prepared" / "prepared.json").read_bytes()
    renamed = run_cli_here("finetune", "--init", "scratch", "--data", tmp_path / "segmentation", "--recipe",
                           folders["recipe"], "--cache", tmp_path / "prepared", "--prepare-only", "--progress", "json",
                           check_rc=2)  # the recipe's label: 'soft-tissue sarcoma', no codes
    assert renamed.stderr.splitlines()[-1] == (
        "error: STS_001: label.seg.nrrd: no segment ('Segment_1', 'Tumour') is one of the labels ('soft-tissue "
        "sarcoma') by name or terminology: name its segments as the labels (in Slicer: double-click a segment's name)")
    assert (tmp_path / "prepared" / "prepared.json").read_bytes() == index


def test_labels_come_from_the_cases_segmentations_when_nothing_else_names_them(folders, tmp_path):
    """From scratch with no labels file, the distinct segment names of the cases' Slicer segmentations are the labels
    (with the segments' colours and codes); a run stopped and resumed keeps them, though a segment is renamed
    meanwhile."""
    from conftest import warnings_of, write_slicer_segmentation

    sarcoma = json.loads((REPO / "scripts" / "labels" / "sarcoma.json").read_text())[0]
    codes = {"category": sarcoma["terminology"]["category"], "type": sarcoma["terminology"]["type"]}

    def write_cases(second_name: str) -> None:
        for number, names in ((1, ["Tumour", second_name]), (2, ["tumour "])):
            case = tmp_path / "data" / f"STS_{number:03d}"
            case.mkdir(parents=True, exist_ok=True)
            source = folders["train"] / case.name
            if not (case / "image.nii.gz").exists():
                (case / "image.nii.gz").symlink_to(source / "image.nii.gz")
            label = sitk.ReadImage(str(source / "label.nii.gz"))
            tumour = sitk.GetArrayFromImage(label) == 1
            around = np.zeros_like(tumour)
            around[int(np.nonzero(tumour)[0].min())] = True  # a slice through the tumour's top: a layer of its own
            masks = [tumour, around]
            write_slicer_segmentation(case / "label.seg.nrrd", label, [
                {"name": name, "mask": masks[layer], "layer": layer, "value": 1, "terminology": codes}
                if layer == 0 else {"name": name, "mask": masks[layer], "layer": layer, "value": 1}
                for layer, name in enumerate(names)])

    write_cases("Oedema")
    recipe = tmp_path / "no labels.json"
    recipe.write_text(json.dumps({**{k: v for k, v in TINY.items() if k != "labels"},
                                  "train": {**TINY["train"], "epochs": 2, "steps_per_epoch": 3}}), encoding="utf-8")
    output = tmp_path / "run.safetensors"
    command = ["finetune", "--init", "scratch", "--data", tmp_path / "data", "--val-fraction", "0", "--recipe", recipe,
               "--cache", tmp_path / "cache", "-o", output, "--device", "cpu", "--progress", "json"]
    stopped = run_cli_here(*command, stdout=StopsAt("fine-tune", 2), check_rc=0)
    events = [e for e in map(parse_event, stopped.stdout.splitlines()) if e]
    assert events[-1]["event"] == "done" and events[-1]["outputs"]["stopped"]
    assert {"event": "message", "level": "info", "text": "labels from the cases' segmentations: Tumour, Oedema"} in [
        {k: e.get(k) for k in ("event", "level", "text")} for e in events]

    write_cases("Swelling")
    resumed = run_cli_here(*command, "--resume", check_rc=0)
    assert "STS_001: label.seg.nrrd: segment 'Swelling' is none of the labels ('Tumour', 'Oedema') by terminology " \
           "or name; read as background" in warnings_of(resumed)
    labels = read_metadata(output).labels
    assert [(label.value, label.name) for label in labels] == [(1, "Tumour"), (2, "Oedema")]
    assert labels[0].terminology == codes and labels[0].color == (128, 128, 128) and not labels[1].terminology

    # Prepared alone (--prepare-only), the cases keep the labels they were read with: a run from the prepared folder
    # that nothing else names labels for takes them; labels that would have read other segments are refused.
    from hybridmim.volumes import load_prepared

    run_cli_here("finetune", "--init", "scratch", "--data", tmp_path / "data", "--recipe", recipe, "--cache",
                 tmp_path / "prepared", "--prepare-only", check_rc=0)
    start = resolve_start("scratch", load_recipe(str(recipe)), None, Reporter("quiet"), [str(tmp_path / "prepared")])
    assert [(label.value, label.name) for label in start.labels] == [(1, "Tumour"), (2, "Swelling")]
    others = parse_labels([{"value": 1, "name": "Swelling", "color": [1, 2, 3]},
                           {"value": 2, "name": "Tumour", "color": [1, 2, 3]}])
    with pytest.raises(UserError, match=r"its Slicer segmentations were read by the names of other labels \(Tumour, "
                                        r"Swelling\); prepare the data again with these"):
        load_prepared(tmp_path / "prepared", start.preprocessing, Reporter("quiet"), others)

    # Labels that no segment of a case is: refused before anything is prepared, naming the case and its segments.
    necrosis = tmp_path / "necrosis.json"
    necrosis.write_text(json.dumps([{"value": 1, "name": "necrosis", "color": [90, 90, 90]}]), encoding="utf-8")
    none = run_cli_here("finetune", "--init", "scratch", "--data", tmp_path / "data", "--recipe", recipe, "--labels",
                        necrosis, "--cache", tmp_path / "necrosis cache", "-o", tmp_path / "none.safetensors",
                        "--progress", "json", check_rc=2)
    assert none.stderr.splitlines()[-1] == (
        "error: STS_001: label.seg.nrrd: no segment ('Tumour', 'Swelling') is one of the labels ('necrosis') by name "
        "or terminology: name its segments as the labels (in Slicer: double-click a segment's name)")
    assert not (tmp_path / "necrosis cache").exists() and not (tmp_path / "none.safetensors").exists()

    # Labels that some segments are: the others are background, said when the case is prepared and again each time
    # it is read back prepared.
    tumour = tmp_path / "tumour.json"
    tumour.write_text(json.dumps([{"value": 1, "name": "Tumour", "color": [90, 90, 90]}]), encoding="utf-8")
    said = warnings_of(run_cli_here("finetune", "--init", "scratch", "--data", tmp_path / "data", "--recipe", recipe,
                                    "--labels", tumour, "--cache", tmp_path / "cache", "--prepare-only", "--progress",
                                    "json", check_rc=0))
    assert said == ["STS_001: label.seg.nrrd: segment 'Swelling' is none of the labels ('Tumour') by terminology or "
                    "name; read as background"]
    from hybridmim.volumes import find_cases, prepare_cases

    start = resolve_start("scratch", load_recipe(str(recipe)), str(tumour), Reporter("quiet"))
    stream, prepared = io.StringIO(), {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")}
    prepare_cases(find_cases([tmp_path / "data"], labelled=True), start.preprocessing, tmp_path / "cache",
                  Reporter("json", stream), start.labels, start.channels)
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").glob("*.npz")} == prepared  # nothing prepared anew
    events = [e for e in map(parse_event, stream.getvalue().splitlines()) if e]
    assert [e["text"] for e in events if e.get("level") == "warning"] == said

    # Segments of the labels that are all empty: the model would learn background alone; refused, saying so.
    empty = tmp_path / "empty" / "STS_001"
    empty.mkdir(parents=True)
    (empty / "image.nii.gz").symlink_to(folders["train"] / "STS_001" / "image.nii.gz")
    label = sitk.ReadImage(str(folders["train"] / "STS_001" / "label.nii.gz"))
    write_slicer_segmentation(empty / "label.seg.nrrd", label, [
        {"name": "tumour", "mask": np.zeros(label.GetSize()[::-1], bool), "layer": 0, "value": 1}])
    nothing = run_cli_here("finetune", "--init", "scratch", "--data", empty.parent, "--recipe", recipe, "--labels",
                           tumour, "--cache", tmp_path / "cache", "-o", tmp_path / "none.safetensors", "--progress",
                           "json", check_rc=2)
    assert nothing.stderr.splitlines()[-1] == (
        "error: no label of the labels file occurs in the training cases' label maps (1 → Tumour): their segments in "
        "the cases' Slicer segmentations are empty")
    # Beside a label map whose values are others, either may be the cause: both are said.
    other = empty.parent / "STS_002"
    other.mkdir()
    (other / "image.nii.gz").symlink_to(folders["train"] / "STS_002" / "image.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(folders["train"] / "STS_002" / "label.nii.gz")) * 2, str(other / "label.nii.gz"))
    both = run_cli_here("finetune", "--init", "scratch", "--data", empty.parent, "--recipe", recipe, "--labels", tumour,
                        "--cache", tmp_path / "cache", "-o", tmp_path / "none.safetensors", "--progress", "json",
                        check_rc=2)
    assert both.stderr.splitlines()[-1] == (
        "error: no label of the labels file occurs in the training cases' label maps (1 → Tumour): give the values "
        "the label maps use or their segments in the cases' Slicer segmentations are empty")


def test_labels_that_occur_in_no_training_case_are_refused_or_named(folders, tmp_path, refused):
    """A labels file whose values are not the label maps' would train a model of background alone: refused before
    training; a label that only some other data would hold is named, and the run goes on."""
    one_case = tmp_path / "cases"
    one_case.mkdir()
    (one_case / "STS_001").symlink_to(folders["train"] / "STS_001")
    wrong = tmp_path / "wrong.json"
    wrong.write_text(json.dumps([{"value": 7, "name": "tumour", "color": [230, 60, 60]}]), encoding="utf-8")
    common = ["--data", one_case, "--recipe", folders["recipe"], "--cache", folders["cache"], "--val-fraction", "0"]
    refused("finetune", "--init", "scratch", *common, "--labels", wrong, "-o", tmp_path / "m.safetensors",
            "--progress", "quiet",
            message="no label of the labels file occurs in the training cases' label maps (7 → tumour): give the "
                    "values the label maps use")
    assert not (tmp_path / "m.safetensors").exists()

    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps([*TINY["labels"], {"value": 2, "name": "necrosis", "color": [90, 90, 90]},
                                 {"value": 5, "name": "oedema", "color": [60, 200, 60], "source_values": [5, 6]}]))
    stream = io.StringIO()
    run_finetune("scratch", [str(one_case)], str(tmp_path / "two.safetensors"), Reporter("json", stream),
                 val_fraction=0.0, labels_file=str(extra), epochs=1, recipe_file=str(folders["recipe"]),
                 cache=str(folders["cache"]), device="cpu")
    warnings = [e["text"] for e in map(parse_event, stream.getvalue().splitlines())
                if e and e["event"] == "message" and e["level"] == "warning"]
    assert "labels in no training case (the model cannot learn them): 2 → necrosis; 5, 6 → oedema" in warnings


def test_a_refined_models_labels_in_no_training_case_are_said_to_be_unlearnt():
    from types import SimpleNamespace

    from hybridmim.training.finetune import _check_labels_occur

    # ct_a's organs, refining the abdominal model (its output layer kept): ct_a has no oesophagus
    start = resolve_start("abdomen-ct-scratch", load_recipe(None), None, Reporter("quiet"))
    organs = sitk.GetArrayFromImage(sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz"))))
    stream = io.StringIO()
    _check_labels_occur(SimpleNamespace(volumes=[SimpleNamespace(label=organs.astype(np.uint8))]), start,
                        Reporter("json", stream))
    assert [e["text"] for e in map(parse_event, stream.getvalue().splitlines()) if e] == [
        "labels in no training case (the model, which segments them, learns that they are absent: it will unlearn "
        "them): 5 → esophagus"]


def test_a_recipe_naming_another_network_takes_that_networks_defaults(tmp_path):
    """A network of another name replaces the default U-Net's block whole (merged, the U-Net's features and dropout
    had been passed to a SwinUNETR and refused as unknown); one of the same name changes only what it names. The
    study's hybrid recipe names its dropout, which it had taken from the U-Net's block."""
    recipe = tmp_path / "swin.json"
    recipe.write_text(json.dumps({"scratch": {"network": {"name": "swinunetr", "feature_size": 12}}}))
    network = load_recipe(str(recipe))["scratch"]["network"]
    assert network == {"name": "swinunetr", "feature_size": 12}
    build_network({**network, "in_channels": 1, "out_channels": 2})
    recipe.write_text(json.dumps({"scratch": {"network": {"name": "unet", "dropout": 0.0}}}))
    assert load_recipe(str(recipe))["scratch"]["network"] == {"name": "unet", "features": [32, 32, 64, 128, 256],
                                                             "dropout": 0.0}
    hybrid = load_recipe(str(REPO / "scripts/recipes/label-efficiency-sarcoma-hybrid.json"))["scratch"]["network"]
    assert hybrid == {"name": "hybrid", "features": [16, 48, 96, 192], "embed_dim": 384, "depth": 4, "num_heads": 6,
                      "dropout": 0.1}


def test_every_script_finetune_recipe_reads_and_the_sarcoma_continuation_keeps_its_output_layer():
    recipes = {path.stem: path for path in sorted((REPO / "scripts/recipes").glob("finetune-*.json"))}
    continued = ["finetune-sarcoma-ct-continue", "finetune-sarcoma-ct-continue-flips"]
    assert {"finetune-sarcoma-ct", "finetune-brain-tumor-mr", *continued} <= set(recipes)
    flips = {name: runstate.read_schedule(FinetuneSchedule, load_recipe(str(path))).flips
             for name, path in recipes.items()}
    assert [name for name, mirrored in flips.items() if mirrored] == continued[1:]  # never where sides matter
    # Trained on from the shipped model (scripts/device_methods.sh): its labels are the model's own, so the
    # whole network, output layer included, carries over.
    for name in continued:
        start = resolve_start("sarcoma-ct", load_recipe(str(recipes[name])), None, Reporter("quiet"))
        assert start.keep_head and [label.name for label in start.labels] == ["soft-tissue sarcoma"]
        network = build_network(start.network)
        assert transfer_weights(network, start.weights, start.head_channels)["new"] == []
        head = [key for key in start.weights if key.startswith(network.head_name + ".")]
        assert head and all(torch.equal(network.state_dict()[key], start.weights[key].float()) for key in head)
