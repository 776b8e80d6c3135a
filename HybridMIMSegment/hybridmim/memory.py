"""Memory estimates made before a run, so that a scan too large for this machine is
refused with a number instead of crashing it half-way."""

from __future__ import annotations

import math
import os
from pathlib import Path

from .errors import UserError

GIB = 2**30
# Python, torch, the network and MONAI's buffers besides the arrays counted below.
BASE_BYTES = GIB // 2


def available_bytes() -> int | None:
    """Memory the OS can give this process now, or None where it cannot be told."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if os.name == "nt":
        import ctypes

        class _Status(ctypes.Structure):
            _fields_ = [("length", ctypes.c_ulong), ("load", ctypes.c_ulong), ("total", ctypes.c_ulonglong),
                        ("available", ctypes.c_ulonglong), ("page_total", ctypes.c_ulonglong),
                        ("page_available", ctypes.c_ulonglong), ("virtual_total", ctypes.c_ulonglong),
                        ("virtual_available", ctypes.c_ulonglong), ("extended", ctypes.c_ulonglong)]

        status = _Status(length=ctypes.sizeof(_Status))
        if ctypes.windll.kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
            return int(status.available)
        return None
    try:  # macOS and other POSIX systems: physical memory is the best bound they report
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def header_size(path: str | Path) -> tuple[tuple[int, ...], tuple[float, ...]] | None:
    """(size, spacing) from an image file's header without reading its voxels; None for folders
    (DICOM series) and for files whose header cannot be read (the reader says why later)."""
    from .imageio import read_header

    header = read_header(path)
    return None if header is None else (tuple(header.GetSize()), tuple(header.GetSpacing()))


def segment_bytes(size, spacing, channels: int, classes: int, target_spacing) -> int:
    """Peak host memory of segmenting one scan of ``size`` voxels at ``spacing`` mm on the CPU.

    Input grid: the channels as read and as float32, the label map written back. Model
    grid (before the foreground crop, so an upper bound): the resampled channels twice
    (oriented and normalised), the blended output and weight map in float32, the argmax.
    """
    input_voxels = math.prod(size)
    scale = [s / t for s, t in zip(spacing, target_spacing)] if target_spacing else [1.0] * len(size)
    model_voxels = math.prod(max(1, round(n * f)) for n, f in zip(size, scale))
    on_input = input_voxels * (channels * 8 + 2)
    on_model = model_voxels * (channels * 8 + (classes + 1) * 4 + 9)
    return BASE_BYTES + on_input + on_model


def check_fits(needed: int, what: str) -> None:
    """Refuse with both numbers when ``needed`` bytes exceed what this machine has available."""
    available = available_bytes()
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {needed / GIB:.1f} GiB of memory and {available / GIB:.1f} GiB is "
                        "available; close other programs, or crop or downsample the scan first")
