"""A checkpoint's network as a cached TorchScript trace, for inference on the CPU.

Building a network imports MONAI, which takes 2 s of a cold start's 3 s budget on
a 2-core CPU (measured: torch 1.3 s, MONAI 2.0 s more). The first run with a
checkpoint builds the network, traces it and keeps the trace in the cache; later
runs load the trace in about 0.1 s without importing MONAI. A trace is kept only
when it reproduces the built network's output on probe windows, and its name
carries everything it depends on (the checkpoint's bytes, torch, MONAI and this
package's network code), so a changed ingredient never reuses a stale trace.
"""

from __future__ import annotations

import hashlib
import warnings
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from .download import cache_dir, file_sha256
from .progress import Reporter

_NETWORK_CODE = Path(__file__).with_name("networks.py")


class TracedNetwork(torch.nn.Module):
    """A traced network with the attribute inference reads from a built one."""

    def __init__(self, module: torch.nn.Module, out_channels: int):
        super().__init__()
        self.module, self.out_channels = module, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def trace_path(checkpoint: Path) -> Path:
    """Where the trace of ``checkpoint`` is cached."""
    try:
        monai_version = version("monai")
    except PackageNotFoundError:
        monai_version = "none"
    ingredients = [file_sha256(checkpoint), torch.__version__, monai_version,
                   hashlib.sha256(_NETWORK_CODE.read_bytes()).hexdigest()]
    key = hashlib.sha256("\n".join(ingredients).encode()).hexdigest()[:32]
    return cache_dir() / "traced" / f"{checkpoint.stem}-{key}.pt"


def load_for_inference(checkpoint: Path, meta, device: torch.device, reporter: Reporter, trace: bool = True):
    """(the network for ``checkpoint`` (metadata ``meta``) on ``device``, whether it is a cached trace).

    On the CPU a cached trace is loaded when there is one; otherwise the network is built and
    a trace cached for the next run. A GPU always gets the built network (autocast applies to it),
    and so does a caller that needs more than its forward (``trace=False``).
    """
    from .checkpoint import load_model

    if device.type != "cpu" or not trace:
        return load_model(checkpoint, device)[1], False
    cached = trace_path(Path(checkpoint))
    if cached.is_file():
        try:
            module = torch.jit.load(str(cached), map_location="cpu")
            return TracedNetwork(module, int(meta.network["out_channels"])), True
        except Exception as error:  # noqa: BLE001 - a cache is never worth a failed run
            reporter.warning(f"ignoring an unreadable cached trace of the model ({error.__class__.__name__}); rebuilding it")
    _, network = load_model(checkpoint, device)
    try:
        _save_trace(network, meta, cached)
    except Exception as error:  # noqa: BLE001 - e.g. a network torch cannot trace, or a torch without TorchScript
        reporter.info(f"the model could not be cached for a faster start next time: {error}")
    return network, False


def _save_trace(network: torch.nn.Module, meta, path: Path) -> None:
    """Trace ``network`` on a probe window, check it on batches of one and two windows, then save it atomically."""
    from .atomic import atomic_output

    generator = torch.Generator().manual_seed(0)
    probe = torch.rand((2, int(meta.network["in_channels"]), *meta.roi_size), generator=generator)
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the tracer's warnings are about generality; the checks below are what decides
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(network, probe[:1], check_trace=False)
        for size in (1, 2):
            expected, found = network(probe[:size]), traced(probe[:size])
            if found.shape != expected.shape or not torch.allclose(found, expected, rtol=1e-4, atol=1e-4):
                raise ValueError(f"its trace differs from the network on a batch of {size}")
        with atomic_output(path) as tmp:
            torch.jit.save(traced, str(tmp))
