"""Progress reporting: JSON lines for programs (the Slicer module), tqdm for people.

Protocol (one JSON object per line on stdout, see docs/PROGRESS.md):
  {"event": "stage", "name": "inference"}
  {"event": "progress", "stage": "inference", "done": 12, "total": 40}
  {"event": "metric", "step": 3, "loss": 0.41, ...}
  {"event": "message", "level": "info" | "warning", "text": "..."}
  {"event": "done", "outputs": {...}}
  {"event": "error", "message": "..."}
This module must stay importable without torch: the Slicer module parses with it.
"""

from __future__ import annotations

import json
import math
import sys
from typing import Any, TextIO

EVENTS = ("stage", "progress", "metric", "message", "done", "error")
# A segment's mean intensity in input channel NAME is ``MEAN_PREFIX + NAME`` in ``done``'s ``segments``.
MEAN_PREFIX = "mean_"


def edge_text(sides: list[str]) -> str:
    """A segment's ``at_edge`` (the sides of the body at which it reaches the scan's edge) in words:
    "superior edge", "superior and left edges"."""
    return f"{' and '.join(sides)} edge{'s' if len(sides) > 1 else ''}"


def _plain(value: Any) -> Any:
    """JSON-safe value: numpy scalars become Python numbers, NaN/Inf become null."""
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def encode_event(event: str, **fields: Any) -> str:
    if event not in EVENTS:
        raise ValueError(f"unknown progress event {event!r}")
    return json.dumps({"event": event, **_plain(fields)}, allow_nan=False)


def parse_event(line: str) -> dict | None:
    """The event a protocol line carries, or None for a line that is not one.

    Tolerant by design: the engine's dependencies may print to stdout too.
    """
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    if not isinstance(obj, dict) or obj.get("event") not in EVENTS:
        return None
    return obj


class Reporter:
    """Reports stages, progress, metrics and messages in one of three modes.

    ``json``: protocol lines on stdout; ``tqdm``: progress bars and messages
    on stderr; ``quiet``: warnings only.
    """

    def __init__(self, mode: str = "tqdm", stream: TextIO | None = None):
        if mode not in ("json", "tqdm", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.mode = mode
        self._stream = stream
        self._stage: str | None = None
        self._bar = None

    @property
    def stream(self) -> TextIO:
        return self._stream or (sys.stdout if self.mode == "json" else sys.stderr)

    def _emit(self, event: str, **fields: Any) -> None:
        self.stream.write(encode_event(event, **fields) + "\n")
        self.stream.flush()

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def stage(self, name: str) -> None:
        self._close_bar()
        self._stage = name
        if self.mode == "json":
            self._emit("stage", name=name)

    def progress(self, done: int, total: int) -> None:
        if self.mode == "json":
            self._emit("progress", stage=self._stage, done=done, total=total)
        elif self.mode == "tqdm":
            if self._bar is None or self._bar.total != total:
                from tqdm import tqdm

                self._close_bar()
                # started at ``done``: what was done before the bar (a resumed run, a total changed by a time
                # limit) took no time of the bar's, and counting it would make its rate and time left nonsense
                self._bar = tqdm(total=total, initial=done, desc=self._stage, file=self.stream, leave=False,
                                 dynamic_ncols=True)
            self._bar.update(done - self._bar.n)

    def metric(self, **values: Any) -> None:
        if self.mode == "json":
            self._emit("metric", **values)
        elif self.mode == "tqdm":
            text = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())
            self._write_line(text)

    def info(self, text: str) -> None:
        if self.mode == "json":
            self._emit("message", level="info", text=text)
        elif self.mode == "tqdm":
            self._write_line(text)

    def warning(self, text: str) -> None:
        if self.mode == "json":
            self._emit("message", level="warning", text=text)
        else:
            self._write_line(f"warning: {text}")

    def done(self, outputs: dict[str, Any]) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit("done", outputs=outputs)

    def error(self, message: str) -> None:
        self._close_bar()
        if self.mode == "json":
            self._emit("error", message=message)

    def _write_line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        else:
            self.stream.write(text + "\n")
            self.stream.flush()
