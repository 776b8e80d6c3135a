"""Training volumes (unlabelled for pre-training, labelled for fine-tuning): finding them,
preparing them once, sampling crops.

Preparing a volume (orientation, spacing, foreground crop, normalisation: the
recipe's Preprocessing) is slow; it is done once per file and kept in a cache
folder as one ``.npz`` per volume. Window-normalised (CT) volumes are stored
as 8 bits over the window (2000 HU / 255 ≈ 8 HU a step, under CT noise), which
keeps 50 CTs in a few hundred MB of memory. A cache folder can itself be given
as data (its ``prepared.json`` lists the volumes), so pre-training runs where
the original scans and SimpleITK are absent. Label maps are stored as class
indices (0 = background), with their own list of crop centres on foreground.
"""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .atomic import atomic_output, make_folder
from .errors import NotAScan, UserError
from .jsonfile import read_json
from .labels import Label, class_indices
from .preprocessing import Preprocessing
from .progress import Reporter

IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")
SEGMENTATION_SUFFIX = ".seg.nrrd"
INDEX_NAME = "prepared.json"
CACHE_FORMAT = 2
FOREGROUND_SAMPLES = 20000  # crop centres kept per volume (body; and labelled voxels)
SOURCE_DIGESTS = "source_sha256"  # a prepared volume's entry holding its source files' SHA256s
PREPARE_WARNINGS = "warnings"  # and the warnings preparing it gave, said again whenever it is read back
# In a folder holding several DICOM series, those with fewer images (a multi-frame file's frames counted) are not
# scans to learn from or segment: localisers (1-3 images), dose reports, secondary captures
MIN_SERIES_IMAGES = 10


@dataclass(frozen=True)
class Case:
    """One volume: a name, its channel files (one per model input channel) and its label map, if any;
    ``series``: the UID of the DICOM series it is, in a folder holding several; ``volumes``: where its channels are
    volumes of one 4-D file (a Decathlon multi-modal image; the file is then each channel's), the index of each in
    it; ``channel_names``: what the data call each channel (a dataset index's names, the ends of a BraTS case's
    file names), by which channelnames.fitted_to_model picks the model's."""

    name: str
    channels: tuple[Path, ...]
    label: Path | None = None
    series: str | None = None
    volumes: tuple[int, ...] = ()
    channel_names: tuple[str, ...] = ()

    def each_channel(self) -> list[Case]:
        """A case per channel, named after the case and the channel's name (else its number): the volumes of a
        one-channel model's pre-training pool."""
        if len(self.channels) == 1:
            return [self]
        return [Case(f"{self.name}_{self.channel_names[i] if self.channel_names else i}", (self.channels[i],),
                     series=self.series, volumes=self.volumes[i:i + 1], channel_names=self.channel_names[i:i + 1])
                for i in range(len(self.channels))]

    def channel_files(self, whole_paths: bool = False) -> list[str]:
        """Each channel's file (its name, or its path as given) for messages, with its volume where it is one of a
        4-D file, and its index's name for it."""
        described = []
        for number, path in enumerate(self.channels):
            text = str(path) if whole_paths else path.name
            text += f" volume {self.volumes[number]}" if self.volumes else ""
            described.append(text + (f" ({self.channel_names[number]})" if self.channel_names else ""))
        return described


def is_segmentation_file(path) -> bool:
    """A Slicer segmentation (segments, not intensities: read by segfile)."""
    return Path(path).name.lower().endswith(SEGMENTATION_SUFFIX)


def _is_image(path: Path) -> bool:
    return path.is_file() and path.name.lower().endswith(IMAGE_SUFFIXES) and not is_segmentation_file(path)


def image_stem(path: Path) -> str:
    """An image file's name without its image suffix (``CT.1.nii.gz`` → ``CT.1``)."""
    name = path.name
    suffix = next((s for s in IMAGE_SUFFIXES if name.lower().endswith(s)), "")
    return name[:len(name) - len(suffix)]


def _holds_dicom(folder: Path) -> bool:
    """Whether a folder's own files include a DICOM file ("DICM" after the 128-byte preamble); a DICOMDIR,
    the index of an exported disc, is not one."""
    for path in folder.iterdir():
        if path.is_file() and path.name.upper() != "DICOMDIR" and path.stat().st_size > 132:
            with open(path, "rb") as handle:
                handle.seek(128)
                if handle.read(4) == b"DICM":
                    return True
    return False


