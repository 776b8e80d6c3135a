"""Reading volumes (NIfTI, NRRD, MHA, DICOM series folders) and writing label maps
(.nii.gz, .nrrd, .mha, or .seg.nrrd with segment names, colours and terminology)."""

from __future__ import annotations

import errno
import functools
import gzip
import json
import math
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import SimpleITK as sitk

from . import niftifile
from .atomic import atomic_output, full_suffix
from .errors import NotAScan, UserError, message_line
from .geometry import Grid, covered_mask, resample_onto
from .labels import Label
from .slicepositions import files_of_main_geometry, one_orientation, place_slices, slice_positions

LABELMAP_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".mha")
# Where a label map's header says what made it: a field per item in NRRD and MHA; in NIfTI, the description
PROVENANCE_PREFIX, NIFTI_NOTES, NOTES_SEPARATOR = "HybridMIM_", "ITK_FileNotes", "; "
# An extra channel covering less of the first's grid than this is named in its warning (a slab of the region)
MIN_COVERED_SHARE = 0.95


class LabelmapOrigin(NamedTuple):
    """What made a label map, kept in its header: ``HybridMIM_<field>`` fields in NRRD and MHA, the fields in
    this order in NIfTI's description (80 characters, so a NIfTI's model_sha256 reads back as its start)."""

    engine: str
    model: str
    model_sha256: str


UNSURE_FIELD = f"{PROVENANCE_PREFIX}unsure_ml"
# A whole-body CT spans about 2 m: a header saying more has a wrong voxel spacing (metres taken for millimetres,
# say), and resampling it to a model's grid would ask for more memory than any machine has
MAX_EXTENT_MM = 3000.0
# ITK's warnings are C++ source references on stderr, beside our one-line messages; what they warn of that
# matters (uneven DICOM slices, a header it cannot use) is checked and said here instead
sitk.ProcessObject.SetGlobalWarningDisplay(False)


def sampled_series_uids(folder: Path, samples: int = 5) -> set[str]:
    """The series instance UIDs of a few of a folder's files spread over their sorted names: one UID is taken for
    one series (exports write a series' files together) without reading every file's header, as dicom_series does
    (2 ms a file: a minute for a 100-scan export on every run)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.name.upper() != "DICOMDIR")
    picked = {files[round(i * (len(files) - 1) / (samples - 1))] for i in range(samples)} if files else set()
    uids = set()
    for path in picked:
        reader = sitk.ImageFileReader()
        reader.SetFileName(str(path))
        try:
            reader.ReadImageInformation()
        except RuntimeError:  # not an image: an export's index or report
            continue
        if reader.HasMetaDataKey("0020|000e"):
            uids.add(reader.GetMetaData("0020|000e").strip())
    return uids


def dicom_series(folder: str | Path) -> dict[str, tuple[str, ...]]:
    """The DICOM series among a folder's own files: series instance UID → its files in slice order (GDCM reads
    every file's header: kept for the process while the folder's listing is unchanged)."""
    status = os.stat(folder)
    return _dicom_series(os.path.realpath(folder), status.st_mtime_ns, status.st_ino)


@functools.lru_cache(maxsize=64)
def _dicom_series(folder: str, mtime_ns: int, inode: int) -> dict[str, tuple[str, ...]]:
    reader = sitk.ImageSeriesReader()
    return {uid: tuple(reader.GetGDCMSeriesFileNames(folder, uid)) for uid in reader.GetGDCMSeriesIDs(folder)}


def dicom_image_count(files: tuple[str, ...]) -> int:
    """The images (slices) of a series of ``files``: one a file, or the frames of a multi-frame file (an Enhanced CT
    or MR holds its volume in one file), from the first file's header."""
    header = read_header(files[0])
    frames = header.GetMetaData("0028|0008").strip() if header is not None and header.HasMetaDataKey(
        "0028|0008") else ""
    return len(files) * (int(frames) if frames.isdigit() and int(frames) > 0 else 1)


