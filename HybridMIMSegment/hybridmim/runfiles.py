"""The files a training run writes beside its model, named without importing torch (the Slicer panel
looks for them in its own process)."""

from __future__ import annotations

from pathlib import Path


def state_path(output: Path) -> Path:
    """Where the resume state of a run writing ``output`` lives."""
    return output.with_name(output.name.removesuffix(".safetensors") + ".resume.pt")


def curve_path(output: Path) -> Path:
    return output.with_name(output.name.removesuffix(".safetensors") + ".curve.png")
