"""Outputs are written atomically (temporary file, then rename), never
overwrite an existing file unless asked to, and belong to one run at a time."""

from __future__ import annotations

import errno
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import DiskFull, UserError

# The file system's refusals of a write (rather than faults of ours): reported in one line. By name:
# Windows' errno lacks some of them (EDQUOT).
_REFUSED_WRITES = {getattr(errno, name) for name in ("ENOSPC", "EROFS", "EACCES", "EPERM", "EDQUOT", "ENOENT",
                                                     "ENOTDIR") if hasattr(errno, name)}
_NO_ROOM = {getattr(errno, name) for name in ("ENOSPC", "EDQUOT") if hasattr(errno, name)}
# Multi-part suffixes that image writers pick their format by.
_COMPOUND_SUFFIXES = (".seg.nrrd", ".nii.gz")


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in _COMPOUND_SUFFIXES:
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix


def _check_writable_place(path: Path) -> None:
    """Refuse an output whose folder could not be made or written in: the nearest folder that exists
    must be a folder, and writable (as far as permissions tell)."""
    existing = path.parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{path}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{path}: cannot be written: no permission to write in {existing}")


def make_folder(folder: Path, what: str) -> Path:
    """``folder``, made if missing; a one-line UserError saying ``what`` it is for when it cannot be made."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"{folder}: cannot make {what}: {exc.strerror}") from None
    return folder


def check_new_output(path: str | Path, overwrite: bool) -> Path:
    """Refuse (before any work is done) an output that exists, unless ``overwrite``, or that cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path}: is a folder; give a file name")
    if path.exists() and not overwrite:
        raise UserError(f"{path}: already exists; pass --overwrite to replace it")
    _check_writable_place(path)
    return path


def check_inputs_kept(inputs, outputs) -> None:
    """Refuse outputs that would replace one of the inputs."""
    targets = {Path(p).resolve() for p in outputs if p is not None}
    for source in inputs:
        if Path(source).resolve() in targets:
            raise UserError(f"{source}: an output would overwrite this input")


@contextmanager
def atomic_output(path: Path):
    """Yields a temporary path beside ``path`` (same suffix); renamed over it on success.

    A write that the file system refuses (full, read-only, no permission) is a one-line UserError.
    """
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)] if suffix else path.name
    tmp = path.with_name(f".{stem}.partial-{os.getpid()}{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        if exc.errno not in _REFUSED_WRITES:
            raise
        refusal = DiskFull if exc.errno in _NO_ROOM else UserError
        raise refusal(f"{path}: cannot be written: {exc.strerror}") from None
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
    make_folder(lock.parent, "the folder for run locks (set HYBRIDMIM_CACHE to a writable folder)")
    while True:
        handle = open(lock, "a+")
        if not _try_lock(handle):
            handle.close()
            raise UserError(f"{path}: another run is writing this output now; "
                            "wait for it to end or choose another name")
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
