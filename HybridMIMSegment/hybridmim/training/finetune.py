"""``hybridmim finetune``: a segmentation model from a pre-trained checkpoint (or from scratch).

What the run starts from (network, labels, the init checkpoint's weights) is
``training.start``. Per step: crops 1.25 × the window, centred on a labelled voxel or anywhere in
the body at the recipe's ratio, rotated/scaled down to the window and
intensity-augmented (MONAI), DiceCE loss. Per epoch: sliding-window Dice on
every validation case on the model grid; the best epoch is the model (``-o``),
written atomically; no improvement for ``patience`` epochs stops the run. With
``max_minutes`` the first epoch is timed and the run shortened to the epochs
that fit, or, where not even that epoch fits, the epoch to the steps that fit (the
learning-rate schedule then ends on the new last step). The
resume state (``*.resume.pt``) is written every epoch and on SIGTERM/Ctrl-C,
and ``--resume`` continues with the batches the uninterrupted run would have
drawn (training.runstate).
"""

from __future__ import annotations

import functools
import json
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_output
from ..catalog import resources_dir
from ..checkpoint import ModelMeta, save_checkpoint
from ..curves import REDRAW_SECONDS
from ..download import cache_dir
from ..errors import UserError
from ..jsonfile import read_json
from ..progress import Reporter
from ..runfiles import curve_path, state_path
from ..torchfiles import save_torch_file
from ..volumes import PreparedData, find_cases, is_prepared_folder, is_segmentation_file, load_prepared, prepare_cases
from .runstate import (STATE_FORMAT, StoppedBeforeTraining, StopRequest, autocast, cases_record, check_new_run,
                       check_recipe_keys, load_resume_state, optimiser_step, read_schedule,
                       report_stopped_before_training, step_generators, warn_if_cases_changed)
from .schedule import Interval, StepPace, shortened_warmup, warmup_cosine
from .start import Start, head_summary, resolve_start, transfer_weights

CROP_MARGIN = 1.25  # crops this much larger than the window, so rotations bring in no empty corners
PACE_STEPS = 3  # steps timed after the first for a time limit (fewer than pre-training's: a CPU step takes a minute)


@dataclass
class FinetuneSchedule:
    """The recipe's ``train`` block."""

    epochs: int = 100
    steps_per_epoch: int = 50
    volumes_per_step: int = 2
    crops_per_volume: int = 2
    labelled_fraction: float = 0.5  # crops centred on a labelled voxel; the rest anywhere in the body
    val_fraction: float = 0.2
    lr: float = 1e-4
    weight_decay: float = 1e-5
    warmup_steps: int = 100
    patience: int = 20  # epochs without a better validation Dice before stopping; 0: never
    validate_every: int = 1  # epochs between validations (and the last epoch); validation is slow on a CPU
    amp: str = "bf16"
    grad_clip: float | None = 1.0
    organ_contrast: bool = False
    axial_slabs: bool = False  # blank all but a random slab of slices: teaches scans a few centimetres thick
    flips: bool = False  # mirror crops along each axis: for labels without a side (tumours)
    seed: int = 0
    num_threads: int | None = None
    half_precision: bool = True
    window: list | None = None  # training crop [z, y, x] (default: the model's inference window); smaller is
    #                             cheaper per step, and the fully convolutional network still infers on its own
    max_minutes: float | None = None  # time limit: keep the epochs (≤ epochs), or the first epoch's steps, that fit
    save_minutes: float = 10.0  # the resume state is saved at each epoch's end and, within an epoch, this often


    POSITIVE = ("epochs", "steps_per_epoch", "volumes_per_step", "crops_per_volume", "validate_every")
    FRACTIONS = {"labelled_fraction": True, "val_fraction": False}  # in [0, 1], where 1 is allowed, else [0, 1)