def _dicom_cases(name: str, folder: Path, warn: Callable[[str], None]) -> list[Case]:
    """A folder of DICOM files as the case ``name``; one holding several series (an export that puts a study's
    files in one folder) as a case per series of MIN_SERIES_IMAGES images or more, ``name_1``, ``name_2``, … in the
    order of their UIDs (the shorter ones, localisers mostly, left out with a warning)."""
    from .imageio import dicom_image_count, dicom_series, sampled_series_uids

    if len(sampled_series_uids(folder)) <= 1:
        return [Case(name, (folder,))]
    series = dicom_series(folder)
    scans = sorted(uid for uid, files in series.items() if dicom_image_count(files) >= MIN_SERIES_IMAGES)
    if len(scans) < len(series):
        warn(f"{folder}: {len(series) - len(scans)} of its {len(series)} DICOM series left out, of fewer than "
             f"{MIN_SERIES_IMAGES} images each (localisers?)")
    return [Case(f"{name}_{number}", (folder,), series=uid) for number, uid in enumerate(scans, start=1)]


def _dicom_cases_below(root: Path, folder: Path, warn: Callable[[str], None]) -> list[Case]:
    """The DICOM cases of each folder at or below ``folder`` that holds DICOM files, named by its path under
    ``root`` (PACS and disc exports nest series as PATIENT/STUDY/SERIES folders)."""
    cases = []
    for current, subfolders, _ in os.walk(folder):
        subfolders.sort()
        if _holds_dicom(Path(current)):
            cases += _dicom_cases("_".join(Path(current).relative_to(root).parts), Path(current), warn)
    return cases


def _case_in_folder(folder: Path, labelled: bool) -> Case | None:
    """A case folder of the dataset layout: image.nii.gz, or image_0000.nii.gz, image_0001.nii.gz, …,
    and optionally one label file: label.nii.gz (any image type) or Slicer's label.seg.nrrd (two are refused where
    the labels are read, ``labelled``, and left out elsewhere)."""
    files = sorted(p for p in folder.iterdir() if _is_image(p))
    single = [p for p in files if _first_word(p) == "image"]
    channels = single[:1] or [p for p in files if _first_word(p).startswith("image_")]
    if not channels:
        return _case_of_named_files(folder, files, labelled)
    segmentation_name = f"label{SEGMENTATION_SUFFIX}"
    segmentations = sorted(p for p in folder.iterdir() if p.is_file() and p.name.lower() == segmentation_name)
    labels = [p for p in files if _first_word(p) == "label"] + segmentations
    # which of two would be read is down to the file system's order: say so rather than guess (a case corrected in
    # Slicer and saved as label.seg.nrrd beside the label.nii.gz it was made from)
    for kind, found in (("label", labels if labelled else []), ("image", single)):
        if len(found) > 1:
            raise UserError(f"{folder}: holds {' and '.join(p.name for p in found)}; keep the one {kind} file that is "
                            "the case's, and move the other out of the folder")
    return Case(folder.name, tuple(channels), labels[0] if len(labels) == 1 else None)


def _first_word(path: Path) -> str:
    """A file's name to its first dot, in lower case: Image.nii.gz is a case folder's image too (Windows and macOS
    file systems do not tell the cases apart, so neither do their users)."""
    return path.name.split(".")[0].lower()


