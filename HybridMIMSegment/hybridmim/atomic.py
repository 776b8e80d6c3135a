"""Outputs are written atomically (temporary file, then rename) and never
overwrite an existing file unless asked to."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

# Multi-part suffixes that image writers pick their format by.
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz")


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def check_new_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse (before any work is done) an output that exists, unless ``overwrite``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    return path


def check_inputs_kept(inputs, outputs) -> None:
    """Refuse outputs that would replace one of the inputs."""
    targets = {Path(p).resolve() for p in outputs if p is not None}
    for source in inputs:
        if Path(source).resolve() in targets:
            raise UserError(f"{source}: an output would overwrite this input")


@contextmanager
def atomic_output(path: Path):
    """Yields a temporary path beside ``path`` (same suffix); renamed over it on success."""
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