# what a fine-tuning recipe holds, and the network a run from scratch builds (Resources/Recipes/finetune.json)
RECIPE_KINDS = {"title": str, "description": str, "labels": str | list | dict, "scratch": dict, "train": dict}
SCRATCH_KINDS = {"network": dict, "channels": list, "preprocessing": dict, "roi_size": list, "overlap": float}


def load_recipe(recipe_file: str | None) -> dict:
    """The packaged fine-tuning defaults with ``recipe_file`` merged over them."""
    from ..pretraining.run import merge_recipes

    default = json.loads((resources_dir() / "Recipes" / "finetune.json").read_text(encoding="utf-8"))
    if not recipe_file:
        return default
    override = read_json(recipe_file, "recipe", an_object=True)
    check_recipe_keys(override, RECIPE_KINDS)
    check_recipe_keys(override.get("scratch", {}), SCRATCH_KINDS, "scratch")
    if isinstance(override.get("labels"), str):  # a labels file named relative to its recipe
        override["labels"] = str(Path(recipe_file).parent / override["labels"])
    return merge_recipes(default, override)


def split_cases(cases: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, validation): a seeded random ``fraction`` of the cases validates (none when under 2 cases)."""
    count = int(round(len(cases) * fraction)) if len(cases) >= 2 else 0
    order = np.random.default_rng(seed).permutation(len(cases))
    chosen = set(order[:count].tolist())
    return [c for i, c in enumerate(cases) if i not in chosen], [c for i, c in enumerate(cases) if i in chosen]


def _load_data(paths, start: Start, cache: Path, reporter: Reporter, exclude=()) -> PreparedData:
    if len(paths) == 1 and is_prepared_folder(paths[0]):
        return load_prepared(Path(paths[0]), start.preprocessing, reporter, start.labels, exclude)
    return prepare_cases(find_cases(paths, exclude, labelled=True), start.preprocessing, cache, reporter, start.labels,
                         start.channels)


def _prepare_only(init: str, data_paths, labels_file, recipe_file, cache, reporter: Reporter) -> dict:
    """Prepare labelled cases into ``cache`` as a run from ``init`` would; the folder can then be --data
    (on a machine without the scans or SimpleITK, for example)."""
    if not cache:
        raise UserError("--prepare-only needs --cache DIR: the folder to prepare into")
    start = resolve_start(init, load_recipe(recipe_file), labels_file, reporter, data_paths)
    data = prepare_cases(find_cases(data_paths, labelled=True), start.preprocessing, Path(cache), reporter,
                         start.labels, start.channels)
    outputs = {"volumes": len(data.volumes), "folder": str(cache)}
    reporter.done(outputs)
    return outputs


def _check_labels_occur(data: PreparedData, start: Start, reporter: Reporter) -> None:
    """Refuse training cases in which no label of the labels file occurs (its values are not the label maps': the
    model would learn background alone), and name the labels that occur in none: a new output layer cannot learn
    them, and the init model's own, kept, is taught that they are absent."""
    occurs = np.zeros(len(start.labels) + 1, dtype=bool)
    for volume in data.volumes:
        occurs |= np.bincount(volume.label.ravel(), minlength=len(occurs))[:len(occurs)] > 0
    missing = [(label, f"{', '.join(map(str, label.sources))} → {label.name}")
               for label, found in zip(start.labels, occurs[1:]) if not found]
    if len(missing) == len(start.labels):
        # a case's label file is its last; a segmentation none of whose segments is a label was refused before
        # preparing (check_case_label), so its labels' segments are empty
        segmentations = [is_segmentation_file(source["files"][-1]) for source in data.sources_of(data.volumes)]
        hint = " or ".join(text for text, where in (("give the values the label maps use", not all(segmentations)),
                                                    ("their segments in the cases' Slicer segmentations are empty",
                                                     any(segmentations))) if where)
        raise UserError(f"no label of the labels file occurs in the training cases' label maps "
                        f"({'; '.join(text for _, text in missing)}): {hint}")
    kept = {label.name for label in start.kept_labels()}
    for unlearnt, outcome in ((True, "the model, which segments them, learns that they are absent: it will unlearn "
                                     "them"), (False, "the model cannot learn them")):
        named = [text for label, text in missing if (label.name in kept) == unlearnt]
        if named:
            reporter.warning(f"labels in no training case ({outcome}): {'; '.join(named)}")


