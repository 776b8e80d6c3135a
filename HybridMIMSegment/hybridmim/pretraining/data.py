"""Unlabelled volumes for pre-training: finding them, preparing them once, sampling crops.

Preparing a volume (orientation, spacing, foreground crop, normalisation: the
recipe's Preprocessing) is slow; it is done once per file and kept in a cache
folder as one ``.npz`` per volume. Window-normalised (CT) volumes are stored
as 8 bits over the window (2000 HU / 255 ≈ 8 HU a step, under CT noise), which
keeps 50 CTs in a few hundred MB of memory. A cache folder can itself be given
as data (its ``prepared.json`` lists the volumes), so pre-training runs where
the original scans and SimpleITK are absent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import atomic_output
from ..errors import UserError
from ..preprocessing import Preprocessing
from ..progress import Reporter

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
INDEX_NAME = "prepared.json"
CACHE_FORMAT = 1
FOREGROUND_SAMPLES = 20000  # crop centres kept per volume


@dataclass(frozen=True)
class Case:
    """One volume: a name and its channel files (one per model input channel)."""

    name: str
    channels: tuple[Path, ...]


def _is_image(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and name.endswith(IMAGE_SUFFIXES) and not name.endswith(".seg.nrrd")


def _case_in_folder(folder: Path) -> Case | None:
    """A case folder of the dataset layout: image.nii.gz, or image_0000.nii.gz, image_0001.nii.gz, …"""
    single = [p for p in folder.iterdir() if _is_image(p) and p.name.split(".")[0] == "image"]
    if single:
        return Case(folder.name, (single[0],))
    channels = sorted(p for p in folder.iterdir() if _is_image(p) and p.name.split(".")[0].startswith("image_"))
    return Case(folder.name, tuple(channels)) if channels else None


def _decathlon_cases(folder: Path) -> list[Case]:
    index = json.loads((folder / "dataset.json").read_text(encoding="utf-8"))
    entries = [e["image"] if isinstance(e, dict) else e for e in index.get("training", []) + index.get("test", [])]
    return [Case(Path(entry).name.split(".")[0], (folder / entry,)) for entry in entries]


def find_cases(paths, exclude=()) -> list[Case]:
    """Volumes from image files, case folders, folders of case folders, Decathlon folders
    (``dataset.json``) or folders of image files; ``exclude``: case names to leave out."""
    cases: list[Case] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file():
            if not _is_image(path):
                raise UserError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
            cases.append(Case(path.name.split(".")[0], (path,)))
        elif (path / "dataset.json").is_file():
            cases += _decathlon_cases(path)
        elif (case := _case_in_folder(path)) is not None:
            cases.append(case)
        else:
            subfolders = sorted(p for p in path.iterdir() if p.is_dir())
            found = [c for c in map(_case_in_folder, subfolders) if c is not None]
            found += [Case(p.name.split(".")[0], (p,)) for p in sorted(path.iterdir()) if _is_image(p)]
            if not found:
                raise UserError(f"{path}: no images found (expected case folders with image.nii.gz, or image files)")
            cases += found
    excluded = set(exclude)
    unknown = excluded - {c.name for c in cases}
    if unknown:
        raise UserError(f"--exclude names no case in the data: {', '.join(sorted(unknown))}")
    return [c for c in cases if c.name not in excluded]


@dataclass
class Volume:
    """A prepared volume: ``stored`` (C, z, y, x) uint8 or float16, and crop centres (N, 3)."""

    name: str
    stored: np.ndarray
    centres: np.ndarray


class PreparedData:
    """Prepared volumes and how to turn their stored values back into model intensities."""

    def __init__(self, volumes: list[Volume], preprocessing: Preprocessing, sources: list[dict]):
        if not volumes:
            raise UserError("no volumes to pre-train on")
        self.volumes = volumes
        self.preprocessing = preprocessing
        self.sources = sources

    @property
    def channels(self) -> int:
        return self.volumes[0].stored.shape[0]

    def sample_crops(self, rng: np.random.Generator, volumes: int, crops_per_volume: int, size: int):
        """(images (B, C, s, s, s) as stored, valid (B, 1, s, s, s) uint8), B = volumes × crops_per_volume.

        Crops are centred on foreground voxels; a volume smaller than the crop
        is placed at a random offset in it, the rest marked invalid (padding).
        """
        images, valid = [], []
        for index in rng.integers(len(self.volumes), size=volumes):
            volume = self.volumes[int(index)]
            for _ in range(crops_per_volume):
                centre = volume.centres[rng.integers(len(volume.centres))]
                image, inside = _crop(volume.stored, centre, size, rng)
                images.append(image)
                valid.append(inside)
        return np.stack(images), np.stack(valid)

    def to_model(self, stored, valid):
        """Stored crops → model intensities (float32 tensors on the crops' device), 0 on padding."""
        intensity = self.preprocessing.intensity
        image = stored.float()
        if intensity.kind == "window":
            low, high = intensity.output_range
            image = image * ((high - low) / 255.0) + low
        return image * valid


def _crop(stored: np.ndarray, centre, size: int, rng: np.random.Generator):
    channels = stored.shape[0]
    image = np.zeros((channels, size, size, size), dtype=stored.dtype)
    inside = np.zeros((1, size, size, size), dtype=np.uint8)
    source, target = [], []
    for axis, extent in enumerate(stored.shape[1:]):
        if extent >= size:
            start = int(np.clip(centre[axis] - size // 2, 0, extent - size))
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            offset = int(rng.integers(size - extent + 1))
            source.append(slice(0, extent))
            target.append(slice(offset, offset + extent))
    image[(slice(None), *target)] = stored[(slice(None), *source)]
    inside[(slice(None), *target)] = 1
    return image, inside


def _encode(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    intensity = preprocessing.intensity
    if intensity.kind == "window":
        low, high = intensity.output_range
        return np.round((array - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    return array.astype(np.float16)


def _cache_key(case: Case, preprocessing: Preprocessing) -> str:
    identity = [CACHE_FORMAT, preprocessing.to_dict()]
    for path in case.channels:
        stat = path.stat()
        identity.append([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _prepare_volume(case: Case, preprocessing: Preprocessing, key: str) -> tuple[np.ndarray, np.ndarray]:
    from ..imageio import read_channels
    from ..modelgrid import prepare

    model_input = prepare(read_channels(case.channels), preprocessing)
    array = model_input.array
    if preprocessing.foreground_threshold is not None:
        scale, offset = model_input.intensity_maps[0]
        threshold = preprocessing.foreground_threshold * scale + offset
        candidates = np.argwhere(array[0] > threshold)
    else:
        candidates = np.empty((0, 3), dtype=np.int64)
    if len(candidates) == 0:
        candidates = np.argwhere(np.ones(array.shape[1:], dtype=bool))
    rng = np.random.default_rng(int(key[:8], 16))
    keep = rng.choice(len(candidates), size=min(FOREGROUND_SAMPLES, len(candidates)), replace=False)
    return _encode(array, preprocessing), candidates[np.sort(keep)].astype(np.int32)


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as f:
        return f["image"], f["centres"]


def prepare_cases(cases: list[Case], preprocessing: Preprocessing, cache: Path, reporter: Reporter) -> PreparedData:
    """Prepare each case once (kept in ``cache``) and write the cache's ``prepared.json`` for these cases."""
    from ..download import file_sha256

    if not cases:
        raise UserError("no volumes to pre-train on")
    cache.mkdir(parents=True, exist_ok=True)
    reporter.stage("prepare data")
    volumes, sources, entries = [], [], []
    for done, case in enumerate(cases):
        key = _cache_key(case, preprocessing)
        path = cache / f"{key}.npz"
        if path.is_file():
            stored, centres = _load_npz(path)
        else:
            stored, centres = _prepare_volume(case, preprocessing, key)
            with atomic_output(path) as tmp:
                with open(tmp, "wb") as f:
                    np.savez_compressed(f, image=stored, centres=centres)
        if stored.shape[0] != len(cases[0].channels):
            raise UserError(f"{case.name}: {stored.shape[0]} channels where the first case has {len(cases[0].channels)}")
        volumes.append(Volume(case.name, stored, centres))
        source = {"name": case.name, "files": [p.name for p in case.channels],
                  "sha256": [file_sha256(p) for p in case.channels], "shape": list(stored.shape[1:])}
        sources.append(source)
        entries.append({**source, "file": path.name})
        reporter.progress(done + 1, len(cases))
    index = {"format": CACHE_FORMAT, "preprocessing": preprocessing.to_dict(), "volumes": entries}
    with atomic_output(cache / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    return PreparedData(volumes, preprocessing, sources)


def is_prepared_folder(path) -> bool:
    return (Path(path) / INDEX_NAME).is_file()


def load_prepared(folder: Path, preprocessing: Preprocessing, reporter: Reporter) -> PreparedData:
    """A cache folder given as data; its pre-processing must be the recipe's."""
    index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    if index.get("format") != CACHE_FORMAT:
        raise UserError(f"{folder}: prepared with another version of the engine; prepare the data again")
    if Preprocessing.from_dict(index["preprocessing"]) != preprocessing:
        raise UserError(f"{folder}: prepared with other pre-processing than the recipe's; prepare the data again")
    reporter.stage("load data")
    volumes, sources = [], []
    for done, entry in enumerate(index["volumes"]):
        stored, centres = _load_npz(folder / entry["file"])
        volumes.append(Volume(entry["name"], stored, centres))
        sources.append({k: v for k, v in entry.items() if k != "file"})
        reporter.progress(done + 1, len(index["volumes"]))
    return PreparedData(volumes, preprocessing, sources)
