"""The model catalog: bundled models verified, downloads verified, offline behaviour."""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import pytest

from conftest import DEFAULT_MODEL, MODELS
from hybridmim.catalog import load_catalog, resolve_model, resolve_sample
from hybridmim.checkpoint import read_metadata
from hybridmim.download import _sha256_of, file_sha256
from hybridmim.errors import UserError
from hybridmim.progress import Reporter

QUIET = Reporter("quiet")


def test_bundled_catalog_is_consistent():
    catalog = load_catalog()
    assert catalog.default_model in {m.name for m in catalog.models}
    for entry in catalog.models:
        if entry.bundled:
            path = MODELS / entry.file
            assert file_sha256(path) == entry.sha256, f"{entry.name}: run scripts/update_catalog_hashes.py"
            assert path.stat().st_size == entry.size
            assert entry.size < 25 * 2**20
    assert resolve_model(None, QUIET) == DEFAULT_MODEL
    pretrained = resolve_model(None, QUIET, pretrained=True)
    assert pretrained == MODELS / "ct-hybridmim-cnn.safetensors"
    assert read_metadata(pretrained).task == "reconstruction" and read_metadata(DEFAULT_MODEL).task == "segmentation"


def test_a_catalog_without_a_pretrained_default_says_so(tmp_path):
    folder = _catalog_folder(tmp_path, [{"name": "a", "title": "A", "file": "a.safetensors", "sha256": "0" * 64}])
    with pytest.raises(UserError, match="names no default pre-trained model"):
        resolve_model(None, QUIET, load_catalog(folder), pretrained=True)


def _catalog_folder(tmp_path, models, samples=()):
    folder = tmp_path / "Models"
    folder.mkdir()
    (folder / "catalog.json").write_text(json.dumps({"default_model": models[0]["name"], "models": models,
                                                     "samples": list(samples)}))
    return folder


def test_downloadable_model_is_fetched_once_and_verified(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "server" / "remote.safetensors"
    source.parent.mkdir()
    shutil.copy(DEFAULT_MODEL, source)
    entry = {"name": "remote", "title": "t", "file": "remote.safetensors", "url": source.as_uri(),
             "sha256": file_sha256(DEFAULT_MODEL)}
    catalog = load_catalog(_catalog_folder(tmp_path, [entry]))
    path = resolve_model("remote", QUIET, catalog)
    assert path == tmp_path / "cache" / "models" / "remote.safetensors"
    assert file_sha256(path) == entry["sha256"]
    source.unlink()  # now offline: the cached copy is used
    assert resolve_model("remote", QUIET, catalog) == path


def test_download_with_wrong_sha256_is_refused_and_removed(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    source = tmp_path / "tampered.safetensors"
    source.write_bytes(b"not the published bytes")
    entry = {"name": "remote", "title": "t", "file": "remote.safetensors", "url": source.as_uri(), "sha256": "0" * 64}
    catalog = load_catalog(_catalog_folder(tmp_path, [entry]))
    with pytest.raises(UserError, match="refusing"):
        resolve_model("remote", QUIET, catalog)
    assert not any((tmp_path / "cache").rglob("*.safetensors"))


def test_offline_download_names_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    sample = {"name": "ct", "title": "t", "file": "ct.nii.gz", "url": (tmp_path / "absent.nii.gz").as_uri(),
              "sha256": "0" * 64}
    model = {"name": "m", "title": "t", "file": "m", "sha256": ""}
    catalog = load_catalog(_catalog_folder(tmp_path, [model], [sample]))
    with pytest.raises(UserError, match="place it at .*samples"):
        resolve_sample("ct", QUIET, catalog)


def test_bundled_file_that_was_altered_is_refused(tmp_path):
    folder = _catalog_folder(tmp_path, [{"name": "m", "title": "t", "file": "m.safetensors", "sha256": "0" * 64}])
    shutil.copy(DEFAULT_MODEL, folder / "m.safetensors")
    with pytest.raises(UserError, match="does not match"):
        resolve_model("m", QUIET, load_catalog(folder))


def test_names_and_paths(tmp_path):
    with pytest.raises(UserError, match="unknown model"):
        resolve_model("no-such-model", QUIET)
    with pytest.raises(UserError, match="no such model file"):
        resolve_model(str(tmp_path / "x.safetensors"), QUIET)
    assert resolve_model(str(DEFAULT_MODEL), QUIET) == DEFAULT_MODEL


def test_a_file_hashed_once_is_hashed_again_when_it_changes(tmp_path):
    path = tmp_path / "model.safetensors"
    shutil.copy(DEFAULT_MODEL, path)
    first = file_sha256(path)
    hits = _sha256_of.cache_info().hits
    assert first == hashlib.sha256(DEFAULT_MODEL.read_bytes()).hexdigest() and file_sha256(path) == first
    assert _sha256_of.cache_info().hits == hits + 1  # the second ask is not read again
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, rewritten in place (same inode)
    path.write_bytes(bytes(data))
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))  # however coarse the clock
    assert file_sha256(path) == hashlib.sha256(bytes(data)).hexdigest() != first
    replaced = tmp_path / "new.safetensors"
    shutil.copy(DEFAULT_MODEL, replaced)
    os.replace(replaced, path)  # a new file under the same name, as atomic writes and downloads leave it
    assert file_sha256(path) == first
