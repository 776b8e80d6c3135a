"""What every training run (pre-training, fine-tuning) shares: its files beside the model,
resume states (with the cases they were made on), clean stops on SIGTERM/Ctrl-C, per-step random generators and
mixed precision.

Exact resume without saving random-number-generator states: every random
choice of a step is drawn from generators seeded by (seed, rank, step,
micro-batch), so the batch after a resume is the one the uninterrupted run
would have drawn.
"""

from __future__ import annotations

import json
import math
import signal
import threading
from contextlib import nullcontext
from dataclasses import fields
from pathlib import Path
from typing import get_args, get_type_hints

import numpy as np
import torch

from ..errors import UserError
from ..runfiles import state_path
from ..torchfiles import load_torch_file

STATE_FORMAT = 1


def check_new_run(output: Path, overwrite: bool) -> None:
    """A fresh run must not silently replace an earlier run's model or resume state."""
    for path in (output, state_path(output)):
        if path.exists() and not overwrite:
            raise UserError(f"{path}: already exists; pass --resume to continue that run or --overwrite to start again")


def load_resume_state(output: Path, kind: str) -> dict:
    """The state a ``kind`` run ("pretrain", "finetune") writing ``output`` left (read with weights_only)."""
    path = state_path(output)
    if not path.is_file():
        raise UserError(f"nothing to resume: {path} does not exist")
    state = load_torch_file(path, "resume state")
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise UserError(f"{path}: written by another version of the engine; cannot resume")
    if state.get("kind", "pretrain") != kind:
        raise UserError(f"{path}: the resume state of a {state.get('kind', 'pretrain')} run, not of a {kind} run")
    return state


class StoppedBeforeTraining(Exception):
    """A stop request while a run was still preparing: nothing new to save."""


class StopRequest:
    """SIGTERM / SIGINT (SIGBREAK on Windows) set a flag; the loop stops after the current step.

    ``at_once``: the signal raises StoppedBeforeTraining wherever the run is instead, for the preparation
    before the first step (no state worth saving yet; prepared cases are written atomically, so the ones
    done stay cached for the next start)."""

    def __init__(self, at_once: bool = False):
        self.requested = False
        self.at_once = at_once
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            # SIGBREAK: what a stop request (CTRL_BREAK_EVENT) raises on Windows
            for sig in (signal.SIGTERM, signal.SIGINT, getattr(signal, "SIGBREAK", None)):
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        if self.at_once:
            raise StoppedBeforeTraining()

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def cases_record(**roles) -> dict:
    """The cases a run learns from, by role (``training=``, ``validation=``: PreparedData or None), each as
    {name: the SHA256 of each of its files}; kept in its resume state."""
    return {role: {s["name"]: list(s["sha256"]) for s in data.sources_of(data.volumes)} if data is not None else {}
            for role, data in roles.items()}


def warn_if_cases_changed(before: dict | None, now: dict, reporter) -> None:
    """A run resumed on other cases than it stopped with (``cases_record``s) goes on with them, but no longer as
    the uninterrupted run would have: say so (a state from before this record says nothing)."""
    if before is None or before == now:
        return
    changes = []
    for role, cases in now.items():
        earlier = before.get(role, {})
        for what, names in (("added", set(cases) - set(earlier)), ("gone", set(earlier) - set(cases)),
                            ("changed", {n for n in set(cases) & set(earlier) if cases[n] != earlier[n]})):
            if names:
                changes.append(f"{role} cases {what}: {', '.join(sorted(names)[:3])}{' …' * (len(names) > 3)}")
    reporter.warning(f"the cases differ from those the run stopped with ({'; '.join(changes)}): it goes on with "
                     "these, so it will not end as the uninterrupted run would have")


def report_stopped_before_training(output: Path | None, resuming: bool, reporter) -> dict:
    """The outputs of a run stopped before its first step (``output`` None: it only prepared data); a resumed
    run's earlier state is untouched."""
    outputs = {"checkpoint": str(output) if output else None,
               "resume_state": str(state_path(output)) if resuming else None,
               "stopped": True, "before_training": True}
    reporter.info("stopped before training began: " + ("`--resume` continues the earlier run" if resuming else
                                                        "nothing to resume; the cases prepared so far stay cached"))
    reporter.done(outputs)
    return outputs


def step_generators(seed: int, rank: int, step: int, micro: int) -> tuple[np.random.Generator, torch.Generator]:
    """A numpy and a torch generator for one micro-batch; also reseeds torch's global RNG (dropout)."""
    rng = np.random.default_rng([seed, rank, step, micro])
    torch.manual_seed(int(rng.integers(2**62)))
    return rng, torch.Generator().manual_seed(int(rng.integers(2**62)))


