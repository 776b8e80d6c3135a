"""Static checks of the Slicer extension packaging and of the engine/module boundary."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from PIL import Image

from conftest import REPO

MODULE = REPO / "HybridMIMSegment"


def _cmake_list(text: str, variable: str) -> list[str]:
    match = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S)
    assert match, f"{variable} not found"
    return [item.replace("${MODULE_NAME}", "HybridMIMSegment") for item in match.group(1).split()]


def _shipped(pattern: str, folder) -> set[str]:
    return {p.relative_to(MODULE).as_posix() for p in folder.rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts}


def test_module_cmake_lists_every_shipped_file_and_only_existing_ones():
    text = (MODULE / "CMakeLists.txt").read_text(encoding="utf-8")
    scripts = set(_cmake_list(text, "MODULE_PYTHON_SCRIPTS"))
    resources = set(_cmake_list(text, "MODULE_PYTHON_RESOURCES"))
    assert scripts == _shipped("*.py", MODULE)
    assert resources == _shipped("*", MODULE / "Resources")
    assert "slicerMacroBuildScriptedModule" in text and "WITH_GENERIC_TESTS" in text


def test_extension_cmake_and_index_entry_agree():
    text = (REPO / "CMakeLists.txt").read_text(encoding="utf-8")
    depends = re.search(r'set\(EXTENSION_DEPENDS "([^"]*)"\)', text).group(1).split()
    category = re.search(r'set\(EXTENSION_CATEGORY "([^"]*)"\)', text).group(1)
    for variable in ("HOMEPAGE", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(rf'set\(EXTENSION_{variable} "[^"]+"\)', text), variable
    for line in ("find_package(Slicer REQUIRED)", "add_subdirectory(HybridMIMSegment)",
                 "include(${Slicer_EXTENSION_GENERATE_CONFIG})", "include(${Slicer_EXTENSION_CPACK})"):
        assert line in text
    entry = json.loads((REPO / "HybridMIMSegment.json").read_text(encoding="utf-8"))
    assert entry["build_dependencies"] == depends == ["PyTorch"]
    assert entry["category"] == category == "Segmentation"
    assert entry["$schema"].endswith("slicer-extension-catalog-entry-schema-v1.0.1.json#")
    assert entry["scm_url"].startswith("https://") and entry["tier"] in (1, 3, 5)
    screenshot = re.search(r'set\(EXTENSION_SCREENSHOTURLS "([^"]*)"\)', text).group(1)
    assert (REPO / screenshot.split("/main/", 1)[1]).is_file(), "screenshot named in CMake is not in the repo"


@pytest.mark.parametrize("icon", ["Resources/Icons/HybridMIMSegment.png",
                                  "HybridMIMSegment/Resources/Icons/HybridMIMSegment.png"])
def test_icons_are_128_pixel_pngs(icon):
    with Image.open(REPO / icon) as image:
        assert image.format == "PNG" and image.size == (128, 128)


def _imports(path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_engine_never_imports_slicer_and_module_never_imports_torch():
    for path in (MODULE / "hybridmim").rglob("*.py"):
        assert not _imports(path) & {"slicer", "qt", "ctk", "vtkMRML", "mrml"}, path
    assert not _imports(MODULE / "HybridMIMSegment.py") & {"torch", "monai"}
    for path in (MODULE / "HybridMIMSegmentLib").rglob("*.py"):  # tested in CI, outside Slicer
        assert not _imports(path) & {"slicer", "qt", "ctk", "vtkMRML", "mrml", "torch", "monai"}, path


def test_catalog_progress_and_module_lib_load_without_torch():
    lib = ", ".join(f"HybridMIMSegmentLib.{p.stem}" for p in (MODULE / "HybridMIMSegmentLib").glob("[a-z]*.py"))
    code = (f"import sys, hybridmim.catalog, hybridmim.progress, hybridmim.cli, {lib}\n"
            "heavy = {'torch', 'monai', 'SimpleITK', 'matplotlib', 'slicerio'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=MODULE)


def test_every_ui_widget_the_module_uses_exists_in_the_ui_file():
    import xml.etree.ElementTree as ElementTree

    tree = ElementTree.parse(MODULE / "Resources" / "UI" / "HybridMIMSegment.ui")
    widgets = {w.get("name") for w in tree.iter("widget")}
    used = set(re.findall(r"self\.ui\.([A-Za-z0-9_]+)", (MODULE / "HybridMIMSegment.py").read_text(encoding="utf-8")))
    assert used and used <= widgets, used - widgets
    source = (MODULE / "HybridMIMSegment.py").read_text(encoding="utf-8")
    assert 'loadUI(self.resourcePath("UI/HybridMIMSegment.ui"))' in source


def _python(version: str) -> str | None:
    pyenv = Path.home().glob(f".pyenv/versions/{version}*/bin/python{version}")
    candidates = [shutil.which(f"python{version}"), *map(str, pyenv)]
    for candidate in filter(None, candidates):
        if subprocess.run([candidate, "-c", "pass"], capture_output=True).returncode == 0:
            return candidate
    return None


@pytest.mark.parametrize("version", ["3.10", "3.12"])  # the engine's oldest Python; Slicer 5.10's
def test_engine_and_module_compile_on_python(version, tmp_path):
    python = _python(version)
    if python is None:
        pytest.skip(f"no working python{version} on this machine")
    files = [str(p) for p in MODULE.rglob("*.py")]
    code = "import sys\nfor f in sys.argv[1:]: compile(open(f).read(), f, 'exec')"
    subprocess.run([python, "-c", code, *files], check=True, cwd=tmp_path)


def test_wheel_ships_engine_catalog_and_bundled_model(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True)
    wheel = next(tmp_path.glob("hybridmim-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "hybridmim/cli.py" in names and "hybridmim/training/finetune.py" in names
    assert "hybridmim/resources/Models/catalog.json" in names
    assert "hybridmim/resources/Models/abdomen-ct-scratch.safetensors" in names
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "hybridmim = hybridmim.cli:main" in entry_points


def test_setup_commands_and_ci():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert "scripts/demo.sh" in readme and "scripts/test.sh" in readme
    for script in ("scripts/demo.sh", "scripts/test.sh", ".ci/run"):
        assert (REPO / script).stat().st_mode & 0o111, f"{script} is not executable"
    assert "scripts/test.sh" in (REPO / ".ci/run").read_text(encoding="utf-8")
    assert "torch==2.13.0" in (REPO / "requirements-dev.txt").read_text(encoding="utf-8")
    assert "Apache License" in (REPO / "LICENSE").read_text(encoding="utf-8")[:200]