def _case_of_named_files(folder: Path, files: list[Path], labelled: bool) -> Case | None:
    """A case folder as BraTS lays it out: CASE/CASE_flair.nii.gz, CASE_t1ce.nii.gz, … (BraTS 2023:
    CASE-t2f.nii.gz, …), what follows the folder's name naming each channel, with CASE_seg.nii.gz its label map;
    None where the folder holds another image (it is then no such case; where labels are read, one whose other
    files are such a case's is refused, naming the file that is not)."""
    from .channelnames import LABEL_FILE_ENDS, is_file_channel_name, named_ends

    named = named_ends([image_stem(file) for file in files], folder.name)
    if named is None:
        return None
    ends = dict(zip(files, named))
    labels = [file for file, end in ends.items() if end.lower() in LABEL_FILE_ENDS]
    channels = [file for file, end in ends.items() if file not in labels]
    unnamed = [file for file in channels if not is_file_channel_name(ends[file])]
    if labelled and labels and unnamed and len(unnamed) < len(channels):
        raise UserError(f"{folder}: {unnamed[0].name} is no channel of this BraTS-style case (its name ends in no "
                        f"channel's name, such as flair or t1ce, nor in {' or '.join(LABEL_FILE_ENDS)}): move it out "
                        "of the folder")
    if not channels or unnamed:
        return None
    if labelled and len(labels) > 1:
        raise UserError(f"{folder}: holds {' and '.join(p.name for p in labels)}; keep the one label file that is the "
                        "case's, and move the other out of the folder")
    return Case(folder.name, tuple(channels), labels[0] if labels else None,
                channel_names=tuple(ends[file] for file in channels))


def _check_excluded(names, exclude) -> None:
    unknown = set(exclude) - set(names)
    if unknown:
        raise UserError(f"--exclude names no case in the data: {', '.join(sorted(unknown))}")


def find_cases(paths, exclude=(), labelled: bool = False, dicom: bool = False,
               warn: Callable[[str], None] = lambda _: None) -> list[Case]:
    """Volumes from image files, case folders, folders of case folders, Decathlon or nnU-Net v2 dataset folders
    (``dataset.json``, see datasetindex) or folders of image files; ``exclude``: case names to leave out;
    ``labelled``: every case must have its label map; ``dicom``: a folder of DICOM files (given, or at any
    depth below a given folder) is a one-channel case named after the folder (its path under the given one);
    ``warn``: told of the series left out of a folder of several."""
    from .datasetindex import dataset_cases, is_dataset_folder

    cases: list[Case] = []
    for path in map(Path, paths):
        if not path.exists():
            raise UserError(f"{path}: no such file or folder")
        if path.is_file():
            from .segfile import refuse_as_scan

            refuse_as_scan(path)
            if not _is_image(path):
                raise UserError(f"{path}: not an image file ({', '.join(IMAGE_SUFFIXES)})")
            cases.append(Case(image_stem(path), (path,)))
        elif is_dataset_folder(path):
            cases += dataset_cases(path, labelled)
        elif (case := _case_in_folder(path, labelled)) is not None:
            cases.append(case)
        elif dicom and _holds_dicom(path):
            cases += _dicom_cases(path.name, path, warn)
        else:
            subfolders = sorted(p for p in path.iterdir() if p.is_dir())
            found = []
            for folder in subfolders:
                if (case := _case_in_folder(folder, labelled)) is not None:
                    found.append(case)
                elif dicom:
                    found += _dicom_cases_below(path, folder, warn)
            found += [Case(image_stem(p), (p,)) for p in sorted(path.iterdir()) if _is_image(p)]
            if not found:
                kinds = "case folders with image.nii.gz, image files" + (" or DICOM series folders" if dicom else "")
                raise UserError(f"{path}: no images found (expected {kinds})")
            cases += found
    _check_excluded([c.name for c in cases], exclude)
    cases = [c for c in cases if c.name not in set(exclude)]
    if not cases:
        raise UserError("--exclude leaves out every case in the data")
    if labelled:
        unlabelled = [c.name for c in cases if c.label is None]
        if unlabelled:
            raise UserError(f"no label map for {', '.join(unlabelled[:5])}{' …' if len(unlabelled) > 5 else ''} "
                            "(a case folder needs label.nii.gz, or a Slicer segmentation label.seg.nrrd, beside its "
                            "image)")
    return cases


@dataclass
class Volume:
    """A prepared volume: ``stored`` (C, z, y, x) uint8 or float16, crop centres in the body (N, 3),
    and for labelled volumes the class indices (z, y, x) uint8 and centres on labelled voxels."""

    name: str
    stored: np.ndarray
    centres: np.ndarray
    label: np.ndarray | None = None
    label_centres: np.ndarray | None = None