def validate(network, data: PreparedData, start: Start, device, classes: int, stop=None,
             reporter: Reporter | None = None) -> dict | None:
    """Mean Dice per class over the validation cases (cases without the class in either map skipped),
    and their mean, with ``reporter``'s progress per case; None where ``stop`` (a StopRequest) was requested
    before a case: on a CPU a validation takes minutes, and Slicer ends a run that has not stopped within a minute
    of closing."""
    from ..inference import sliding_window
    from ..metrics import dice_per_label

    network.eval()
    per_class: dict[int, list[float]] = {c: [] for c in range(1, classes + 1)}
    for index, volume in enumerate(data.volumes):
        if stop is not None and stop.requested:
            network.train()
            return None
        # Two windows at a time on the CPU too: a training process holds more than that for its steps, and for a
        # network of few channels torch runs one window on its slow convolution path (the tests' 8-channel U-Net:
        # 2.5 s for their two validation cases, 0.5 s two at a time)
        logits = sliding_window(network, data.model_array(volume), start.roi_size, start.overlap, device,
                                Reporter("quiet"), cpu_batch=2)
        prediction = logits[0].argmax(0).cpu().numpy()
        for c, score in dice_per_label(prediction, volume.label, per_class).items():
            if score is not None:
                per_class[c].append(score)
        if reporter is not None:
            reporter.progress(index + 1, len(data.volumes))
    network.train()
    means = {c: float(np.mean(v)) for c, v in per_class.items() if v}
    return {"dice": float(np.mean(list(means.values()))) if means else 0.0, "per_class": means}


def run_finetune(init: str, data_paths: list[str], output: str, reporter: Reporter, val_paths=None,
                 val_fraction: float | None = None, labels_file: str | None = None, epochs: int | None = None,
                 recipe_file: str | None = None, resume: bool = False, overwrite: bool = False,
                 cache: str | None = None, device: str = "auto", prepare_only: bool = False, exclude=(),
                 max_minutes: float | None = None) -> dict:
    if prepare_only:
        if val_paths or resume:
            raise UserError("--prepare-only prepares --data alone (prepare validation cases in a run of their own)")
        return _prepare_only(init, data_paths, labels_file, recipe_file, cache, reporter)
    if output is None:
        raise UserError("give the checkpoint to write with -o (or --prepare-only to prepare the data alone)")
    output_path = Path(output)
    if not output_path.name.endswith(".safetensors"):
        raise UserError(f"{output_path}: a checkpoint is a .safetensors file")
    if val_paths and val_fraction is not None:
        raise UserError("give either --val or --val-fraction, not both")
    state = None
    if resume:
        state = load_resume_state(output_path, "finetune")
        recipe, init, labels_file = state["recipe"], state["init_spec"], state["labels_file"]
    else:
        check_new_run(output_path, overwrite)
        recipe = load_recipe(recipe_file)
        if epochs is not None:
            recipe["train"] = {**recipe.get("train", {}), "epochs": int(epochs)}
        if max_minutes is not None:
            recipe["train"] = {**recipe.get("train", {}), "max_minutes": float(max_minutes)}
        if val_fraction is not None:
            if not 0.0 <= val_fraction < 1.0:
                raise UserError(f"--val-fraction must be in [0, 1), got {val_fraction}")
            recipe["train"] = {**recipe.get("train", {}), "val_fraction": float(val_fraction)}
    schedule = read_schedule(FinetuneSchedule, recipe)
    if schedule.window is not None and not (isinstance(schedule.window, list) and len(schedule.window) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in schedule.window)):
        # what sizes the network takes is checked once it is built (_build_network)
        raise UserError(f"recipe 'train.window' must be three whole numbers of voxels, got "
                        f"{json.dumps(schedule.window)}")
    start = resolve_start(init, recipe, labels_file, reporter, [*data_paths, *(val_paths or [])])
    network = _build_network(start, schedule)
    try:
        with StopRequest(at_once=True):  # until the first step, a stop ends the run at once: nothing to save yet
            train_data, val_data, torch_device = _prepare_run(start, schedule, network, data_paths, val_paths, cache,
                                                              exclude, device, state, reporter)
    except StoppedBeforeTraining:
        return report_stopped_before_training(output_path, state is not None, reporter)
    cases = cases_record(training=train_data, validation=val_data)
    trained = {tuple(digests) for digests in cases["training"].values()}
    seen = sorted(name for name, digests in cases["validation"].items() if tuple(digests) in trained)
    if seen:
        reporter.warning(f"validation cases that are training cases too (the same files): {', '.join(seen[:5])}"
                         f"{' …' * (len(seen) > 5)}; their Dice flatters the model, which has learnt them")
    if state is not None:
        warn_if_cases_changed(state.get("cases"), cases, reporter)
    return _train(network, start, schedule, recipe, train_data, val_data, output_path, torch_device, state,
                  reporter, {"init_spec": init, "labels_file": labels_file or start.labels_of_data, "cases": cases})


