"""What ITK's NIfTI reader does not say about a file, read from its header and voxel bytes: that it is truncated
(ITK fills the missing voxels with 0), and where its floating-point voxels are NaN or infinite (ITK before 6
reads them as 0, a valid intensity: 0 HU is water, so a CT's missing region would look like tissue)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import UserError

_FLOAT_TYPES = {16: "f4", 64: "f8"}  # NIfTI datatype codes of float32 and float64
_BLOCK_BYTES = 1 << 22  # streamed in blocks: a large scan's voxels are never held twice


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith((".nii", ".nii.gz"))


@dataclass(frozen=True)
class _Header:
    byte_order: str  # "<" or ">"
    datatype: int
    bitpix: int
    voxels: int
    offset: int  # where the voxels start
    zero_reads_as: float  # what ITK reads a stored 0 as (scl_inter; it puts 0 for NaN before scaling)

    @property
    def end(self) -> int:
        return self.offset + self.voxels * self.bitpix // 8


def _header(raw: bytes) -> _Header | None:
    """A NIfTI-1 or NIfTI-2 header's layout of the voxels, or None if ``raw`` does not start one."""
    if len(raw) < 4:  # a file of a few bytes: ITK's read then says it is no image
        return None
    for order in "<>":
        size = struct.unpack(order + "i", raw[:4])[0]
        if size == 348 and len(raw) >= 348:
            datatype, bitpix = struct.unpack(order + "2h", raw[70:74])
            dims = struct.unpack(order + "8h", raw[40:56])
            offset = max(int(struct.unpack(order + "f", raw[108:112])[0]), 352)
            intercept = struct.unpack(order + "f", raw[116:120])[0]
            break
        if size == 540 and len(raw) >= 540:
            datatype, bitpix = struct.unpack(order + "2h", raw[12:16])
            dims = struct.unpack(order + "8q", raw[16:80])
            offset = max(struct.unpack(order + "q", raw[168:176])[0], 544)
            intercept = struct.unpack(order + "d", raw[184:192])[0]
            break
    else:
        return None
    voxels = 1
    for extent in dims[1: 1 + max(0, min(7, dims[0]))]:
        voxels *= max(1, extent)
    return _Header(order, datatype, bitpix, voxels, offset, intercept if math.isfinite(intercept) else 0.0)


def _opener(path: Path):
    """gzip.open or open, by the file's first bytes (ITK reads an uncompressed file named .nii.gz too)."""
    with open(path, "rb") as f:
        return gzip.open if f.read(2) == b"\x1f\x8b" else open


def check_complete(path: Path) -> None:
    """A UserError for a truncated or corrupt NIfTI file."""
    opener = _opener(path)
    try:
        with opener(path, "rb") as f:
            header = _header(f.read(544))
            if header is None or (opener is gzip.open and _gzip_stated_size(path) == header.end % 2**32):
                return  # a complete gzip stream states its length at its end: no need to inflate it twice
            f.seek(0)
            length = 0
            for block in iter(lambda: f.read(_BLOCK_BYTES), b""):
                length += len(block)
    except (EOFError, OSError, zlib.error):
        raise UserError(f"{path}: truncated or corrupt file") from None
    if length < header.end:
        raise UserError(f"{path}: truncated file ({length} of {header.end} bytes)")


def _gzip_stated_size(path: Path) -> int:
    """The uncompressed length (mod 2**32) a gzip file's trailer states; from a truncated file, arbitrary bytes."""
    with open(path, "rb") as f:
        f.seek(-4, os.SEEK_END)
        return int.from_bytes(f.read(4), "little")


def non_finite_indices(path: Path, stop: threading.Event) -> np.ndarray | None:
    """Flat indices, in the file's voxel order, of a float NIfTI's NaN and infinite voxels; None for other files,
    or once ``stop`` is set."""
    with _opener(path)(path, "rb") as f:
        header = _header(f.read(544))
        if header is None or _FLOAT_TYPES.get(header.datatype) is None:
            return None
        dtype = np.dtype(header.byte_order + _FLOAT_TYPES[header.datatype])
        f.seek(header.offset)
        found, start, block_voxels = [], 0, _BLOCK_BYTES // dtype.itemsize
        while start < header.voxels:
            if stop.is_set():
                return None
            block = np.frombuffer(f.read(min(block_voxels, header.voxels - start) * dtype.itemsize), dtype)
            found.append(start + np.flatnonzero(~np.isfinite(block)))
            start += block_voxels
    return np.concatenate(found) if found else None


def may_hide_non_finite(image: sitk.Image, path: Path) -> bool:
    """Whether ``image``, as ITK read it from the NIfTI file ``path``, has a voxel at the value ITK gives NaN and
    infinite voxels (0, or the header's scl_inter, which ITK adds to every voxel): if not, the file has none."""
    if image.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        return False
    with _opener(path)(path, "rb") as f:
        header = _header(f.read(544))
    hidden = header.zero_reads_as if header is not None else 0.0
    return bool((sitk.GetArrayViewFromImage(image) == hidden).any())


def with_nan_at(image: sitk.Image, indices: np.ndarray | None) -> sitk.Image:
    """``image`` as ITK read it from a NIfTI file, with the voxels that are NaN or infinite in the file
    (``non_finite_indices``) NaN again, for the scan checks to name and fill (scancheck.finite_volume)."""
    if indices is None or not len(indices) or image.GetNumberOfComponentsPerPixel() != 1:
        return image
    array = sitk.GetArrayFromImage(image)  # ITK keeps the file's voxel order: x fastest, as numpy's (z, y, x)
    array.reshape(-1)[indices] = np.nan
    restored = sitk.GetImageFromArray(array)
    restored.CopyInformation(image)
    return restored
