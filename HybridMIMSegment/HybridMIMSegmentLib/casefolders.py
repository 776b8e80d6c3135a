"""Training data from the scene, in the layouts the engine reads: for fine-tuning one folder per case
with ``image.nii.gz`` and ``label.nii.gz``, and a labels file made from the segments' names,
colours and terminology (label value = segment order + 1, as the label-map export writes them);
for pre-training a folder of image files."""

from __future__ import annotations

import json
import re
from pathlib import Path

from hybridmim.atomic import atomic_output
from hybridmim.labels import parse_labels, segment_entry


def _file_name(index: int, volume_name: str) -> str:
    """``index`` and the volume's name, made safe for any file system (and unique by the index)."""
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", volume_name).strip("._") or "case"
    return f"{index:03d}_{safe}"


def case_folder(root: str | Path, index: int, volume_name: str) -> dict[str, Path]:
    """Where case ``index`` goes: a folder named after the volume."""
    folder = Path(root) / _file_name(index, volume_name)
    return {"folder": folder, "image": folder / "image.nii.gz", "label": folder / "label.nii.gz"}


def scan_file(root: str | Path, index: int, volume_name: str) -> Path:
    """Where scan ``index`` goes for pre-training: an image file named after the volume (NRRD: written fast)."""
    return Path(root) / f"{_file_name(index, volume_name)}.nrrd"


def labels_from_segments(segments: list[dict]) -> list[dict]:
    """Label entries from segments given as ``{"name", "color": (r, g, b) in 0..1, "terminology":
    Slicer's terminology tag or ""}``; checked as the engine will check them."""
    from slicerio.segmentation import terminology_entry_from_string

    labels = []
    for value, segment in enumerate(segments, start=1):
        tag = segment.get("terminology")
        labels.append(segment_entry(value, segment["name"], segment["color"],
                                    terminology_entry_from_string(tag) if tag else None))
    parse_labels(labels, "the scene's segments")
    return labels


def write_labels_file(path: str | Path, labels: list[dict]) -> Path:
    path = Path(path)
    with atomic_output(path) as tmp:
        tmp.write_text(json.dumps(labels, indent=1), encoding="utf-8")
    return path
