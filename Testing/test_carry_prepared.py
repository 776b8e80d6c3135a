"""scripts/carry_prepared.py: prepared folders packed for a GPU machine come back identical."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from conftest import REPO


def _files(folder):
    return sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())


def test_pack_then_unpack_gives_the_same_arrays_and_files(prepared, tmp_path):
    archive, unpacked = tmp_path / "carry" / "prepared.tar.xz", tmp_path / "unpacked"
    script = REPO / "scripts" / "carry_prepared.py"
    for action, source, target in (("pack", prepared, archive), ("unpack", archive, unpacked)):
        subprocess.run([sys.executable, script, action, source, target], check=True, timeout=120)
    assert _files(unpacked) == _files(prepared) and any(p.suffix == ".npz" for p in _files(prepared))
    for relative in _files(prepared):
        before, after = prepared / relative, unpacked / relative
        if relative.suffix != ".npz":
            assert after.read_bytes() == before.read_bytes()
            continue
        with np.load(before) as a, np.load(after) as b:
            assert sorted(a.files) == sorted(b.files)
            for name in a.files:
                assert a[name].dtype == b[name].dtype and np.array_equal(a[name], b[name])
