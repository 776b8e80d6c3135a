"""The trainer every pre-training method shares.

Mixed precision (bf16 or fp16 on CUDA), gradient accumulation, warm-up +
cosine learning rate, several foreground crops per volume, atomic checkpoints
every N steps, exact resume, tqdm or JSON-lines progress, and multi-GPU /
multi-node data parallelism when started by ``torchrun`` (DDP; NCCL on GPUs,
gloo on CPUs).

Exact resume: every random choice of a step (which volumes, crops, masks,
dropout) comes from training.runstate.step_generators.

Two files: the model (``-o``, a reconstruction checkpoint usable at once by
``hybridmim reconstruct`` and ``finetune``) and, beside it, ``*.resume.pt``
(model, heads, optimiser, scheduler, step, history), read back with
``torch.load(weights_only=True)``. SIGTERM or Ctrl-C finish the current step,
write both, and stop cleanly; ``--resume`` continues.
"""

from __future__ import annotations

import functools
import inspect
import os
import platform
import time
import weakref
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import get_type_hints

import numpy as np
import torch

from ..atomic import atomic_output
from ..checkpoint import ModelMeta, save_checkpoint
from ..curves import REDRAW_SECONDS
from ..errors import UserError
from ..memory import available_bytes
from ..networks import build_network
from ..preprocessing import Preprocessing
from ..progress import Reporter
from ..runfiles import curve_path, state_path
from ..torchfiles import save_torch_file
from ..training.runstate import (STATE_FORMAT, StopRequest, autocast, cases_record, check_setting_type,
                                 optimiser_step, read_schedule, step_generators,
                                 warn_if_cases_changed)
from ..training.schedule import Interval, StepPace, shortened_warmup, warmup_cosine
from ..volumes import PreparedData
from .hpm import HPM
from .hybridmim import HybridMIM
from .mim import MiM
from .stepmemory import fit_cpu_memory, mim_step_within_gpu_memory

METHODS = {method.name: method for method in (HybridMIM, MiM, HPM)}
PACE_STEPS = 10  # steps timed for --max-minutes, after the first (cuDNN autotuning, allocator warm-up)


@dataclass
class Schedule:
    """The recipe's ``train`` block."""

    steps: int
    volumes_per_step: int = 1
    crops_per_volume: int = 2
    accumulate: int = 1
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup_steps: int = 500
    amp: str = "bf16"
    grad_clip: float | None = 1.0
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    num_threads: int | None = None
    half_precision: bool = True
    max_minutes: float | None = None  # time limit: once the pace is timed, keep only the steps (≤ steps) that fit
    save_minutes: float = 10.0  # the resume state and model are saved every checkpoint_every steps and this often

    POSITIVE = ("steps", "volumes_per_step", "crops_per_volume", "accumulate", "checkpoint_every", "log_every")


def build_method(recipe: dict, channels: int) -> torch.nn.Module:
    name = recipe.get("method")
    if name not in METHODS:
        raise UserError(f"unknown pre-training method {name!r} (known: {', '.join(METHODS)})")
    settings = dict(recipe.get(name) or {})
    unknown = set(settings) - (set(inspect.signature(METHODS[name].__init__).parameters) - {"self", "network"})
    if unknown:
        raise UserError(f"recipe {name!r}: unknown settings {sorted(unknown)}")
    hints = get_type_hints(METHODS[name].__init__)
    for key, value in settings.items():
        if key in hints:
            check_setting_type(f"{name}.{key}", value, hints[key])
    network = build_network({**recipe["network"], "in_channels": channels, "out_channels": channels})
    try:
        return METHODS[name](network, **settings)
    except ValueError as exc:  # a value out of its range (a mask ratio of 1.5)
        raise UserError(f"recipe {name!r}: {exc}") from None


