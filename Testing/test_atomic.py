"""Outputs appear whole or not at all, and existing files are kept unless replaced on purpose."""

from __future__ import annotations

import pytest

from hybridmim.atomic import atomic_output, check_new_output, full_suffix
from hybridmim.errors import UserError


def test_failed_write_leaves_neither_target_nor_temporary(tmp_path):
    target = tmp_path / "sub" / "result.seg.nrrd"
    with pytest.raises(RuntimeError):
        with atomic_output(target) as tmp:
            assert tmp.name.endswith(".seg.nrrd") and tmp.parent == target.parent
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    assert list(target.parent.iterdir()) == []


def test_successful_write_replaces_target(tmp_path):
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"old")
    with atomic_output(target) as tmp:
        tmp.write_bytes(b"new")
        assert target.read_bytes() == b"old"  # untouched until the write completes
    assert target.read_bytes() == b"new"


def test_existing_output_is_refused_without_overwrite(tmp_path):
    existing = tmp_path / "a.nii.gz"
    existing.write_bytes(b"x")
    with pytest.raises(UserError, match="--overwrite"):
        check_new_output(existing, overwrite=False)
    assert check_new_output(existing, overwrite=True) == existing
    with pytest.raises(UserError, match="is a folder"):
        check_new_output(tmp_path, overwrite=True)


@pytest.mark.parametrize("name, suffix", [("a.seg.nrrd", ".seg.nrrd"), ("b.NII.GZ", ".NII.GZ"), ("c.mha", ".mha"),
                                          ("d", "")])
def test_full_suffix(tmp_path, name, suffix):
    assert full_suffix(tmp_path / name) == suffix