def _build_network(start: Start, schedule: FinetuneSchedule):
    """The run's network, seeded, before the data are prepared: bad settings of a hand-written network, or
    training crops it cannot take, are refused first."""
    from ..networks import build_network  # MONAI's import: after the quick refusals

    torch.manual_seed(schedule.seed)
    network = build_network(start.network)
    crop, stride = schedule.window or list(start.roi_size), network.bottleneck_stride
    if any(side % stride or side < 2 * stride for side in crop):  # its bottleneck's instance norm needs 2 voxels
        raise UserError(f"training crops of {'×'.join(map(str, crop))} voxels: the {start.network['name']} network "
                        f"takes at least {2 * stride} a side, in multiples of {stride} (train.window in a recipe)")
    return network


def _prepare_run(start: Start, schedule: FinetuneSchedule, network, data_paths, val_paths, cache, exclude, device,
                 state: dict | None, reporter: Reporter):
    """The training and validation data, loaded or prepared, and the device, with ``network`` on it (init weights
    in)."""
    from ..inference import select_device

    folder = Path(cache) if cache else cache_dir() / "prepared"
    if val_paths:
        train_data = _load_data(data_paths, start, folder, reporter, exclude)
        val_data = _load_data(val_paths, start, folder, reporter)
    else:
        all_data = _load_data(data_paths, start, folder, reporter, exclude)
        train_volumes, val_volumes = split_cases(all_data.volumes, schedule.val_fraction, schedule.seed)
        train_data = PreparedData(train_volumes, start.preprocessing, all_data.sources)
        val_data = PreparedData(val_volumes, start.preprocessing, all_data.sources) if val_volumes else None
    for data in (train_data, val_data):  # prepared folders given as data (cases are checked before preparing)
        if data is not None and data.channels != len(start.channels):
            raise UserError(f"the model takes {len(start.channels)} channel(s); the "
                            f"{'training' if data is train_data else 'validation'} data have {data.channels}")
    _check_labels_occur(train_data, start, reporter)
    if val_data is None:
        reporter.warning("no validation cases: the last epoch is kept and early stopping is off")

    torch_device = select_device(device, reporter)
    if schedule.num_threads and torch_device.type == "cpu":
        torch.set_num_threads(schedule.num_threads)
    network.to(torch_device)
    if start.weights is not None and state is None:
        summary = transfer_weights(network, start.weights, start.head_channels)
        reporter.info(f"from {start.init['file']}: {summary['transferred']} tensors transferred, "
                      f"{head_summary(start, summary['new'])}")
    return train_data, val_data, torch_device


