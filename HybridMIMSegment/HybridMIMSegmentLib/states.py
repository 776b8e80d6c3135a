"""The panel's processing states and what each shows: one function drives the Apply/Cancel
button, the progress bar and the status line, so the GUI cannot end up half-updated."""

from __future__ import annotations

import time
from dataclasses import dataclass
from enum import Enum


class State(Enum):
    IDLE = "idle"
    STARTING = "starting"
    RUNNING = "running"
    IMPORTING = "importing"
    DONE = "done"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"
    FAILED = "failed"


# Which state may follow which; anything else is a bug in the caller.
TRANSITIONS = {
    State.IDLE: {State.STARTING},
    State.STARTING: {State.RUNNING, State.FAILED, State.CANCELLING},
    State.RUNNING: {State.IMPORTING, State.FAILED, State.CANCELLING},
    State.IMPORTING: {State.DONE, State.FAILED},
    # a training run asked to stop ends normally (its state saved) or may still fail
    State.CANCELLING: {State.CANCELLED, State.IMPORTING, State.FAILED},
    State.DONE: {State.STARTING, State.IDLE},
    State.CANCELLED: {State.STARTING, State.IDLE},
    State.FAILED: {State.STARTING, State.IDLE},
}

BUSY = {State.STARTING, State.RUNNING, State.IMPORTING, State.CANCELLING}
# A stage's time left is shown once its progress has been timed this long (the first steps say little).
_ESTIMATE_AFTER_SECONDS = 5.0


@dataclass(frozen=True)
class View:
    """What the panel shows in a state."""

    button_text: str
    button_enabled: bool
    inputs_enabled: bool
    progress_visible: bool
    status: str


def time_left_text(seconds: float) -> str:
    if seconds < 60:
        return f"about {max(5, round(seconds / 5) * 5)} s left"
    minutes = round(seconds / 60)
    if minutes < 60:
        return f"about {minutes} min left"
    return f"about {minutes // 60} h {minutes % 60} min left" if minutes % 60 else f"about {minutes // 60} h left"


class Processing:
    """The current state, its stage, percent and time left, and the view they make. ``clock``: seconds, for the
    time left (a run's stages may alternate, fine-tuning's steps with each epoch's validation: a stage's pace is
    measured from its first progress in the run, the other stages' time included; a stage whose count starts
    again, each epoch's validation of its cases, from the first progress of its new pass)."""

    def __init__(self, action: str = "Apply", clock=time.monotonic):
        self.action = action
        self.state = State.IDLE
        self.stage = ""
        self.percent = 0
        self.message = ""
        self._clock = clock
        self._progress: dict[str, tuple[int, int]] = {}  # stage → its latest (done, total)
        self._first: dict[str, tuple[float, int]] = {}  # stage → (time, done) of its first progress in the run

    def go(self, state: State, message: str = "") -> View:
        if state not in TRANSITIONS[self.state]:
            raise ValueError(f"cannot go from {self.state.value} to {state.value}")
        self.state, self.message = state, message
        if state is State.STARTING:
            self.stage, self.percent = "starting", 0
            self._progress, self._first = {}, {}
        return self.view()

    def remind(self, message: str) -> View:
        """A note shown while idle, before any run of this session (a run stopped in an earlier one)."""
        if self.state is not State.IDLE:
            raise ValueError(f"a reminder is for an idle panel, not a {self.state.value} one")
        self.message = message
        return self.view()

    def on_event(self, event: dict) -> View:
        """Follow a progress-protocol event of the running engine."""
        if self.state is State.STARTING and event["event"] in ("stage", "progress", "message"):
            self.state = State.RUNNING
        if event["event"] == "stage":
            self.stage = event["name"]
            done, total = self._progress.get(self.stage, (0, 0))
            if total and done >= total:  # a stage that ended and starts again: each epoch's validation
                del self._progress[self.stage]
                self._first.pop(self.stage, None)
                done = total = 0
            self.percent = int(100 * done / total) if total else 0
        elif event["event"] == "progress" and event["total"]:
            self._progress[event["stage"]] = (event["done"], event["total"])
            self._first.setdefault(event["stage"], (self._clock(), event["done"]))  # a resumed run starts midway
            self.percent = int(100 * event["done"] / event["total"])
        return self.view()

    def seconds_left(self) -> float | None:
        """The current stage's time left at its pace so far, or None before that pace is known."""
        if self.stage not in self._first:
            return None
        (started, first), (done, total) = self._first[self.stage], self._progress[self.stage]
        elapsed = self._clock() - started
        if done <= first or elapsed < _ESTIMATE_AFTER_SECONDS:
            return None
        return elapsed / (done - first) * (total - done)

    def _running_status(self) -> str:
        if self.stage not in self._progress:  # no progress yet (or none in this stage): no percent to show
            return f"{self.stage.capitalize()}…"
        left = self.seconds_left()
        return f"{self.stage.capitalize()}: {self.percent}%" + (f" ({time_left_text(left)})" if left else "")

    def view(self) -> View:
        busy = self.state in BUSY
        if self.state is State.CANCELLING:
            button, enabled = "Cancelling…", False
        elif busy and self.state is not State.IMPORTING:
            button, enabled = "Cancel", True
        else:
            button, enabled = self.action, not busy
        status = {
            State.IDLE: self.message,
            State.STARTING: "Starting…",
            State.RUNNING: self._running_status(),
            State.IMPORTING: "Loading the result into the scene…",
            State.DONE: self.message or "Done.",
            State.CANCELLING: "Cancelling…",
            State.CANCELLED: "Cancelled: nothing was changed.",
            State.FAILED: f"Failed: {self.message}" if self.message else "Failed.",
        }[self.state]
        return View(button, enabled, not busy, busy, status)