class PreparedData:
    """Prepared volumes and how to turn their stored values back into model intensities."""

    def __init__(self, volumes: list[Volume], preprocessing: Preprocessing, sources: list[dict]):
        if not volumes:
            raise UserError("no volumes to train on")
        self.volumes = volumes
        self.preprocessing = preprocessing
        self.sources = sources

    def sources_of(self, volumes: list[Volume]) -> list[dict]:
        """The source records (files, SHA256) of ``volumes``."""
        names = {v.name for v in volumes}
        return [s for s in self.sources if s["name"] in names]

    @property
    def channels(self) -> int:
        return self.volumes[0].stored.shape[0]

    def sample_crops(self, rng: np.random.Generator, volumes: int, crops_per_volume: int, size: int,
                     labelled_fraction: float = 0.0):
        """(images (B, C, s, s, s) as stored, valid (B, 1, s, s, s) uint8, labels (B, 1, s, s, s) uint8
        or None), B = volumes × crops_per_volume.

        Crops are centred on the body, or with probability ``labelled_fraction``
        on a labelled voxel (positive/negative balance for fine-tuning). A
        volume smaller than the crop is placed at a random offset in it, the
        rest marked invalid (padding, label 0).
        """
        images, valid, labels = [], [], []
        for index in rng.integers(len(self.volumes), size=volumes):
            volume = self.volumes[int(index)]
            for _ in range(crops_per_volume):
                centres = volume.centres
                if volume.label_centres is not None and len(volume.label_centres) and rng.random() < labelled_fraction:
                    centres = volume.label_centres
                centre = centres[rng.integers(len(centres))]
                arrays = [volume.stored] if volume.label is None else [volume.stored, volume.label[None]]
                cropped, inside = _crop(arrays, centre, size, rng)
                images.append(cropped[0])
                valid.append(inside)
                if volume.label is not None:
                    labels.append(cropped[1])
        return np.stack(images), np.stack(valid), np.stack(labels) if labels else None

    def model_array(self, volume: Volume) -> np.ndarray:
        """A whole volume in model intensities (C, z, y, x) float32, for validation."""
        import torch

        stored = torch.from_numpy(volume.stored)
        return self.to_model(stored, torch.ones_like(stored[:1])).numpy()

    def to_model(self, stored, valid):
        """Stored crops → model intensities (float32 tensors on the crops' device), 0 on padding."""
        intensity = self.preprocessing.intensity
        image = stored.float()
        if intensity.kind == "window":
            low, high = intensity.output_range
            image = image * ((high - low) / 255.0) + low
        return image * valid


