"""A checkpoint's network as a cached ONNX model, run by OpenVINO: the CPU path without torch.

On a 2-core CPU torch is most of what remains of a cold start and of the memory on
small scans: importing it takes 1.4-2.9 s and leaves ~220 MB resident, and building
a network imports MONAI (2 s more). OpenVINO imports in 0.3 s and runs a window in
half of torch's time, 0.55-0.65 of ONNX Runtime's (docs/benchmarks/inference.md). The
first CPU run with a checkpoint builds the network with torch, exports it and keeps
the export in the cache only when OpenVINO reproduces the network's output on a
probe window; later runs load it without importing torch. The file's name carries
everything it depends on (the checkpoint's bytes, torch, MONAI, OpenVINO and this
package's network code), so a changed ingredient never reuses a stale export; the
exports least recently used go once the folder passes _CACHE_BYTES. Only
OpenVINO's runtime is used (read, compile, infer), and without its telemetry (``_core_once``).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import threading
import time
import warnings
from concurrent.futures import Future
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np

from .download import cache_dir, file_sha256
from .progress import Reporter
from .windows import blend_windows, gaussian_weights

_NETWORK_CODE = Path(__file__).with_name("networks.py")
# The largest difference from the network an export may show on the probe window, relative to the
# output's largest magnitude (measured: 1e-5 on the probe, 2.6e-3 on a window that is mostly padding)
_TOLERANCE = 1e-3
# What the exports may take together: every fine-tuned model leaves one (23 MB for the shipped U-Nets), and an
# upgrade of torch, MONAI or OpenVINO re-keys them all, so without a bound the folder only grows
_CACHE_BYTES = 1 << 30
# An export takes seconds; a partial file left this long is one whose process was killed
_ABANDONED_SECONDS = 24 * 3600


class OnnxNetwork:
    """An OpenVINO-compiled export with what inference reads from a network: windows in, outputs out."""

    def __init__(self, compiled, out_channels: int):
        self.request, self.out_channels = compiled.create_infer_request(), out_channels

    def __call__(self, windows: np.ndarray) -> np.ndarray:
        """The outputs (n, out_channels, z, y, x) of ``n`` windows, one at a time (the export's batch)."""
        # copied: the request reuses its output buffer for the next window
        outputs = [self.request.infer({0: window[None]})[0].copy() for window in windows]
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs)

    def sliding_window(self, volume: np.ndarray, roi_size, overlap: float, reporter: Reporter) -> np.ndarray:
        """The output (out_channels, z, y, x) over a model input ``volume`` (channels, z, y, x), blended
        in host memory (``windows.blend_windows``), one window at a time."""
        return blend_windows(self, volume, roi_size, overlap, 1, gaussian_weights(roi_size),
                             lambda shape: np.zeros(shape, np.float32), reporter)


def _version(package: str) -> str:
    try:
        return version(package)
    except PackageNotFoundError:
        return "none"


def onnx_path(checkpoint: Path) -> Path:
    """Where the ONNX export of ``checkpoint`` is cached."""
    ingredients = [file_sha256(checkpoint), *(_version(p) for p in ("torch", "monai", "openvino")),
                   hashlib.sha256(_NETWORK_CODE.read_bytes()).hexdigest()]
    key = hashlib.sha256("\n".join(ingredients).encode()).hexdigest()[:32]
    return cache_dir() / "onnx" / f"{checkpoint.stem}-{key}.onnx"


_CORE_LOCK = threading.Lock()


def _openvino_core():
    """One OpenVINO Core for the process. Its CPU plugin replaces the thread's alternate signal stack and
    puts the previous one back when the Core goes; two Cores freed in the order they were made leave a
    freed stack in place, and the next signal (a Stop's SIGTERM) then crashes the process. Made under a
    lock: the compiling thread (``start_compiling_cached_export``) and the run may ask at once."""
    with _CORE_LOCK:
        return _core_once()


@functools.cache
def _core_once():
    # `import openvino` imports its model converter, which sends a usage event to Google Analytics (from a forked
    # process) and keeps a client id under ~/intel, unless the user opted out; where its telemetry package cannot
    # be imported it takes its own stub: nothing about a run leaves the machine
    sys.modules.setdefault("openvino_telemetry", None)
    import openvino

    return openvino.Core()


def openvino_runs_here(reporter: Reporter) -> bool:
    """Whether OpenVINO can run exports here; where it cannot, the torch network runs instead, said
    once, rather than an export made and dropped every run."""
    try:
        _openvino_core()
    except Exception as error:  # noqa: BLE001 - not installed, no wheel for this platform, a broken install
        reporter.info(f"OpenVINO cannot run here ({error.__class__.__name__}: {error}); the model runs on torch "
                      "(slower on the CPU)")
        return False
    return True


