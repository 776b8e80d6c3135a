"""The panel's processing states and what each shows: one function drives the Apply/Cancel
button, the progress bar and the status line, so the GUI cannot end up half-updated."""

from __future__ import annotations

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


@dataclass(frozen=True)
class View:
    """What the panel shows in a state."""

    button_text: str
    button_enabled: bool
    inputs_enabled: bool
    progress_visible: bool
    status: str


class Processing:
    """The current state, its stage and percent, and the view they make."""

    def __init__(self, action: str = "Apply"):
        self.action = action
        self.state = State.IDLE
        self.stage = ""
        self.percent = 0
        self.message = ""

    def go(self, state: State, message: str = "") -> View:
        if state not in TRANSITIONS[self.state]:
            raise ValueError(f"cannot go from {self.state.value} to {state.value}")
        self.state, self.message = state, message
        if state is State.STARTING:
            self.stage, self.percent = "starting", 0
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
            self.stage, self.percent = event["name"], 0
        elif event["event"] == "progress" and event["total"]:
            self.percent = int(100 * event["done"] / event["total"])
        return self.view()

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
            State.RUNNING: f"{self.stage.capitalize()}: {self.percent}%",
            State.IMPORTING: "Loading the result into the scene…",
            State.DONE: self.message or "Done.",
            State.CANCELLING: "Cancelling…",
            State.CANCELLED: "Cancelled: nothing was changed.",
            State.FAILED: f"Failed: {self.message}" if self.message else "Failed.",
        }[self.state]
        return View(button, enabled, not busy, busy, status)
