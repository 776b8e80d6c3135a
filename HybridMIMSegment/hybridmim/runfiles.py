"""The files a training run writes beside its model, named without importing torch (the Slicer panel
looks for them in its own process)."""

from __future__ import annotations

from pathlib import Path

RECORD_SUFFIX = ".run.json"


def _beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name.removesuffix(".safetensors") + suffix)


def state_path(output: Path) -> Path:
    """Where the resume state of a run writing ``output`` lives."""
    return _beside(output, ".resume.pt")


def curve_path(output: Path) -> Path:
    return _beside(output, ".curve.png")


def record_path(output: Path) -> Path:
    """Where the Slicer panel keeps the record of its run writing ``output`` (HybridMIMSegmentLib.trainingruns)."""
    return _beside(output, RECORD_SUFFIX)