def _session(path: Path, meta) -> OnnxNetwork:
    # latency: one window's convolutions spread over all cores; f32: CPUs with bf16 units would otherwise
    # round the network to bf16 by default and move its labels away from torch's
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_PRECISION_HINT": "f32"}
    return OnnxNetwork(_openvino_core().compile_model(str(path), "CPU", config), int(meta.network["out_channels"]))


# Cached exports being compiled on a thread, by path: cached_onnx_network takes the network from there
_compiling: dict[Path, Future] = {}


def start_compiling_cached_export(checkpoint: Path, meta) -> None:
    """Compile the cached export of ``checkpoint`` (if there is one) on a thread: for a CPU run, while its scan is
    read (SimpleITK and OpenVINO release the GIL); ``cached_onnx_network`` then takes the network. On a 2-core CPU
    the read of a 512×512×400 CT (1.0-1.2 s) and the compile (0.5 s with OpenVINO's import) then end together.
    Nothing is said here: where the compile fails, cached_onnx_network says so."""
    path = onnx_path(Path(checkpoint))
    if path in _compiling or not path.is_file():
        return
    future = _compiling[path] = Future()

    def compile_export() -> None:
        try:
            future.set_result(_session(path, meta))
        except BaseException as error:  # noqa: BLE001 - handed to the run, which says it
            future.set_exception(error)

    threading.Thread(target=compile_export, name="openvino-compile").start()


def cached_onnx_network(checkpoint: Path, meta, reporter: Reporter) -> OnnxNetwork | None:
    """The cached export of ``checkpoint`` (metadata ``meta``) compiled by OpenVINO (by the thread that
    ``start_compiling_cached_export`` started, where it did), or None where there is none (an unreadable one is
    said and left to be replaced)."""
    path = onnx_path(Path(checkpoint))
    started = _compiling.pop(path, None)
    if started is None and not path.is_file():
        return None
    try:
        network = started.result() if started else _session(path, meta)
    except Exception as error:  # noqa: BLE001 - a cache is never worth a failed run
        reporter.warning(f"ignoring an unreadable cached ONNX model ({error.__class__.__name__}); rebuilding it")
        return None
    _mark_used(path)
    return network


def export_onnx_network(network, checkpoint: Path, meta, reporter: Reporter) -> OnnxNetwork | None:
    """Export the built ``network`` of ``checkpoint`` to the cache, check it on a probe window and
    return it compiled; None (said) where it cannot be exported or does not reproduce the network."""
    path = onnx_path(Path(checkpoint))
    try:
        _export_checked(network, meta, path)
        _prune_exports(keep=path)
        return _session(path, meta)
    except Exception as error:  # noqa: BLE001 - e.g. an operator without an ONNX form: torch runs it instead
        reporter.info(f"the model runs on torch: its ONNX export failed ({error})")
        return None


def _mark_used(path: Path) -> None:
    """Date ``path`` now, so that pruning goes by last use rather than by when the export was made."""
    try:
        os.utime(path)
    except OSError:  # a read-only cache: it is not pruned by this process either
        pass


def _prune_exports(keep: Path) -> None:
    """Remove the least recently used exports beside ``keep`` (never ``keep``) until the rest fit in
    _CACHE_BYTES, and exports left half-written by a killed process; a file that another process removes
    meanwhile or holds open is passed over."""
    exports = []
    for path in keep.parent.glob("*.onnx"):
        partial = path.name.startswith(".")  # atomic_output's file: being written, or left by a killed process
        try:
            status = path.stat()
            if partial and time.time() - status.st_mtime > _ABANDONED_SECONDS:
                path.unlink()
        except OSError:
            continue
        if not partial:
            exports.append((path != keep, -status.st_mtime, status.st_size, path))
    total = 0
    for _, _, size, path in sorted(exports):  # ``keep`` first, then the most recently used
        total += size
        if total > _CACHE_BYTES and path != keep:
            try:
                path.unlink()
                total -= size
            except OSError:
                pass


def _export_checked(network, meta, path: Path) -> None:
    """Export ``network`` for one window, check OpenVINO's output on a probe window, save atomically."""
    import torch

    from .atomic import atomic_output

    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((1, int(meta.network["in_channels"]), *meta.roi_size), generator=generator)
    with atomic_output(path) as tmp:
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            # the exporter's warnings are about its deprecation and generality; the check below decides
            warnings.simplefilter("ignore")
            torch.onnx.export(network.eval(), (probe,), str(tmp), dynamo=False, input_names=["window"],
                              output_names=["output"], opset_version=17)
            expected = network(probe).numpy()
        found = _session(tmp, meta)(probe.numpy())
        if found.shape != expected.shape:
            raise ValueError(f"OpenVINO's output has shape {found.shape}, the network's {expected.shape}")
        difference = float(np.abs(found - expected).max())
        if difference > _TOLERANCE * max(1.0, float(np.abs(expected).max())):
            raise ValueError(f"OpenVINO's output differs from the network's by up to {difference:.2g}")
