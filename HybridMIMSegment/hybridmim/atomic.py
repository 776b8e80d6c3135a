"""Outputs are written atomically (temporary file, then rename), never
overwrite an existing file unless asked to, and belong to one run at a time."""

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


def _try_lock(handle) -> bool:
    """An exclusive, non-blocking lock on an open file; the OS drops it when the process dies."""
    try:
        if os.name == "nt":
            import msvcrt

            msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)
        else:
            import fcntl

            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


@contextmanager
def output_lock(path: str | Path):
    """Held while a run writes ``path``: a second run for the same output refuses instead of interleaving.

    The lock is a file in the cache's ``locks`` folder named after the output's real
    path (nothing is left beside the output, even when a run is killed); the OS
    releases it when its process ends, so a stale file never blocks the next run.
    """
    import hashlib

    from .download import cache_dir

    path = Path(os.path.realpath(path))
    lock = cache_dir() / "locks" / f"{hashlib.sha256(str(path).encode('utf-8')).hexdigest()[:32]}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(lock, "a+")
        if not _try_lock(handle):
            handle.close()
            raise UserError(f"{path}: another run is writing this output now; wait for it to end or choose another name")
        try:  # the file may have been removed by the previous holder between open and lock: take a fresh one
            if os.stat(lock).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        try:
            lock.unlink()  # while still held; Windows cannot remove an open file: it stays, unlocked, reusable
        except OSError:
            pass
        handle.close()
