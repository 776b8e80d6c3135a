"""Downloads verified by SHA256, into the user's cache, with progress."""

from __future__ import annotations

import functools
import hashlib
import os
import urllib.error
import urllib.request
from pathlib import Path

from .atomic import atomic_output
from .errors import UserError
from .progress import Reporter


def cache_dir() -> Path:
    """``$HYBRIDMIM_CACHE``, else ``$XDG_CACHE_HOME/hybridmim``, else ``~/.cache/hybridmim``."""
    if os.environ.get("HYBRIDMIM_CACHE"):
        return Path(os.environ["HYBRIDMIM_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "hybridmim"


def file_sha256(path: Path) -> str:
    """A file's SHA256, hashed once per process while the file keeps its inode, size and modification time
    (a segment run asks for its model's three times: catalog check, ONNX cache key, the label map's header)."""
    stat = os.stat(path)
    return _sha256_of(os.path.realpath(path), stat.st_ino, stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_of(path: str, inode: int, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_verified(url: str, destination: Path, sha256: str, reporter: Reporter) -> Path:
    """``destination`` if it already holds the expected bytes, else download it there.

    A download whose SHA256 differs from the expected one is deleted and refused.
    """
    if destination.is_file() and file_sha256(destination) == sha256:
        return destination
    reporter.stage("download")
    reporter.info(f"downloading {url}")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_output(destination) as tmp:
            total = int(response.headers.get("Content-Length") or 0)
            done = 0
            with open(tmp, "wb") as out:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    digest.update(block)
                    done += len(block)
                    if total:
                        reporter.progress(done, total)
            if digest.hexdigest() != sha256:
                raise UserError(f"{url}: downloaded file has SHA256 {digest.hexdigest()}, expected {sha256}; "
                                "refusing to use it")
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"cannot download {url} ({reason}); without network, fetch it elsewhere "
                        f"and place it at {destination}") from None
    return destination
