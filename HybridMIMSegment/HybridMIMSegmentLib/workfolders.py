"""The folder of files the panel hands one segment or reconstruct run: the scene's volumes exported for the
engine (uncompressed: a CT is hundreds of MB) and the engine's outputs. The scene keeps what it loads in
memory, so the folder goes once the run has ended; folders a crashed Slicer left behind go at the next start."""

from __future__ import annotations

import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

PREFIX = "hybridmim-"
# Older than this, no run of any Slicer still uses the folder (a run takes minutes).
_STALE_SECONDS = 24 * 3600


def new_work_folder(parent: str | Path) -> Path:
    return Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))


def remove_work_folder(folder: str | Path) -> None:
    """Best effort: a file still open elsewhere (Windows) leaves the folder to the next start's sweep."""
    shutil.rmtree(folder, ignore_errors=True)


@contextmanager
def removed_on_error(folder: str | Path):
    """Remove ``folder`` (a new run's files) when the block fails: a run that never started leaves nothing."""
    try:
        yield
    except BaseException:
        remove_work_folder(folder)
        raise


def remove_stale_work_folders(parent: str | Path) -> list[Path]:
    """Remove the work folders under ``parent`` untouched for a day; returns them."""
    cutoff = time.time() - _STALE_SECONDS
    stale = [path for path in Path(parent).glob(PREFIX + "*")
             if path.is_dir() and not path.is_symlink() and path.stat().st_mtime < cutoff]
    for path in stale:
        remove_work_folder(path)
    return stale
