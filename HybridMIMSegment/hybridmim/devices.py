"""Which device a run uses, decided without importing torch where no GPU can be present.

Importing torch takes 1.4-2.9 s of a cold start on a 2-core CPU, and the CPU path
(OpenVINO) does not need it. A GPU cannot be used without its driver, so torch
is asked only where a driver's traces exist; where they do, torch decides.
"""

from __future__ import annotations

import importlib
import os
import sys
import threading
from pathlib import Path

from .errors import UserError
from .progress import Reporter

# NVIDIA's driver (Linux), ROCm's kernel driver (AMD GPUs behind torch.cuda), WSL's GPU bridge
_LINUX_DRIVER_TRACES = ("/proc/driver/nvidia/version", "/dev/nvidiactl", "/dev/kfd", "/dev/dxg")


def gpu_driver_present() -> bool:
    """Whether this machine may have a GPU torch can use (False only where it certainly has none)."""
    if sys.platform.startswith("linux"):
        return any(os.path.exists(path) for path in _LINUX_DRIVER_TRACES)
    if sys.platform == "win32":
        return (Path(os.environ.get("SystemRoot", r"C:\Windows")) / "System32" / "nvcuda.dll").exists()
    return sys.platform != "darwin"  # macOS has no CUDA; elsewhere, ask torch


def gpu_may_run(requested: str) -> bool:
    """Whether a run asking for ``requested`` may use a GPU (and so import torch to decide)."""
    return requested in ("auto", "cuda") and gpu_driver_present()


def start_torch_imports() -> threading.Thread:
    """Import torch and the networks (MONAI's blocks) and start CUDA where it is present, on a thread: for a run
    that builds a torch network, while its scan is read (SimpleITK releases the GIL). Measured on a 512×512×400 CT
    (2-core CPU, the torch network on the CPU): ready for the first window 4.2-4.4 s after the start instead of
    5.2-5.6 s (docs/benchmarks/inference.md). What fails here the run does again itself and says."""
    def imports() -> None:
        try:
            import torch

            importlib.import_module(f"{__package__}.networks")  # with MONAI's blocks, 2-3 s of it
            if torch.cuda.is_available():
                torch.cuda.init()
        except Exception:  # noqa: BLE001 - the run imports and starts CUDA again itself, and says what fails
            pass

    thread = threading.Thread(target=imports, name="torch-imports")
    thread.start()
    return thread


def resolve_device(requested: str, reporter: Reporter) -> str:
    """``cpu`` or ``cuda``. ``auto``: CUDA when present, else CPU; ``cuda`` without CUDA falls back
    to the CPU and says so."""
    if requested not in ("auto", "cpu", "cuda"):
        raise UserError(f"unknown device {requested!r} (use auto, cpu or cuda)")
    if requested == "cpu":
        return "cpu"
    if gpu_may_run(requested):
        import torch

        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            reporter.info(f"using GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB)")
            return "cuda"
    if requested == "cuda":
        reporter.warning("CUDA was requested but no usable GPU was found: running on the CPU (slower)")
    else:
        reporter.info("no GPU found: running on the CPU")
    return "cpu"
