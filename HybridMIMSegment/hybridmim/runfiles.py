"""The files a training run writes beside its model, named without importing torch (the Slicer panel
looks for them in its own process)."""

from __future__ import annotations

from pathlib import Path

RECORD_SUFFIX = ".run.json"


def _beside(output: Path, suffix: str) -> Path:
    return output.with_name(output.name.removesuffix(".safetensors") + suffix)


STATE_SUFFIX = ".resume.pt"


def state_path(output: Path) -> Path:
    """Where the resume state of a run writing ``output`` lives."""
    return _beside(output, STATE_SUFFIX)


def model_of_state(path: Path) -> Path | None:
    """The model written beside the resume state ``path``; None for a file not named as a resume state."""
    return path.with_name(path.name.removesuffix(STATE_SUFFIX) + ".safetensors") if path.name.endswith(
        STATE_SUFFIX) else None


def curve_path(output: Path) -> Path:
    return _beside(output, ".curve.png")


def record_path(output: Path) -> Path:
    """Where the Slicer panel keeps the record of its run writing ``output`` (HybridMIMSegmentLib.trainingruns)."""
    return _beside(output, RECORD_SUFFIX)
