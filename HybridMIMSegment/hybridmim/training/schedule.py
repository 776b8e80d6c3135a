"""Learning-rate schedule, and the pace of steps that a time limit is fitted to, shared by fine-tuning and
pre-training."""

from __future__ import annotations

import math
import time


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """Factor on the base learning rate: linear warm-up over ``warmup`` steps, then cosine to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def shortened_warmup(warmup: int, steps: int, total: int) -> int:
    """The warm-up of a run shortened from ``total`` steps to ``steps``, in proportion (100 warm-up steps of a
    20-step run would be all of it)."""
    return max(1, warmup * steps // total) if steps < total else warmup


class StepPace:
    """Seconds a step, from the steps' ends in this process: the first step is warm-up (cuDNN autotuning, the
    allocator), so the mean of those after it, or the first one's while it is the only one."""

    def __init__(self, began: float):
        self._ends = [began]

    def step_ended(self, at: float) -> None:
        self._ends.append(at)

    @property
    def timed(self) -> int:
        """The steps after the first."""
        return len(self._ends) - 2

    @property
    def seconds(self) -> float:
        ends = self._ends
        return (ends[-1] - ends[1]) / self.timed if self.timed else ends[1] - ends[0]


class Interval:
    """When a run does what it also does at fixed points (draw its curve; save its state, at epoch ends and
    checkpoints): on the way at most once every ``seconds``, and always when told to (``due(True)``: the run's
    end, a stop, the fixed point). ``at_once``: whether the first ``due`` on the way is True (a curve is drawn at
    once; a state is first saved ``seconds`` after the start)."""

    def __init__(self, seconds: float, at_once: bool = True) -> None:
        self.seconds = seconds
        self._last = float("-inf") if at_once else time.monotonic()

    def due(self, final: bool) -> bool:
        """Whether to do it now; a True answer counts as done."""
        now = time.monotonic()
        if final or now - self._last >= self.seconds:
            self._last = now
            return True
        return False
