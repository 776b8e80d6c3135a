"""Which of the module's Python requirements (Resources/requirements*.txt) are not installed:
asked before the first run, so nothing is installed without the user's consent; the
constraints that keep their installation from replacing what Slicer ships; and whether the
optional CPU speed-up was skipped."""

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


def installed_version(name: str) -> str | None:
    """The version of the installed distribution ``name``, from its metadata (nothing imported), or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def missing_requirements(path: str | Path) -> list[str]:
    """The requirements of ``path`` that no installed distribution provides."""
    return [name for name in requirement_names(path) if installed_version(name) is None]


# The torch the PyTorch extension is asked for: MONAI >= 1.6 needs 2.8 (tested with 2.13); as in pyproject.toml
TORCH_REQUIREMENT = ">=2.8"


def installed_version_fits(name: str, specifier: str) -> bool:
    """Whether ``name`` is installed at a version within ``specifier`` (from its metadata: an imported torch
    could not be upgraded on Windows, its libraries being in use)."""
    from packaging.specifiers import SpecifierSet

    found = installed_version(name)
    return found is not None and SpecifierSet(specifier).contains(found, prereleases=True)


# What Slicer and its PyTorch extension installed, which a requirement must never replace: a MONAI that asks for
# a newer torch than the installed one (1.6 asks for 2.8) would have pip swap the extension's CUDA build for
# PyPI's (CPU-only on Windows); a requirement capping numpy would replace Slicer's own
PROTECTED = ("numpy", "scipy", "SimpleITK", "vtk", "torch")


def protected_constraints() -> list[str]:
    """pip constraints pinning each installed package of PROTECTED at its version, so that pip picks
    requirement versions that fit them (or fails, saying why) instead of replacing them."""
    versions = {name: installed_version(name) for name in PROTECTED}
    return [f"{name}=={found}" for name, found in versions.items() if found is not None]


def _write_pins(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{pin}\n" for pin in protected_constraints()), encoding="utf-8")
    return path


def write_constraints(folder: str | Path) -> Path:
    """``protected_constraints()`` as a constraints file in ``folder``, for ``pip install -c``."""
    return _write_pins(Path(folder) / "constraints.txt")


# Resources/requirements-cpu-speedup.txt (OpenVINO: CPU windows in about half of torch's time) is installed on its
# own and may fail, e.g. where no OpenVINO release accepts Slicer's numpy: the engine then runs the models on torch
_SPEEDUP_SKIPPED = "cpu-speedup-skipped.txt"


def skip_speedup(folder: str | Path) -> None:
    """Remember that the CPU speed-up was declined or could not be installed with what is installed now."""
    _write_pins(Path(folder) / _SPEEDUP_SKIPPED)


def speedup_skipped(folder: str | Path) -> bool:
    """Whether the CPU speed-up was skipped with the protected packages at their present versions: it is not
    offered again until Slicer or torch changes (a newer one may make it installable)."""
    try:
        return (Path(folder) / _SPEEDUP_SKIPPED).read_text(encoding="utf-8").splitlines() == protected_constraints()
    except OSError:
        return False