def _read_dicom_series(folder: Path, warn: Callable[[str], None], series: str | None) -> sitk.Image:
    """The DICOM series ``series`` (a UID) of ``folder``; None: its only series, or its largest (with a warning)."""
    files = dicom_series(folder)
    if not files:
        raise NotAScan(f"{folder}: no DICOM image series in it (a report or a dose summary?)")
    if series is not None:
        if series not in files:
            raise UserError(f"{folder}: no DICOM series {series} in it (any more)")
        chosen = series
    else:
        chosen = next(iter(files))
        if len(files) > 1:  # sized by their images only where there is a choice: a header read each
            images = {uid: dicom_image_count(names) for uid, names in files.items()}
            chosen = max(files, key=images.get)
            warn(f"{folder} holds {len(files)} DICOM series; using the largest ({images[chosen]} images, {chosen}); "
                 "`segment --data` takes each series as a case")
    names = files[chosen]
    if len(names) == 1:
        # one file: an enhanced (multi-frame) CT or MR holds the whole volume, which the series reader would stack
        # into a 4-D image of one; one single-frame file is a single slice either way
        return _itk_read(Path(names[0]))
    try:
        reader, image = _read_series_files(names, folder)
        if one_orientation(reader, len(names)):
            return _placed(reader, image, len(names), folder, warn)
        failure = None
    except UserError as error:
        failure = error
    kept = files_of_main_geometry(names)
    if len(kept) == len(names) or len(kept) < 2:  # nothing to leave out, or nothing left to read
        if failure is not None:
            raise failure
        return _placed(reader, image, len(names), folder, warn)
    warn(f"{folder}: {len(names) - len(kept)} of the series' {len(names)} files left out, of another image size or "
         f"orientation than the other {len(kept)} or unreadable (a localiser or a reformat filed under the series?)")
    reader, image = _read_series_files(kept, folder)
    return _placed(reader, image, len(kept), folder, warn)


def _read_series_files(names, folder: Path) -> tuple[sitk.ImageSeriesReader, sitk.Image]:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(names)
    reader.MetaDataDictionaryArrayUpdateOn()  # each file's position and orientation, to place its slice
    try:
        return reader, reader.Execute()
    except RuntimeError as exc:
        raise UserError(f"{folder}: cannot read the DICOM series: {message_line(exc, last=True)}") from None


def _placed(reader, image: sitk.Image, files: int, folder: Path, warn: Callable[[str], None]) -> sitk.Image:
    positions = slice_positions(reader, image.GetDepth()) if files == image.GetDepth() else None
    return image if positions is None else place_slices(image, positions, str(folder), warn)


def read_header(path: str | Path) -> sitk.ImageFileReader | None:
    """An image file's header (size, spacing, origin, direction) without its voxels; None for
    folders (DICOM series) and files whose header cannot be read."""
    if Path(path).is_dir():
        return None
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError:
        return None
    return reader


def _itk_read(path: Path) -> sitk.Image:
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as exc:
        if "orthonormal" in str(exc):
            raise UserError(f"{path}: its axes are not at right angles (a sheared grid, which ITK cannot hold): "
                            "resample it onto a grid without shear first") from None
        raise UserError(f"{path}: not a readable image: {message_line(exc, last=True)}") from None


def _read_nifti(path: Path) -> sitk.Image:
    """ITK's read, with the voxels NaN or infinite in the file NaN again (ITK makes them 0). They are looked for
    while ITK reads, and no longer once its image has no voxel at the value ITK gives them (0, or scl_inter): a
    512 x 512 x 400 float32 .nii.gz (348 MB) read in 0.8-1.4 s, 2.4-2.8 s when it holds zeros and is searched to its
    end."""
    niftifile.check_complete(path)
    stop = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        non_finite = pool.submit(niftifile.non_finite_indices, path, stop)
        try:
            image = _itk_read(path)
            if niftifile.may_hide_non_finite(image, path):
                return niftifile.with_nan_at(image, non_finite.result())
            return image
        finally:
            stop.set()  # a search no longer needed (ITK failed, or no voxel at 0) ends at its next block


def read_volume(path: str | Path, warn: Callable[[str], None] = lambda _: None,
                series: str | None = None) -> sitk.Image:
    """One scalar 3-D volume from a file or DICOM folder (``series``: the UID of the series to read from a folder
    holding several), or a UserError saying why not."""
    return _one_volume(_read_file(Path(path), warn, series), Path(path), None)