def _train(network, start: Start, schedule: FinetuneSchedule, recipe: dict, train_data: PreparedData,
           val_data: PreparedData | None, output: Path, device, state: dict | None, reporter: Reporter,
           identity: dict) -> dict:
    import monai
    from monai.losses import DiceCELoss

    from ..memory import available_bytes
    from .augment import crop_augmentations
    from .cropgroups import cpu_group, forward_backward, step_halving_on_gpu_memory

    monai.data.set_track_meta(False)
    optimiser = torch.optim.AdamW(network.parameters(), lr=schedule.lr, weight_decay=schedule.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # reads schedule.epochs each step: a time limit may lower it
        optimiser, lambda s: warmup_cosine(s, schedule.warmup_steps, schedule.epochs * schedule.steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and schedule.amp == "fp16")
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, batch=True)
    window = tuple(schedule.window or start.roi_size)
    augment = crop_augmentations(window, schedule.organ_contrast, schedule.axial_slabs, schedule.flips, device)
    crop = int(np.ceil(max(window) * CROP_MARGIN))
    classes = len(start.labels)
    group = schedule.volumes_per_step * schedule.crops_per_volume  # crops through the network at once
    if device.type == "cpu":
        parameters = sum(p.numel() for p in network.parameters())
        group = cpu_group(group, start.network, parameters, window, available_bytes(), reporter)
    amp = functools.partial(autocast, device, schedule.amp)
    clear_gradients = functools.partial(optimiser.zero_grad, set_to_none=True)
    gpu_refusal = (f"out of GPU memory with one training crop of {'×'.join(map(str, window))} voxels: train on "
                   "the CPU (--device cpu) or on smaller crops (train.window in a recipe)")
    # pending: the history entry of an epoch whose validation a stop cut short (its resume validates it first)
    run = {"step": 0, "history": [], "losses": [], "best": -1.0, "best_epoch": 0, "elapsed": 0.0, "best_scores": {},
           "epochs": schedule.epochs, "validation_seconds": 0.0, "pending": None}
    if state is not None:
        network.load_state_dict(state["network"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        run = {k: state.get(k, fresh) for k, fresh in run.items()}  # states from before time limits lack "epochs"
        schedule.epochs = run["epochs"]
        reporter.info(f"resuming at step {run['step']} of {schedule.epochs * schedule.steps_per_epoch} "
                      f"(epoch {run['step'] // schedule.steps_per_epoch + 1})")
    total_steps = schedule.epochs * schedule.steps_per_epoch
    network.train()
    started = time.time()

    def elapsed() -> float:
        return run["elapsed"] + time.time() - started

    def save_state() -> None:
        snapshot = {**run, "elapsed": elapsed()}
        with atomic_output(state_path(output)) as tmp:
            save_torch_file({"format": STATE_FORMAT, "kind": "finetune", "recipe": recipe, **identity, **snapshot,
                             "network": network.state_dict(), "optimizer": optimiser.state_dict(),
                             "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}, tmp)

    stopped, early, redraw, drawn_at = False, False, Interval(REDRAW_SECONDS), None  # drawn_at: the epoch end drawn
    saving = Interval(schedule.save_minutes * 60, at_once=False)
    with StopRequest() as stop:
        if val_data is not None and run["step"] == 0 and not run["history"]:  # also where a stop cut it short
            reporter.stage("validate")
            began = elapsed()
            before = validate(network, val_data, start, device, classes, stop, reporter)
            if before is not None:
                run["validation_seconds"] = elapsed() - began  # what the first epoch's own validation will take
                run["history"].append({"step": 0, "epoch": 0, "dice": before["dice"]})
                reporter.metric(epoch=0, dice=before["dice"])
        elif run["pending"] is not None:  # the network is still at the end of that epoch
            early = _validate_epoch(run, network, start, schedule, val_data, device, classes, output, recipe,
                                    train_data, reporter, stop)
            if run["pending"] is None:
                _draw_curve(run, output, recipe)
                drawn_at = run["step"]
                save_state()
        stopped = stop.requested
        reporter.stage("fine-tune")
        pace = StepPace(elapsed())  # under a time limit, this process's steps
        while run["step"] < total_steps and not (stopped or early):
            step = run["step"]
            rng, _ = step_generators(schedule.seed, 0, step, 0)
            stored, valid, labels = train_data.sample_crops(rng, schedule.volumes_per_step, schedule.crops_per_volume,
                                                            crop, schedule.labelled_fraction)
            valid, labels = torch.from_numpy(valid).to(device), torch.from_numpy(labels).to(device)
            images = train_data.to_model(torch.from_numpy(stored).to(device), valid)
            augment.set_random_state(seed=int(rng.integers(2**31)))
            samples = [augment({"image": images[i], "label": labels[i]}) for i in range(len(images))]
            x = torch.stack([s["image"] for s in samples]).float()
            y = torch.stack([s["label"] for s in samples]).long()
            passes = functools.partial(forward_backward, network, loss_fn, x, y, amp=amp, scaler=scaler)
            loss, group = step_halving_on_gpu_memory(passes, group, clear_gradients, reporter, "crops",
                                                     gpu_refusal)
            optimiser_step(optimiser, scheduler, scaler, network.parameters(), schedule.grad_clip)
            run["step"] = step + 1
            run["losses"].append(loss)
            reporter.progress(run["step"], total_steps)
            if schedule.max_minutes and run["step"] <= schedule.steps_per_epoch:  # judged in the first epoch
                pace.step_ended(elapsed())
                fitted = _fit_to_time_limit(recipe, schedule, run, elapsed(), pace, reporter)
                if fitted is not recipe:
                    recipe, total_steps = fitted, schedule.epochs * schedule.steps_per_epoch
                    scheduler.last_epoch -= 1  # the next step's learning rate again, from the fitted schedule
                    scheduler.step()
            epoch_ended = run["step"] % schedule.steps_per_epoch == 0
            if epoch_ended:
                run["pending"] = _epoch_entry(run, schedule, scheduler, elapsed())
                early = _validate_epoch(run, network, start, schedule, val_data, device, classes, output, recipe,
                                        train_data, reporter, stop)
                if run["pending"] is None and redraw.due(run["step"] == total_steps or early):
                    _draw_curve(run, output, recipe)
                    drawn_at = run["step"]
            if saving.due(epoch_ended):  # within an epoch too: a run killed unwarned loses save_minutes at most
                save_state()
            stopped = stop.requested
    if stopped and (run["step"] % schedule.steps_per_epoch or run["step"] == 0):
        save_state()  # mid-epoch (the epoch's losses so far travel in the state), or before the first step
    # a model is written at a validation that improves on the best (without validation cases, at the last epoch),
    # the curve after an epoch's end: a run stopped before either has written neither
    saved, plotted = run["best_epoch"] > 0, any(h["step"] > 0 for h in run["history"])
    if stopped and plotted and drawn_at != run["step"] - run["step"] % schedule.steps_per_epoch:
        _draw_curve(run, output, recipe)  # the epochs ended since the last drawing
    outputs = {"checkpoint": str(output) if saved else None, "resume_state": str(state_path(output)),
               "curve": str(curve_path(output)) if plotted else None, "step": run["step"], "steps": total_steps,
               "best_dice": run["best"] if val_data is not None and saved else None, "best_epoch": run["best_epoch"],
               "stopped": stopped, "stopped_early": early}
    if stopped and run["pending"] is not None:
        reporter.info(f"stopped during the validation of epoch {run['pending']['epoch']} (step {run['step']} of "
                      f"{total_steps}); `--resume` validates it, then continues")
    elif stopped:
        reporter.info(f"stopped at step {run['step']} of {total_steps}; `--resume` continues from there")
    elif early:
        reporter.info(f"no better validation Dice for {schedule.patience} epochs: stopped at epoch "
                      f"{run['step'] // schedule.steps_per_epoch}, best epoch {run['best_epoch']}")
    if saved and not stopped:
        _warn_if_the_start_was_better(run, reporter)
    reporter.done(outputs)
    return outputs


def _warn_if_the_start_was_better(run: dict, reporter: Reporter) -> None:
    """A finished run whose best epoch scored below the model it started from, on the same validation cases (the
    validation before the first step), says so: its model is the worse of the two there."""
    start = next((h["dice"] for h in run["history"] if h["epoch"] == 0), None)
    if start is not None and run["best"] < start:
        reporter.warning(f"the model the run started from scored a higher validation Dice ({start:.3f}) than any "
                         f"epoch of the run (best {run['best']:.3f}, epoch {run['best_epoch']}): on these cases it "
                         "is the better model")


def _fit_to_time_limit(recipe: dict, schedule: FinetuneSchedule, run: dict, spent: float, pace: StepPace,
                       reporter: Reporter) -> dict:
    """In the first epoch of a run with a time limit, after its ``run["step"]``: the recipe, fitted to the limit
    once that can be judged (the schedule then changed to it, with no limit left: a resumed run does not refit).
    At the first epoch's end: the epochs that fit at its pace, the validation before it standing in for each
    epoch's. Before it, as soon as the epoch and its validation would pass the limit at the pace of the steps
    after the first (judged once ``PACE_STEPS`` are timed, or at once where the next step would pass it): that
    epoch cut to the steps that fit, the run's only one. ``spent``: seconds so far; ``pace``: a
    ``schedule.StepPace`` of this process's steps."""
    step, limit, epoch_steps, seconds = run["step"], schedule.max_minutes * 60, schedule.steps_per_epoch, pace.seconds
    left = limit - spent - run["validation_seconds"]
    if step < epoch_steps:
        if (pace.timed < PACE_STEPS and left >= seconds) or left >= seconds * (epoch_steps - step):
            return recipe
        fit = step + max(0, int(left // seconds))
        reporter.info(f"{seconds:.1f} s a step: the first epoch's {epoch_steps} steps and its validation would pass "
                      f"the {schedule.max_minutes:g} minutes; it ends at step {fit}, the run's only epoch")
        run["epochs"] = 1
        return _fitted(recipe, schedule, 1, fit)
    fit = min(schedule.epochs, max(1, int(limit // spent)))
    if fit < schedule.epochs:
        took = f"the first epoch took {spent:.1f} s"
        reporter.info(f"{took}: {fit} of {schedule.epochs} epochs fit in {schedule.max_minutes:g} minutes"
                      if spent <= limit else
                      f"{took}, more than the {schedule.max_minutes:g} minutes: the run ends with it")
    run["epochs"] = fit
    return _fitted(recipe, schedule, fit, epoch_steps)


def _fitted(recipe: dict, schedule: FinetuneSchedule, epochs: int, steps_per_epoch: int) -> dict:
    """``recipe`` and ``schedule`` with ``epochs`` of ``steps_per_epoch`` steps, the warm-up in proportion, and no
    time limit."""
    total = schedule.epochs * schedule.steps_per_epoch
    warmup = shortened_warmup(schedule.warmup_steps, epochs * steps_per_epoch, total)
    schedule.epochs, schedule.steps_per_epoch, schedule.warmup_steps, schedule.max_minutes = (
        epochs, steps_per_epoch, warmup, None)
    return {**recipe, "train": {**recipe.get("train", {}), "epochs": epochs, "steps_per_epoch": steps_per_epoch,
                                "warmup_steps": warmup, "max_minutes": None}}


def _epoch_entry(run: dict, schedule: FinetuneSchedule, scheduler, seconds: float) -> dict:
    """The history entry of the epoch that has just ended (its mean loss; the run's losses start again)."""
    entry = {"step": run["step"], "epoch": run["step"] // schedule.steps_per_epoch,
             "loss": float(np.mean(run["losses"])), "lr": scheduler.get_last_lr()[0], "seconds": round(seconds, 1)}
    run["losses"] = []
    return entry


def _validate_epoch(run: dict, network, start: Start, schedule: FinetuneSchedule, val_data, device, classes: int,
                    output: Path, recipe: dict, train_data: PreparedData, reporter: Reporter, stop) -> bool:
    """Validate the epoch ``run["pending"]`` (where due), log it, keep the best model; True when early stopping
    says stop. A stop during the validation leaves the epoch pending."""
    entry = run["pending"]
    epoch, seconds = entry["epoch"], entry["seconds"]
    scores = None
    last = epoch == schedule.epochs
    if val_data is not None and (epoch % schedule.validate_every == 0 or last):
        reporter.stage("validate")
        scores = validate(network, val_data, start, device, classes, stop, reporter)
        if scores is None:
            return False
        entry = {**entry, "dice": scores["dice"]}
        reporter.stage("fine-tune")
    run["pending"] = None
    run["history"].append(entry)
    per_label = {start.labels[c - 1].name: v for c, v in scores["per_class"].items()} if scores else None
    reporter.metric(**entry, **({"dice_per_label": per_label} if scores else {}))
    if scores is not None and scores["dice"] > run["best"]:
        run["best"], run["best_epoch"] = scores["dice"], epoch
        run["best_scores"] = {start.labels[c - 1].name: round(v, 4) for c, v in scores["per_class"].items()}
        _save_model(output, network, start, schedule, recipe, train_data, val_data, run, seconds)
    elif val_data is None and last:
        run["best_epoch"] = epoch
        _save_model(output, network, start, schedule, recipe, train_data, val_data, run, seconds)
    return bool(schedule.patience and scores is not None and epoch - run["best_epoch"] >= schedule.patience)


def _draw_curve(run: dict, output: Path, recipe: dict) -> None:
    from ..curves import plot_curves

    plot_curves([h for h in run["history"] if h["step"] > 0] or run["history"], curve_path(output),
                recipe.get("title", ""))


def _save_model(output: Path, network, start: Start, schedule: FinetuneSchedule, recipe: dict,
                train_data: PreparedData, val_data, run: dict, seconds: float) -> None:
    import monai

    from_what = f"fine-tuned from {start.init['file']}" if start.init else "supervised from scratch"
    method = start.init.get("pretraining", {}).get("method") if start.init else None
    device = next(network.parameters()).device
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.machine()} CPU"
    meta = ModelMeta(
        network=start.network, channels=start.channels, preprocessing=start.preprocessing, roi_size=start.roi_size,
        overlap=start.overlap, labels=start.labels, regions=start.regions,
        method=f"{from_what}{f' ({method} pre-training)' if method else ''}",
        title=recipe.get("title", ""), description=recipe.get("description", ""),
        provenance={
            "init": start.init, "recipe": recipe,
            "train_data": train_data.sources_of(train_data.volumes),
            "validation_data": val_data.sources_of(val_data.volumes) if val_data is not None else [],
            "epoch": run["best_epoch"], "steps": run["step"], "train_seconds": round(seconds, 1),
            "crops_seen": run["step"] * schedule.volumes_per_step * schedule.crops_per_volume,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "software": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
            "machine": machine,
        },
        metrics={"validation": {"mean_dice": round(run["best"], 4), "dice": run["best_scores"],
                                "epoch": run["best_epoch"],
                                "cases": [v.name for v in val_data.volumes]}} if val_data is not None else {},
    )
    save_checkpoint(output, network.state_dict(), meta, half=schedule.half_precision)
