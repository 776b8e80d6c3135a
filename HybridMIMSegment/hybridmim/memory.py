"""Memory estimates made before a run, so that a scan too large for this machine is
refused with a number instead of crashing it half-way."""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

GIB = 2**30
MIB = 2**20
# Python with torch, SimpleITK and numpy imported (430 MiB measured), and MONAI (120 MiB): a model's first
# run on the CPU imports both to build the network it exports to ONNX (onnxnet.py), and a GPU run imports
# torch; with a margin for other CPUs' convolution buffers. Later CPU runs import neither (0.4 GiB less).
BASE_BYTES = int(0.7 * GIB)
# A torch built for GPUs (CUDA or ROCm: what the PyTorch extension installs where there is one) maps its GPU
# libraries when imported, on a CPU run too: 284 MiB more resident than the CPU build (torch 2.13, measured)
GPU_BUILD_BYTES = int(0.3 * GIB)


def is_gpu_build(version_file: Path) -> bool:
    """Whether torch's ``version.py`` names a CUDA or ROCm version (the CPU build's are None)."""
    try:
        text = version_file.read_text(encoding="utf-8")
    except OSError:
        return False
    return re.search(r"^(cuda|hip)\b[^=\n]*=\s*['\"]", text, re.MULTILINE) is not None


@functools.lru_cache(maxsize=1)
def torch_build_bytes() -> int:
    """What the installed torch adds to BASE_BYTES: GPU_BUILD_BYTES for a GPU build, else 0; told from its files,
    without the import (seconds, which a cold start cannot spare before its memory check)."""
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.submodule_search_locations:
        return 0
    return GPU_BUILD_BYTES if is_gpu_build(Path(list(spec.submodule_search_locations)[0]) / "version.py") else 0


def _proc_bytes(path: str, field: str) -> int | None:
    """A "Field:  N kB" line of a Linux /proc file, in bytes; None where there is no such file or line."""
    try:
        with open(path, encoding="ascii") as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_bytes() -> int | None:
    """Memory the OS can give this process now, or None where it cannot be told."""
    available = _proc_bytes("/proc/meminfo", "MemAvailable")
    if available is not None:
        return available
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


@dataclass(frozen=True)
class ScanHeader:
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    voxel_bytes: int  # one voxel as stored (every component)


def scan_header(path: str | Path) -> ScanHeader | None:
    """Size, spacing and voxel type from an image file's header without reading its voxels; None for
    folders (DICOM series) and for files whose header cannot be read (the reader says why later)."""
    import SimpleITK as sitk

    from .imageio import read_header

    header = read_header(path)
    if header is None:
        return None
    components = header.GetNumberOfComponents()
    one_voxel = sitk.Image([1, 1, 1], header.GetPixelID(), components)
    voxel_bytes = sitk.GetArrayViewFromImage(one_voxel).itemsize * components
    size, spacing = tuple(header.GetSize()), tuple(header.GetSpacing())
    if len(size) == 4:  # volumes of a Decathlon image, all read to take some: as a voxel's components
        return ScanHeader(size[:3], spacing[:3], voxel_bytes * size[3])
    return ScanHeader(size, spacing, voxel_bytes)


def window_bytes(network: dict, roi_size) -> int:
    """Peak memory of the network on two windows in inference mode: a model's first CPU run checks
    its ONNX export on one window with torch and one with OpenVINO (later runs take one at a
    time). One window, measured with torch for U-Nets with 16 and 32 full-resolution channels on 64³
    and 96³ windows (213–835 MiB): 104 MiB + 6.5 x the full-resolution feature map; rounded up here."""
    first_level = int(network.get("features", [network.get("feature_size", 48)])[0])
    return 128 * MIB + 2 * 7 * math.prod(roi_size) * first_level * 4


def segment_bytes(scan: ScanHeader, channels: int, meta) -> int:
    """Peak host memory of segmenting one scan (``channels`` files like ``scan``) with the model of
    ``meta`` (a checkpoint.ModelMeta) on the CPU.

    Input grid: the channels as stored, the label map and its copy while written. Model grid (before
    the foreground crop, so an upper bound): the resampled channels twice (oriented and normalised),
    the blended output and weight map in float32, the argmax. Measured against this estimate
    (Testing/test_reliability.py): a 512 x 512 x 400 CT on a model's first run, the worst case (1.23 GiB
    against 1.47 estimated; with torch's CUDA build, 1.53 against 1.77); later runs, without torch, need 0.8 GiB.
    """
    target_spacing = meta.preprocessing.spacing
    classes = int(meta.network["out_channels"])
    scale = [s / t for s, t in zip(scan.spacing, target_spacing)] if target_spacing else [1.0] * len(scan.size)
    model_voxels = math.prod(max(1, round(n * f)) for n, f in zip(scan.size, scale))
    on_input = math.prod(scan.size) * (channels * scan.voxel_bytes + 2)
    on_model = model_voxels * (channels * 8 + (classes + 1) * 4 + 9)
    return BASE_BYTES + torch_build_bytes() + window_bytes(meta.network, meta.roi_size) + on_input + on_model


def peak_rss_bytes() -> int:
    """This process's peak resident memory. On Linux from /proc (VmHWM): ``ru_maxrss`` of a child
    process also counts its parent's memory at the fork, so it overstates a child started by a big parent."""
    peak = _proc_bytes("/proc/self/status", "VmHWM")
    if peak is not None:
        return peak
    import resource  # POSIX (this is for benchmarks and tests, not for Windows)

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def check_fits(needed: int, what: str) -> None:
    """Refuse with both numbers when ``needed`` bytes exceed what this machine has available."""
    available = available_bytes()
    if available is not None and needed > available:
        raise UserError(f"{what} needs about {needed / GIB:.1f} GiB of memory and {available / GIB:.1f} GiB is "
                        "available; close other programs, or crop or downsample the scan first")