class _Distributed:
    """Rank, world size and device; DDP when started by torchrun with more than one process."""

    def __init__(self, device_request: str, reporter: Reporter):
        from ..inference import select_device

        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = select_device(device_request, reporter if self.rank == 0 else Reporter("quiet"))
        if self.device.type == "cuda" and self.world > 1:
            self.device = torch.device("cuda", local_rank)
            torch.cuda.set_device(self.device)
        self._sent: list[weakref.ref] = []  # the tensors our collectives gave to the backend's threads
        if self.world > 1:
            import torch.distributed as dist

            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        if self.world == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on one (so all stop at the same step)."""
        return flag if self.world == 1 else self._all_reduce(float(flag), torch.float32, "SUM") > 0

    def smallest(self, value: int) -> int:
        """The smallest ``value`` over the ranks (so all train the same number of steps)."""
        return value if self.world == 1 else int(self._all_reduce(value, torch.int64, "MIN"))

    def _all_reduce(self, number, dtype: torch.dtype, op: str):
        """``number`` reduced over the ranks by ``op`` (a ``ReduceOp`` name); its tensor is watched until the
        backend lets it go (``close``)."""
        import torch.distributed as dist

        tensor = torch.tensor([number], device=self.device, dtype=dtype)
        dist.all_reduce(tensor, op=getattr(dist.ReduceOp, op))
        self._sent = [ref for ref in self._sent if ref() is not None] + [weakref.ref(tensor)]
        return tensor.item()

    def close(self, timeout: float = 5.0) -> None:
        """Leave the process group once the backend's threads have let go of our collectives' tensors.

        A gloo worker thread drops a finished collective's tensors only after the caller has its result, and
        dropping a tensor that Python has seen takes the GIL; were the interpreter shutting down by then, the
        thread would abort the process (SIGABRT, "terminate called without an active exception": one
        two-process run in four to twenty here; leaving the group does not join those threads once DDP has
        used it). Sleeping hands the GIL to that thread.
        """
        deadline = time.monotonic() + timeout
        while any(ref() is not None for ref in self._sent) and time.monotonic() < deadline:
            time.sleep(0.005)
        if self.world > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


def with_options(recipe: dict, steps: int | None, max_minutes: float | None = None) -> dict:
    """``recipe`` with ``--steps`` and ``--max-minutes`` applied."""
    train = dict(recipe.get("train", {}))
    if steps is not None:
        train["steps"] = int(steps)
    if max_minutes is not None:
        train["max_minutes"] = max_minutes
    return {**recipe, "train": train}


def check_recipe(recipe: dict) -> None:
    """Refuse a bad recipe before any data is read: its schedule and its method must build."""
    read_schedule(Schedule, recipe)
    build_method(recipe, len(recipe["channels"]))


def pretrain(recipe: dict, data: PreparedData, output: Path, reporter: Reporter, state: dict | None = None,
             device: str = "auto", steps: int | None = None, max_minutes: float | None = None) -> dict:
    """Pre-train per ``recipe`` on ``data``, from ``state`` when resuming; returns the outputs written.

    ``max_minutes`` limits the run's training time (resumed sessions included): once the pace of the
    first steps is known the run keeps the steps that fit, and the schedules end on the new last step.
    """
    output = Path(output)
    recipe = with_options(recipe, steps, max_minutes)
    schedule = read_schedule(Schedule, recipe)
    if Preprocessing.from_dict(recipe["preprocessing"]) != data.preprocessing:
        raise UserError("the data were prepared with other pre-processing than the recipe's")
    if len(recipe["channels"]) != data.channels:
        raise UserError(f"the recipe lists {len(recipe['channels'])} channel(s); the data have {data.channels}")

    dist = _Distributed(device, reporter)
    if not dist.main:
        reporter = Reporter("quiet")
    if schedule.num_threads and dist.device.type == "cpu":
        torch.set_num_threads(schedule.num_threads)
    if dist.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    try:
        return _train(recipe, schedule, data, output, state, dist, reporter)
    finally:
        dist.close()


def _train(recipe, schedule: Schedule, data: PreparedData, output: Path, state, dist: _Distributed,
           reporter: Reporter) -> dict:
    torch.manual_seed(schedule.seed)  # the same initial weights on every rank and every run
    method = build_method(recipe, data.channels).to(dist.device)
    crops = schedule.volumes_per_step * schedule.crops_per_volume  # of a micro-batch
    if dist.device.type == "cpu":  # the ranks on this machine share its memory
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", dist.world))
        available = available_bytes()
        fit_cpu_memory(method, recipe["network"], data.channels, crops,
                       None if available is None else available // ranks_here, reporter)
    learnt = [p for p in method.parameters() if p.requires_grad]  # not an EMA teacher's
    optimiser = torch.optim.AdamW(learnt, lr=schedule.lr, weight_decay=schedule.weight_decay)
    lr_lambda = lambda s: warmup_cosine(s, schedule.warmup_steps, schedule.steps)  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lr_lambda)
    scaler = torch.amp.GradScaler("cuda", enabled=dist.device.type == "cuda" and schedule.amp == "fp16")
    start, history, elapsed = 0, [], 0.0
    if state is not None:
        method.load_state_dict(state["method"])
        optimiser.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])  # keeps lr_lambda: the total may have changed with --steps
        scaler.load_state_dict(state["scaler"])
        start, history, elapsed = int(state["step"]), list(state["history"]), float(state["elapsed"])
        reporter.info(f"resuming at step {start} of {schedule.steps}")
        warn_if_cases_changed(state.get("cases"), cases_record(training=data), reporter)
    model = dist.wrap(method)
    model.train()

    redraw, saving = Interval(REDRAW_SECONDS), Interval(schedule.save_minutes * 60, at_once=False)
    clear_gradients = functools.partial(optimiser.zero_grad, set_to_none=True)

    def one_step(step: int) -> dict:
        run = functools.partial(_one_step, model, method, data, schedule, dist, scaler, step)
        if isinstance(method, MiM) and dist.world == 1:  # several processes would have to retry together
            return mim_step_within_gpu_memory(run, method, crops, clear_gradients, reporter)
        return run()

    def save(step: int, last: bool) -> None:
        if dist.main:
            _save(output, recipe, method, optimiser, scheduler, scaler, step, history, elapsed + time.time() - started,
                  data, dist, schedule, redraw.due(last))

    reporter.stage("pre-train")
    started, window, stopped = time.time(), [], False
    pace = StepPace(started)
    step = start
    with StopRequest() as stop:
        while step < schedule.steps:
            terms = one_step(step)
            optimiser_step(optimiser, scheduler, scaler, learnt, schedule.grad_clip)
            step += 1
            if schedule.max_minutes and step <= start + 1 + PACE_STEPS:
                # fitted once PACE_STEPS steps are timed, or sooner where the next step would pass the limit
                now = time.time()
                pace.step_ended(now)
                spent = elapsed + now - started
                if pace.timed == PACE_STEPS or dist.any(spent + pace.seconds > schedule.max_minutes * 60):
                    recipe = _fit_steps_in_time(recipe, schedule, step, pace.seconds, spent, dist, reporter)
            if hasattr(method, "after_step"):  # SelfMedHPM's teacher follows the student
                method.after_step(step, schedule.steps)
            window.append(terms)
            reporter.progress(step, schedule.steps)
            if step % schedule.log_every == 0 or step == schedule.steps:
                history.append(_summarise(window, step, scheduler.get_last_lr()[0], elapsed + time.time() - started))
                reporter.metric(**history[-1])
                window = []
            stopped = dist.any(stop.requested)
            # between checkpoints too, every save_minutes: a run killed unwarned (Slicer closing waits a minute, a
            # MiM step on a CPU takes three) loses no more
            if saving.due(stopped or step % schedule.checkpoint_every == 0 or step == schedule.steps):
                save(step, last=stopped or step == schedule.steps)
            if stopped:
                break
    outputs = {"checkpoint": str(output), "resume_state": str(state_path(output)), "curve": str(curve_path(output)),
               "step": step, "steps": schedule.steps}
    if stopped:
        reporter.info(f"stopped at step {step} of {schedule.steps}; `--resume` continues from there")
    reporter.done({**outputs, "stopped": stopped})
    return outputs


def _fit_steps_in_time(recipe: dict, schedule: Schedule, step: int, pace: float, spent: float, dist: _Distributed,
                       reporter: Reporter) -> dict:
    """Lower ``schedule.steps`` to those that fit in its time limit at ``pace`` seconds a step, and the warm-up
    in proportion (100 warm-up steps of 3000 would be most of a 150-step run); the recipe that the resume state
    keeps: the steps fitted and no time limit, so that a resumed run does not refit."""
    fit = dist.smallest(step + max(0, int((schedule.max_minutes * 60 - spent) / pace)))
    if fit < schedule.steps:
        reporter.info(f"{pace:.2f} s a step: {fit} of {schedule.steps} steps fit in {schedule.max_minutes:g} minutes")
        schedule.warmup_steps = shortened_warmup(schedule.warmup_steps, fit, schedule.steps)
        schedule.steps = fit
    schedule.max_minutes = None
    return {**recipe, "train": {**recipe["train"], "steps": schedule.steps, "warmup_steps": schedule.warmup_steps,
                                "max_minutes": None}}


def _one_step(model, method, data: PreparedData, schedule: Schedule, dist: _Distributed, scaler, step: int) -> dict:
    """Forward and backward over ``accumulate`` micro-batches; returns the mean of each loss term."""
    totals: dict[str, float] = {}
    for micro in range(schedule.accumulate):
        rng, generator = step_generators(schedule.seed, dist.rank, step, micro)
        stored, valid, _ = data.sample_crops(rng, schedule.volumes_per_step, schedule.crops_per_volume,
                                             method.crop_size)
        valid = torch.from_numpy(valid).to(dist.device, non_blocking=True)
        image = data.to_model(torch.from_numpy(stored).to(dist.device, non_blocking=True), valid)
        choices = method.sample(image.shape[0], generator, progress=(step + 1) / schedule.steps)
        last = micro == schedule.accumulate - 1
        sync = nullcontext() if last or dist.world == 1 else model.no_sync()
        with sync:
            with autocast(dist.device, schedule.amp):
                loss, terms = model(image, valid, **choices)
            scaler.scale(loss / schedule.accumulate).backward()
        for name, value in {"loss": loss.detach(), **terms}.items():
            totals[name] = totals.get(name, 0.0) + float(value) / schedule.accumulate
    return totals


def _summarise(window: list[dict], step: int, lr: float, seconds: float) -> dict:
    means = {name: float(np.mean([terms[name] for terms in window])) for name in window[0]}
    return {"step": step, **means, "lr": lr, "seconds": round(seconds, 1)}


def _save(output: Path, recipe: dict, method, optimiser, scheduler, scaler, step: int, history: list, elapsed: float,
          data: PreparedData, dist: _Distributed, schedule: Schedule, plot: bool) -> None:
    """The resume state first, then the model: a model file never runs ahead of its state; then (``plot``) the
    curve."""
    import monai

    from ..curves import plot_curves

    state = {"format": STATE_FORMAT, "kind": "pretrain", "recipe": recipe, "step": step, "method": method.state_dict(),
             "optimizer": optimiser.state_dict(), "scheduler": scheduler.state_dict(),
             "scaler": scaler.state_dict(), "history": history, "elapsed": elapsed,
             "cases": cases_record(training=data)}
    with atomic_output(state_path(output)) as tmp:
        save_torch_file(state, tmp)
    device = f"{torch.cuda.get_device_name(dist.device)}" if dist.device.type == "cuda" else f"{platform.machine()} CPU"
    meta = ModelMeta(
        network={**recipe["network"], "in_channels": data.channels, "out_channels": data.channels},
        channels=recipe["channels"],
        preprocessing=data.preprocessing,
        roi_size=(method.window_size,) * 3,
        overlap=0.5,
        labels=[],
        method=method.name,
        task="reconstruction",
        pretraining=method.settings(),
        title=recipe.get("title", ""),
        description=recipe.get("description", ""),
        provenance={
            "recipe": recipe,
            "data": data.sources,
            "steps": step,
            "crops_seen": (step * schedule.accumulate * schedule.volumes_per_step * schedule.crops_per_volume
                           * dist.world),
            "train_seconds": round(elapsed, 1),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "software": {"torch": torch.__version__, "monai": monai.__version__, "python": platform.python_version()},
            "machine": f"{dist.world} × {device}",
        },
        metrics={"last": history[-1]} if history else {},
    )
    save_checkpoint(output, method.network.state_dict(), meta, half=schedule.half_precision)
    if history and plot:
        plot_curves(history, curve_path(output), recipe.get("title", ""))
