"""Outputs appear whole or not at all, and existing files are kept unless replaced on purpose."""

from __future__ import annotations

import errno
import os

import pytest

from hybridmim.atomic import atomic_output, check_new_output, full_suffix, make_folder
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


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, refused, small_ct):
    (tmp_path / "notes.txt").write_text("a file, not a folder", encoding="utf-8")
    with pytest.raises(UserError, match="notes.txt is a file, not a folder"):
        check_new_output(tmp_path / "notes.txt" / "deeper" / "result.nii.gz", overwrite=False)
    refused("segment", small_ct, "-o", tmp_path / "notes.txt" / "result.nii.gz", message="is a file, not a folder")


@pytest.mark.parametrize("code, refused_by_the_system", [(errno.ENOSPC, True), (errno.EROFS, True),
                                                         (errno.EBADF, False)])
def test_a_write_the_file_system_refuses_is_one_line(tmp_path, code, refused_by_the_system):
    target = tmp_path / "result.nii.gz"
    expected = UserError if refused_by_the_system else OSError
    with pytest.raises(expected) as raised:
        with atomic_output(target) as tmp:
            tmp.write_bytes(b"half")
            raise OSError(code, os.strerror(code))
    if refused_by_the_system:
        assert str(raised.value) == f"{target}: cannot be written: {os.strerror(code)}"
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary file


def test_a_cache_or_lock_folder_that_cannot_be_made_is_one_line(tmp_path, refused, small_ct, monkeypatch):
    (tmp_path / "notes.txt").write_text("a file, not a folder", encoding="utf-8")
    with pytest.raises(UserError, match="cannot make the output folder: Not a directory"):
        make_folder(tmp_path / "notes.txt" / "out", "the output folder")
    refused("pretrain", "--prepare-only", "--cache", tmp_path / "notes.txt" / "prepared", "--data", small_ct,
            message="cannot make the folder for prepared cases (--cache)")
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "notes.txt" / "cache"))
    refused("segment", small_ct, "-o", tmp_path / "result.nii.gz", message="set HYBRIDMIM_CACHE to a writable folder")
    assert not (tmp_path / "result.nii.gz").exists()