def _read_file(path: Path, warn: Callable[[str], None], series: str | None) -> sitk.Image:
    if not path.exists():
        raise UserError(f"{path}: no such file or folder")
    if path.is_dir():
        return _read_dicom_series(path, warn, series)
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty file")
    return _read_nifti(path) if niftifile.is_nifti(path) else _itk_read(path)


def _one_volume(image: sitk.Image, path: Path, volume: int | None) -> sitk.Image:
    """The 3-D scalar volume a file's image is (its ``volume`` where it is 4-D), or NotAScan."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise NotAScan(f"{path}: has {image.GetNumberOfComponentsPerPixel()} values per voxel "
                       "(colour or vector image); give one scalar volume per input channel")
    size = image.GetSize()
    if volume is not None:
        if image.GetDimension() != 4 or not 0 <= volume < size[3]:
            raise UserError(f"{path}: has no volume {volume} (it is a {image.GetDimension()}-D image of size "
                            f"{size}), where its dataset.json's 'modality' names one")
        image = sitk.Extract(image, [*size[:3], 0], [0, 0, 0, volume],
                             sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX)
        size = image.GetSize()
    if image.GetDimension() == 4:
        raise NotAScan(f"{path}: a 4-D image {size}; give one 3-D volume per input channel, or (a Decathlon image) "
                       "its dataset folder, whose dataset.json names its volumes")
    if image.GetDimension() != 3:
        raise NotAScan(f"{path}: a {image.GetDimension()}-D image of size {size}, not a 3-D volume")
    if min(size) < 2:
        raise NotAScan(f"{path}: a single slice (size {size}), not a 3-D volume")
    return image


def read_grid(path: str | Path) -> Grid | None:
    """An image file's grid from its header (a 4-D file's: that of each of its volumes); None where read_header
    gives none."""
    header = read_header(path)
    if header is None:
        return None
    if header.GetDimension() != 4:
        return Grid.of(header)
    direction = header.GetDirection()
    return Grid(header.GetSize()[:3], header.GetSpacing()[:3], header.GetOrigin()[:3],
                tuple(direction[row * 4 + column] for row in range(3) for column in range(3)))


class BackgroundRead:
    """Input channels read on a thread; SimpleITK releases the GIL, so the read overlaps what the
    caller does meanwhile (the engine's imports, ``devices.start_torch_imports``)."""

    def __init__(self, paths):
        self.paths = list(paths)
        self._warnings: list[str] = []
        pool = ThreadPoolExecutor(max_workers=1)
        self._future = pool.submit(read_channels, self.paths, self._warnings.append)
        pool.shutdown(wait=False)

    def result(self, warn: Callable[[str], None]) -> list[sitk.Image]:
        """The channels (or the reader's UserError), once read; the reader's warnings go to ``warn``."""
        try:
            return self._future.result()
        finally:
            for message in self._warnings:
                warn(message)


def check_scan_fits(paths, meta) -> None:
    """Refuse, from its header, a scan (``paths``: its channels) larger than a patient or too large for this
    machine's memory."""
    from .memory import check_fits, scan_header, segment_bytes

    scan = scan_header(paths[0])
    if scan is None:
        return
    name = str(paths[0])
    extent = [n * s for n, s in zip(scan.size, scan.spacing)]
    if max(extent) > MAX_EXTENT_MM:
        raise UserError(f"{name}: its header makes it {' x '.join(f'{e:.0f}' for e in extent)} mm (voxels of "
                        f"{' x '.join(f'{s:g}' for s in scan.spacing)} mm), larger than any patient: its voxel "
                        "spacing is wrong; correct the header")
    check_fits(segment_bytes(scan, len(paths), meta), f"{name} ({' x '.join(map(str, scan.size))} voxels)")


def start_reading(paths, meta, reporter) -> BackgroundRead:
    """Stage "read": refuse a scan too large for this machine's memory, then start reading the
    channels in the background."""
    reporter.stage("read")
    check_scan_fits(paths, meta)
    return BackgroundRead(paths)


def read_channels(paths, warn: Callable[[str], None] = lambda _: None,
                  series: str | None = None, volumes: tuple[int, ...] = ()) -> list[sitk.Image]:
    """Input channels on the grid of the first; others are resampled onto it (linear) with a warning. ``series``:
    the DICOM series a folder channel reads (a case of one series among several in a folder); ``volumes``: where
    the channels are volumes of 4-D files, the index of each in its file (each file is read once)."""
    from .scancheck import refuse_label_map
    from .segfile import refuse_as_scan

    for path in paths:
        refuse_as_scan(path)
    files: dict[Path, sitk.Image] = {}
    images = []
    for path, volume in zip(map(Path, paths), volumes or [None] * len(paths)):
        if path not in files:
            files[path] = _read_file(path, warn, series)
        images.append(_one_volume(files[path], path, volume))
        refuse_label_map(images[-1], str(path))
    reference = Grid.of(images[0])
    for i in range(1, len(images)):
        if not Grid.of(images[i]).matches(reference):
            images[i] = _onto_first_grid(images[i], reference, paths[i], paths[0], warn)
    return images


def _onto_first_grid(image: sitk.Image, reference: Grid, path, first, warn) -> sitk.Image:
    """A channel resampled onto the first channel's grid. Where it does not reach (another field of view), it is
    filled with its lowest value, as the space outside a scan: a zero there is tissue-bright in a z-scored MR
    (brain-tumor-mr's whole-tumour Dice on pat0003 with a T1c slab: 0.29 filled with zero, 0.70 with the lowest)."""
    share = float(covered_mask(Grid.of(image), reference).mean())
    if share == 0:
        raise UserError(f"{path} and {first} do not overlap in space: they are not scans of one patient in one "
                        "position, or a header's origin or direction is wrong")
    image = sitk.Cast(image, sitk.sitkFloat32)
    values = sitk.GetArrayViewFromImage(image)
    lowest = float(np.min(values, where=np.isfinite(values), initial=np.inf))
    lowest = 0.0 if math.isinf(lowest) else lowest
    message = f"{path} is on a different grid from {first}; resampling it onto that grid"
    if share < MIN_COVERED_SHARE:
        message += (f", which it covers only {share:.0%} of: the rest is filled with its lowest value ({lowest:g}), "
                    "where the model sees none of it")
    warn(message)
    return resample_onto(image, reference, sitk.sitkLinear, lowest)


def check_labelmap_path(path: str | Path) -> None:
    if full_suffix(Path(path)).lower() not in LABELMAP_SUFFIXES:
        raise UserError(f"{path}: unsupported output type; use one of {', '.join(LABELMAP_SUFFIXES)}")


def _labelmap_pixel_type(labels: list[Label]):
    return sitk.sitkUInt8 if max((l.value for l in labels), default=0) <= 255 else sitk.sitkUInt16


def write_labelmap(image: sitk.Image, path: str | Path, labels: list[Label], origin: LabelmapOrigin | None = None,
                   unsure_ml: dict[int, float] | None = None) -> None:
    """Write atomically; ``.seg.nrrd`` carries each label as a named Slicer segment, and the header what made
    the map (``origin``) and, but in NIfTI (its one description is full), the volume the model was unsure of per
    label value (``unsure_ml``: kept maps then still have it, see ``labelmap_unsure_ml``)."""
    path = Path(path)
    check_labelmap_path(path)
    image = sitk.Cast(image, _labelmap_pixel_type(labels))
    fields = {f"{PROVENANCE_PREFIX}{key}": value for key, value in (origin._asdict() if origin else {}).items()}
    if unsure_ml is not None:
        fields[UNSURE_FIELD] = json.dumps({str(value): round(ml, 2) for value, ml in sorted(unsure_ml.items())})
    suffix = full_suffix(path).lower()
    if suffix in (".nii", ".nii.gz"):
        if origin:
            image.SetMetaData(NIFTI_NOTES, NOTES_SEPARATOR.join(origin)[:79])
    elif suffix != ".seg.nrrd":
        for key, value in fields.items():
            image.SetMetaData(key, value)
    with atomic_output(path) as tmp:
        if suffix == ".seg.nrrd":
            _write_seg_nrrd(image, tmp, labels, fields)
        else:
            write_image(image, tmp, path)


def labelmap_unsure_ml(path: str | Path) -> dict[int, float] | None:
    """The unsure volume per label value that write_labelmap kept in a label map's header; None where there is
    none (a NIfTI, a map made elsewhere or saved again by another program)."""
    header = read_header(path)
    if header is None or not header.HasMetaDataKey(UNSURE_FIELD):
        return None
    try:
        return {int(value): float(ml) for value, ml in json.loads(header.GetMetaData(UNSURE_FIELD)).items()}
    except (ValueError, TypeError, AttributeError):  # not what write_labelmap writes
        return None


def labelmap_model(path: str | Path) -> LabelmapOrigin | None:
    """What made a label map, as write_labelmap wrote it into the header; None when the header names no model
    (a map made elsewhere) or cannot be read."""
    header = read_header(path)
    if header is None:
        return None
    keys = set(header.GetMetaDataKeys())
    fields = [f"{PROVENANCE_PREFIX}{field}" for field in LabelmapOrigin._fields]
    if set(fields) <= keys:
        return LabelmapOrigin(*map(header.GetMetaData, fields))
    notes = header.GetMetaData(NIFTI_NOTES).split(NOTES_SEPARATOR) if NIFTI_NOTES in keys else []
    if len(notes) == len(LabelmapOrigin._fields) and notes[0].startswith("hybridmim "):
        origin = LabelmapOrigin(*notes)
        return origin if origin.model_sha256 else None
    return None


def write_image(image: sitk.Image, tmp: Path, path: Path) -> None:
    """Write ``image`` compressed into ``tmp``, the temporary file of ``path`` (see ``atomic_output``), and make
    sure it is whole: ITK's NIfTI writer does not report a full disk (the file just ends early, and ITK reads it
    back without a word), its NRRD writer says only that gzip failed. So when the disk had less room than the
    voxels, the file is checked, and a failure there is the full disk (OSError ENOSPC: one line, file removed)."""
    data_bytes = image.GetNumberOfPixels() * image.GetNumberOfComponentsPerPixel() * image.GetSizeOfPixelComponent()
    cramped = shutil.disk_usage(tmp.parent).free < data_bytes * 1.01 + (1 << 20)  # gzip can outgrow its data
    disk_full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    try:
        sitk.WriteImage(image, str(tmp), useCompression=True)
    except RuntimeError as exc:
        if cramped:
            raise disk_full from None
        raise UserError(f"{path}: cannot be written: {message_line(exc, last=True)}") from None
    if cramped and not _holds_all_voxels(tmp, data_bytes):
        raise disk_full


def _holds_all_voxels(path: Path, data_bytes: int) -> bool:
    """Whether a written NIfTI holds ``data_bytes`` of voxels (a .gz read to its end); other formats' writers
    report their own failed writes."""
    suffix = full_suffix(path).lower()
    if suffix == ".nii":
        return path.stat().st_size >= data_bytes
    if suffix != ".nii.gz":
        return True
    total = 0
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 22):
                total += len(chunk)
    except (OSError, EOFError, zlib.error):
        return False
    return total >= data_bytes


def _write_seg_nrrd(image: sitk.Image, path: Path, labels: list[Label], fields: dict[str, str]) -> None:
    import slicerio

    voxels_zyx = sitk.GetArrayViewFromImage(image)
    segments = []
    for label in labels:
        segment = {
            "id": f"Segment_{label.value}",
            "labelValue": label.value,
            "layer": 0,
            "name": label.name,
            "color": [c / 255.0 for c in label.color],
        }
        terminology = label.slicer_terminology()
        if terminology:
            segment["terminology"] = terminology
        segments.append(segment)
    segmentation = {
        # slicerio writes Fortran order: index the voxels as (i, j, k).
        "voxels": np.asarray(voxels_zyx).transpose(2, 1, 0),
        "ijkToLPS": Grid.of(image).ijk_to_lps(),
        "segments": segments,
        "encoding": "gzip",
        **fields,  # slicerio writes other keys as the NRRD's own fields
    }
    slicerio.write_segmentation(str(path), segmentation)
