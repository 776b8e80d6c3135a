"""The engine (``python -m hybridmim …``) as a child process: progress events read on a
thread into a queue the GUI drains from a timer, and cancel that ends the whole process tree."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hybridmim.progress import parse_event

MODULE_DIR = Path(__file__).resolve().parents[1]  # holds the hybridmim package


@dataclass
class EngineResult:
    """How a finished run ended: ``outputs`` of its ``done`` event, or ``error`` in one line."""

    returncode: int
    outputs: dict | None = None
    error: str | None = None
    cancelled: bool = False
    log: list[str] = field(default_factory=list)

    @property
    def succeeded(self) -> bool:
        return self.returncode == 0 and not self.cancelled


class EngineProcess:
    """One engine run. ``python``: the interpreter to run it with (in Slicer: PythonSlicer)."""

    def __init__(self, arguments: list[str], python: str | None = None, env: dict | None = None):
        self.command = [python or sys.executable, "-m", "hybridmim", *map(str, arguments), "--progress", "json"]
        environment = dict(os.environ if env is None else env)
        environment["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(MODULE_DIR), environment.get("PYTHONPATH", "")) if p)
        environment["PYTHONUNBUFFERED"] = "1"
        self._env = environment
        self.events: queue.Queue = queue.Queue()
        self._stderr: list[str] = []
        self._last_error: str | None = None
        self._outputs: dict | None = None
        self._cancelled = False
        self._process: subprocess.Popen | None = None
        self._readers: list[threading.Thread] = []

    def start(self) -> None:
        own_group = {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP} if os.name == "nt" else \
            {"start_new_session": True}  # its own process group: cancel reaches its children too
        self._process = subprocess.Popen(self.command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                         encoding="utf-8", errors="replace", env=self._env, **own_group)
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        for line in self._process.stdout:
            event = parse_event(line)
            if event is None:
                continue
            if event["event"] == "error":
                self._last_error = event.get("message")
            elif event["event"] == "done":
                self._outputs = event.get("outputs")
            self.events.put(event)

    def _read_stderr(self) -> None:
        for line in self._process.stderr:
            self._stderr.append(line.rstrip("\n"))

    def poll(self, timeout: float = 0.0) -> tuple[list[dict], EngineResult | None]:
        """The events that arrived since the last call and, once the run has ended (within ``timeout`` seconds),
        its result. Its output is read to the end before the events are taken: the lines it wrote last (a final
        warning, the stop's note) come with the result, not after it, when nothing takes them any more."""
        try:
            result = self.wait(timeout)
        except subprocess.TimeoutExpired:
            result = None
        return self.drain(), result

    def drain(self) -> list[dict]:
        """The events that arrived since the last call."""
        drained = []
        while True:
            try:
                drained.append(self.events.get_nowait())
            except queue.Empty:
                return drained

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        """Ask a training run to stop at the next step and save its state (``--resume`` continues it)."""
        if self.running:
            self._process.send_signal(signal.CTRL_BREAK_EVENT if os.name == "nt" else signal.SIGTERM)

    def finish(self, timeout: float) -> EngineResult:
        """Stop a training run and wait up to ``timeout`` seconds for it to save its state (the panel closing);
        a run that has not ended by then is cancelled (its last periodic save stays)."""
        self.stop()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.cancel()
            return self.wait()

    def cancel(self) -> None:
        """End the run and every process it started, at once (no chance to write anything more)."""
        if not self.running:
            return
        self._cancelled = True
        kill_tree(self._process.pid)

    def wait(self, timeout: float | None = None) -> EngineResult:
        returncode = self._process.wait(timeout)
        for reader in self._readers:
            reader.join(timeout=5)
        error = self._last_error
        if returncode != 0 and error is None and not self._cancelled:
            error = ended_by_signal(returncode) or \
                next((line for line in reversed(self._stderr) if line.strip()), f"exit code {returncode}")
        return EngineResult(returncode, self._outputs, error, self._cancelled, list(self._stderr))


def ended_by_signal(returncode: int) -> str | None:
    """What to tell of an engine that a signal ended (POSIX: return code -N) and that said nothing itself: its
    last stderr line would be some earlier warning. Killed from outside (not by Cancel) mostly means the system
    ran out of memory and its out-of-memory killer chose the engine, the largest process."""
    if returncode >= 0 or os.name == "nt":
        return None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL:
        return (f"the engine was killed ({name}), most often by the system when memory runs out: close other "
                "programs, or give it smaller scans or fewer crops at a time")
    return f"the engine crashed ({name}); the log holds what it wrote before"


def kill_tree(pid: int) -> None:
    """Kill ``pid`` and its descendants (psutil where present; else its process group)."""
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            parent = psutil.Process(pid)
            processes = parent.children(recursive=True) + [parent]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
        _wait_until_dead(processes, timeout=5)
    elif os.name == "nt":
        subprocess.run(["taskkill", "/T", "/F", "/PID", str(pid)], capture_output=True)
    else:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_until_dead(processes, timeout: float) -> None:
    """Wait until each (psutil) process is gone or a zombie. A killed grandchild stays a zombie until init
    reaps it, which can take seconds (psutil.wait_procs would wait for that); a zombie runs no more code."""
    import psutil

    deadline = time.monotonic() + timeout
    for process in processes:
        while time.monotonic() < deadline:
            try:
                if process.status() == psutil.STATUS_ZOMBIE:
                    break
            except psutil.NoSuchProcess:
                break
            time.sleep(0.01)


def run_to_end(arguments: list[str], python: str | None = None, on_event=None) -> EngineResult:
    """Run and wait (scripts and tests: ``process(..., waitForCompletion=True)``); ``on_event`` sees each event."""
    engine = EngineProcess(arguments, python)
    engine.start()
    result = None
    while result is None:
        events, result = engine.poll(timeout=0.2)
        for event in events:
            if on_event is not None:
                on_event(event)
    return result
