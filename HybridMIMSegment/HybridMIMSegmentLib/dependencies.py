"""Which of the module's Python requirements (Resources/requirements.txt) are not installed:
asked before the first run, so nothing is installed without the user's consent."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path


def requirement_names(path: str | Path) -> list[str]:
    """Distribution names of a requirements file (comments, blank lines and options skipped)."""
    names = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.append(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0])
    return names


def missing_requirements(path: str | Path) -> list[str]:
    """The requirements of ``path`` that no installed distribution provides."""
    missing = []
    for name in requirement_names(path):
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    return missing