def _crop(arrays: list[np.ndarray], centre, size: int, rng: np.random.Generator):
    """The same size³ box of each (C, z, y, x) array around ``centre``, and its mask of real voxels."""
    source, target = [], []
    for axis, extent in enumerate(arrays[0].shape[1:]):
        if extent >= size:
            start = int(np.clip(centre[axis] - size // 2, 0, extent - size))
            source.append(slice(start, start + size))
            target.append(slice(0, size))
        else:
            offset = int(rng.integers(size - extent + 1))
            source.append(slice(0, extent))
            target.append(slice(offset, offset + extent))
    inside = np.zeros((1, size, size, size), dtype=np.uint8)
    inside[(slice(None), *target)] = 1
    cropped = []
    for array in arrays:
        box = np.zeros((array.shape[0], size, size, size), dtype=array.dtype)
        box[(slice(None), *target)] = array[(slice(None), *source)]
        cropped.append(box)
    return cropped, inside


def _encode(array: np.ndarray, preprocessing: Preprocessing) -> np.ndarray:
    intensity = preprocessing.intensity
    if intensity.kind == "window":
        low, high = intensity.output_range
        return np.round((array - low) * (255.0 / (high - low))).clip(0, 255).astype(np.uint8)
    return array.astype(np.float16)


def _source_files(path: Path, series: str | None = None) -> list[Path]:
    """The files a channel is read from: the image file, a DICOM series folder's own files, or the files of its
    ``series`` (in a folder holding several)."""
    if not path.is_dir():
        return [path]
    if series is not None:
        from .imageio import dicom_series

        return sorted(Path(file) for file in dicom_series(path).get(series, ()))
    return sorted(p for p in path.iterdir() if p.is_file())


def _source_sha256(path: Path, series: str | None = None) -> str:
    """An image file's SHA256; for a DICOM folder (or one ``series`` in it), the SHA256 of its files' names and
    SHA256s."""
    from .download import file_sha256

    if not path.is_dir():
        return file_sha256(path)
    listing = "".join(f"{file.name} {file_sha256(file)}\n" for file in _source_files(path, series))
    return hashlib.sha256(listing.encode()).hexdigest()


def _source_digests(files, series: str | None) -> list[str]:
    """Each file's _source_sha256, a file that several channels are volumes of hashed once."""
    digests = {path: _source_sha256(path, series) for path in dict.fromkeys(files)}
    return [digests[path] for path in files]


def _cache_key(case: Case, preprocessing: Preprocessing, labels: list[Label] | None) -> str:
    identity = [CACHE_FORMAT, preprocessing.to_dict(), sorted(class_indices(labels or []).items())]
    if labels and is_segmentation_file(case.label):  # its segments are read by the labels' names and codes
        identity.append([label.to_dict() for label in labels])
    if case.volumes:
        identity.append(list(case.volumes))
    for path in case.channels + ((case.label,) if labels else ()):
        for file in _source_files(path, case.series):  # a DICOM series changes when any of its files does
            stat = file.stat()
            identity.append([str(file.resolve()), stat.st_size, stat.st_mtime_ns])
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _sample(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    keep = rng.choice(len(points), size=min(FOREGROUND_SAMPLES, len(points)), replace=False)
    return points[np.sort(keep)].astype(np.int32)


def check_case_label(case: Case, labels: list[Label]) -> None:
    """Refuse, from the file headers alone, a label map that does not lie on its image's grid (a Slicer
    segmentation is resampled onto it when read: Slicer may keep it on a finer grid of its own), and a Slicer
    segmentation none of whose segments is one of ``labels``."""
    from .imageio import read_grid
    from .segfile import check_some_segment_is_a_label

    grids = []
    for path in (case.channels[0], case.label):
        grid = read_grid(path)
        if grid is None:
            raise UserError(f"case {case.name}: {path.name} is not a readable image")
        grids.append(grid)
    image, label = grids
    if is_segmentation_file(case.label):
        check_some_segment_is_a_label(case.label, labels, f"{case.name}: {case.label.name}")
    elif not label.matches(image):  # as preparing tests the voxels
        raise UserError(f"case {case.name}: the label map's grid (size, spacing, origin or direction) differs "
                        "from the image's; resample it onto the image first")


def read_case_label(case: Case, labels: list[Label], warn):
    """A case's label map as an UInt16 sitk.Image, checked as one (scancheck.checked_label_map), for training and
    for evaluate; a Slicer segmentation's segments as the ``labels`` they are, on the image's grid. SimpleITK is
    imported only here: prepared folders load on a machine without it."""
    from .imageio import read_grid, read_volume
    from .scancheck import checked_label_map
    from .segfile import read_segmentation_labels

    where = f"{case.name}: {case.label.name}"
    if is_segmentation_file(case.label):
        return read_segmentation_labels(case.label, read_grid(case.channels[0]), labels, where, warn)
    return checked_label_map(read_volume(case.label), where, warn)


def _prepare_volume(case: Case, preprocessing: Preprocessing, key: str, labels: list[Label] | None, channels,
                    warn) -> dict:
    from .imageio import read_channels
    from .modelgrid import prepare
    from .scancheck import checked_channels

    count = len(case.channels)
    expected = ([c.get("modality", "") for c in channels] + [""] * count)[:count]  # "": a channel not described
    images = checked_channels(read_channels(case.channels, warn, case.series, case.volumes),
                              [f"{case.name}: {name}" for name in case.channel_files()], expected, warn)
    label = read_case_label(case, labels, warn) if labels else None
    model_input = prepare(images, preprocessing, label)
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
    prepared = {"image": _encode(array, preprocessing), "centres": _sample(candidates, rng)}
    if labels:
        classes = class_indices(labels)
        lookup = np.zeros(max(int(model_input.label.max()), max(classes)) + 1, dtype=np.uint8)
        for value, index in classes.items():
            lookup[value] = index
        prepared["label"] = lookup[model_input.label]
        prepared["label_centres"] = _sample(np.argwhere(prepared["label"] > 0), rng)
    return prepared


def _load_npz(path: Path) -> dict | None:
    """A prepared case's arrays; None where its file is missing or damaged (cut short by a full disk or a partial
    copy, or its bytes changed: the zip's checksums say so)."""
    try:
        with np.load(path) as f:
            arrays = {key: f[key] for key in f.files}
    except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error):
        return None
    return arrays if {"image", "centres"} <= arrays.keys() else None


def _say_warnings_again(arrays: dict, reporter: Reporter) -> None:
    """The warnings preparing a case gave (a segment that is no label, a scan unlike its modality, …), given
    again when it is read back prepared: each run that trains on it should say them, not only the first."""
    for text in arrays.get(PREPARE_WARNINGS, ()):
        reporter.warning(str(text))


def _volume(name: str, arrays: dict) -> Volume:
    return Volume(name, arrays["image"], arrays["centres"], arrays.get("label"), arrays.get("label_centres"))


def check_channel_count(cases: list[Case], channels) -> None:
    """Refuse, before any case is read, one with another number of images than the model's input ``channels``
    ({name, modality})."""
    for case in cases:
        if len(case.channels) != len(channels):
            raise UserError(f"{case.name}: {len(case.channels)} image(s) "
                            f"({', '.join(case.channel_files())}) where the model takes "
                            f"{len(channels)} channel(s) ({', '.join(c['name'] for c in channels)}); a recipe's "
                            "channels make a new model's (as in scripts/recipes/finetune-brain-tumor-mr.json)")


def prepare_cases(cases: list[Case], preprocessing: Preprocessing, cache: Path, reporter: Reporter,
                  labels: list[Label] | None, channels) -> PreparedData:
    """Prepare each case once (kept in ``cache``) and write the cache's ``prepared.json`` for these cases.

    ``labels``: to prepare the label maps too, as class indices (labels.class_indices; other values become 0).
    ``channels``: the model's input channels ({name, modality}), which choose those the data name
    (channelnames.fitted_to_model): every case has as many images (checked before any is read); a scan unlike its
    channel's modality (an MR given to a CT recipe) is prepared with a warning.
    Without ``labels`` (a pre-training pool, often a PACS export), an image that is no 3-D scan (a scout, a dose
    report's screenshot) is left out with a warning, and for a one-channel model each channel of a case of several
    (a BraTS case's sequences) is a volume of its own.
    """
    if not cases:
        raise UserError("no volumes to train on")
    from .channelnames import fitted_to_model

    cases = fitted_to_model(cases, channels, reporter.warning)
    if not labels and len(channels) == 1 and any(len(case.channels) > 1 for case in cases):
        reporter.info("each channel of the cases of several (MR sequences, say) is a volume of the pool")
        cases = [single for case in cases for single in case.each_channel()]
    check_channel_count(cases, channels)
    for case in cases if labels else ():
        check_case_label(case, labels)  # headers only: refuse before an hour of preparing
    make_folder(cache, "the folder for prepared cases (--cache)")
    reporter.stage("prepare data")
    volumes, sources, entries = [], [], []
    for done, case in enumerate(cases):
        path = cache / f"{_cache_key(case, preprocessing, labels)}.npz"
        files = case.channels + ((case.label,) if labels else ())
        arrays = _load_or_prepare(case, files, path, preprocessing, labels, channels, reporter)
        reporter.progress(done + 1, len(cases))
        if arrays is None:
            continue
        volumes.append(_volume(case.name, arrays))
        digests = ([str(d) for d in arrays[SOURCE_DIGESTS]] if SOURCE_DIGESTS in arrays  # not in older caches
                   else _source_digests(files, case.series))
        names = case.channel_files() + ([case.label.name] if labels else [])
        source = {"name": case.name, "files": names, "sha256": digests,
                  "shape": list(arrays["image"].shape[1:]), **({"series": case.series} if case.series else {})}
        sources.append(source)
        entries.append({**source, "file": path.name})
    if not volumes:
        raise NotAScan.none_left(len(cases), "train on")
    index = {"format": CACHE_FORMAT, "preprocessing": preprocessing.to_dict(),
             "classes": {str(k): v for k, v in class_indices(labels or []).items()},
             "labels": [label.to_dict() for label in labels or []], "volumes": entries}
    with atomic_output(cache / INDEX_NAME) as tmp:
        tmp.write_text(json.dumps(index, indent=1), encoding="utf-8")
    return PreparedData(volumes, preprocessing, sources)


def _load_or_prepare(case: Case, files: tuple, path: Path, preprocessing: Preprocessing, labels, channels,
                     reporter: Reporter) -> dict | None:
    """The case's prepared arrays, from the cache at ``path`` or prepared into it; None where an unlabelled case's
    image is no 3-D scan (left out with a warning)."""
    if path.is_file():
        arrays = _load_npz(path)
        if arrays is not None:
            _say_warnings_again(arrays, reporter)
            return arrays
        reporter.warning(f"{case.name}: its prepared copy ({path}) is damaged; preparing it again")
    said = []
    try:
        arrays = _prepare_volume(case, preprocessing, path.stem, labels, channels,
                                 lambda text: (said.append(text), reporter.warning(text)))
    except NotAScan as exc:
        if labels:  # a labelled case was chosen as one: its image is refused
            raise
        reporter.warning(exc.left_out(case.name))
        return None
    arrays[PREPARE_WARNINGS] = np.array(said, dtype=str)
    # the sources' digests travel with the volume: its key already stands for their sizes and times, and hashing
    # them again on every run would re-read every scan (a 100-CT DICOM export: about 15 GB)
    arrays[SOURCE_DIGESTS] = np.array(_source_digests(files, case.series))
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
    return arrays


def is_prepared_folder(path) -> bool:
    return (Path(path) / INDEX_NAME).is_file()


def prepared_labels(folder: Path) -> list[dict]:
    """The labels (parse_labels' entries) a prepared folder's label maps were made with; [] for none, or for a
    folder prepared before they were recorded."""
    return _prepared_index(folder).get("labels", [])


def _prepared_index(folder: Path) -> dict:
    return read_json(folder / INDEX_NAME, "index of prepared cases", an_object=True, hint="prepare the data again")


def _named_alike(entries: list[dict], labels: list[Label]) -> bool:
    return [(e["value"], e["name"]) for e in entries] == [(label.value, label.name) for label in labels]


def load_prepared(folder: Path, preprocessing: Preprocessing, reporter: Reporter,
                  labels: list[Label] | None = None, exclude=()) -> PreparedData:
    """A cache folder given as data, less the ``exclude``d case names; its pre-processing (and label
    classes) must be the run's, and where Slicer segmentations were read, its labels' names too (they chose
    each segment's label)."""
    index = _prepared_index(folder)
    if index.get("format") != CACHE_FORMAT:
        raise UserError(f"{folder}: prepared with another version of the engine; prepare the data again")
    if Preprocessing.from_dict(index["preprocessing"]) != preprocessing:
        raise UserError(f"{folder}: prepared with other pre-processing than the recipe's; prepare the data again")
    if labels and {int(k): v for k, v in index.get("classes", {}).items()} != class_indices(labels):
        raise UserError(f"{folder}: prepared without these labels; prepare the data again")
    from_segmentations = any(is_segmentation_file(f) for entry in index["volumes"] for f in entry["files"])
    if labels and from_segmentations and not _named_alike(index.get("labels", []), labels):
        raise UserError(f"{folder}: its Slicer segmentations were read by the names of other labels "
                        f"({', '.join(e['name'] for e in index.get('labels', [])) or 'not recorded'}); prepare the "
                        "data again with these")
    _check_excluded([entry["name"] for entry in index["volumes"]], exclude)
    entries = [entry for entry in index["volumes"] if entry["name"] not in set(exclude)]
    reporter.stage("load data")
    volumes, sources = [], []
    for done, entry in enumerate(entries):
        arrays = _load_npz(folder / entry["file"])
        if arrays is None:
            raise UserError(f"{folder}: the prepared copy of {entry['name']} ({entry['file']}) is missing or damaged; "
                            "prepare the data again")
        _say_warnings_again(arrays, reporter)
        volumes.append(_volume(entry["name"], arrays))
        sources.append({k: v for k, v in entry.items() if k != "file"})
        reporter.progress(done + 1, len(entries))
    return PreparedData(volumes, preprocessing, sources)