def autocast(device: torch.device, amp: str):
    """bf16/fp16 autocast on CUDA; nothing on the CPU or with amp "none"."""
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def optimiser_step(optimiser, scheduler, scaler, parameters, grad_clip: float | None) -> None:
    """After the backward pass: unscale and clip the gradients (when asked), step, clear, advance the schedule."""
    if grad_clip:
        scaler.unscale_(optimiser)
        torch.nn.utils.clip_grad_norm_(parameters, grad_clip)
    scaler.step(optimiser)
    scaler.update()
    optimiser.zero_grad(set_to_none=True)
    scheduler.step()


def check_minutes(minutes, what: str = "the time limit") -> None:
    """Refuse minutes that are not a positive number (None: none given, as for no time limit)."""
    if minutes is not None and not (isinstance(minutes, (int, float)) and minutes > 0):
        raise UserError(f"{what} must be a positive number of minutes, got {minutes!r}")


def check_recipe_keys(block: dict, kinds: dict, where: str = "") -> None:
    """A hand-written recipe's names and their values' kinds (``kinds``: name → annotation), in its block ``where``
    ("scratch"; "": the recipe itself): a misspelt name is refused, not ignored, and a list where an object belongs
    is refused, not merged over the defaults in their stead."""
    unknown = set(block) - set(kinds)
    if unknown:
        raise UserError(f"recipe{f' {where!r}' if where else ''}: unknown settings {sorted(unknown)}")
    for name, value in block.items():
        check_setting_type(f"{where}.{name}" if where else name, value, kinds[name])


def read_schedule(cls, recipe: dict):
    """The recipe's ``train`` block as the dataclass ``cls``: unknown names and bad values refused."""
    block = dict(recipe.get("train") or {})
    unknown = set(block) - {f.name for f in fields(cls)}
    if unknown:
        raise UserError(f"recipe 'train': unknown settings {sorted(unknown)}")
    schedule = cls(**block)
    hints = get_type_hints(cls)
    for field in fields(cls):
        check_setting_type(f"train.{field.name}", getattr(schedule, field.name), hints[field.name])
    if schedule.amp not in ("bf16", "fp16", "none"):
        raise UserError(f"recipe 'train.amp' must be bf16, fp16 or none, got {schedule.amp!r}")
    for name in cls.POSITIVE:
        if getattr(schedule, name) < 1:
            raise UserError(f"recipe 'train.{name}' must be ≥ 1, got {getattr(schedule, name)}")
    if schedule.num_threads is not None and schedule.num_threads < 1:
        raise UserError(f"recipe 'train.num_threads' must be ≥ 1 or null, got {schedule.num_threads}")
    if not schedule.lr > 0:
        raise UserError(f"recipe 'train.lr' must be above 0, got {schedule.lr}")
    for name in ("weight_decay", "warmup_steps"):
        if getattr(schedule, name) < 0:
            raise UserError(f"recipe 'train.{name}' must be ≥ 0, got {getattr(schedule, name)}")
    if not 0 <= schedule.seed < 2 ** 63:  # what torch's generators take
        raise UserError(f"recipe 'train.seed' must be a whole number from 0 to 2^63 - 1, got {schedule.seed}")
    for name, one_allowed in getattr(cls, "FRACTIONS", {}).items():
        value = getattr(schedule, name)
        if not (0 <= value <= 1 if one_allowed else 0 <= value < 1):
            raise UserError(f"recipe 'train.{name}' must be in [0, 1{']' if one_allowed else ')'}, got {value}")
    check_minutes(schedule.max_minutes)
    check_minutes(schedule.save_minutes, "recipe 'train.save_minutes'")
    return schedule


_KINDS = {bool: "true or false", int: "a whole number", float: "a finite number", str: "text", list: "a list",
          dict: "an object"}


def check_setting_type(where: str, value, hint) -> None:
    """A hand-written recipe's value of the wrong kind ("10" for 10, 2.5 steps) refused before it is used;
    ``where`` names it in the recipe ("train.steps"), ``hint`` is its annotation."""
    allowed = get_args(hint) or (hint,)  # `float | None` gives (float, NoneType); kinds not in _KINDS: unjudged
    if (value is None and type(None) in allowed) or not set(allowed) <= {*_KINDS, type(None)}:
        return
    for kind in allowed:
        if isinstance(value, bool) != (kind is bool):  # JSON's true is an int to Python: not a count
            continue
        if kind is float and isinstance(value, (int, float)) and math.isfinite(value):
            return
        if kind is not float and isinstance(value, kind):
            return
    wanted = " or ".join(_KINDS[kind] if kind in _KINDS else "null" for kind in allowed)
    raise UserError(f"recipe '{where}' must be {wanted}, got {json.dumps(value)}")
