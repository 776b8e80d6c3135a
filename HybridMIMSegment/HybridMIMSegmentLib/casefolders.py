"""Training data from the scene, in the layouts the engine reads: for fine-tuning one folder per case
with ``image.nii.gz`` and ``label.nii.gz`` (segments matched to the labels of the model the run starts from,
else a labels file made from the segments' names, colours and terminology); for pre-training a folder of
image files."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from hybridmim.atomic import atomic_output
from hybridmim.labels import Label, parse_labels, plain_name, segment_entry


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


@dataclass(frozen=True)
class CaseLabels:
    """How the scene's segmentations become a fine-tuning run's label maps."""

    labels: list[dict] | None  # the run's labels file; None: the init model's own (its output layer carries over)
    values: list[list[int]]  # per case, the label-map value of each of its segments, in the order given
    notes: list[str]  # lines for the log: how the segments were read


def case_labels(cases: Sequence[tuple[str, list[dict]]], init_labels: Sequence[Label]) -> CaseLabels:
    """``cases``: (segmentation name, its segments as ``{"name", "color", "terminology": Slicer's tag or ""}``).

    Where every segment is one of the init model's labels (by name, else terminology, as the engine matches a
    saved segmentation's), the run keeps that model's labels: a model refined on its own corrected output keeps
    its output layer, and a segment deleted because the structure is absent is background in that case.
    Otherwise the labels are the segments' own (value = order of first appearance), which every case must then
    name alike: a name missing from one case would teach the model that the structure is absent there."""
    from slicerio.segmentation import terminology_entry_from_string

    from hybridmim.labels import label_of_segment

    def entry(segment):
        tag = segment.get("terminology")
        return {"name": segment["name"], "terminology": terminology_entry_from_string(tag) if tag else None}

    empty = [name for name, segments in cases if not segments]
    if empty:
        raise RuntimeError(f"{empty[0]} has no segments: segment the structures to learn in it first")
    matched = [[label_of_segment(entry(s), list(init_labels)) for s in segments] for _, segments in cases]
    unmatched = list(dict.fromkeys(s["name"] for (_, segments), labels in zip(cases, matched)
                                   for s, label in zip(segments, labels) if label is None))
    if init_labels and not unmatched:
        notes = ["every segment is a label of the model the run starts from: the run keeps its labels and output "
                 "layer"]
        for (name, _), labels in zip(cases, matched):
            absent = [label.name for label in init_labels if label not in labels]
            if absent:
                notes.append(f"{name}: no segment for {', '.join(absent)}; background there")
        return CaseLabels(None, [[label.sources[0] for label in labels] for labels in matched], notes)
    first_name, first = cases[0]
    names = list(dict.fromkeys(plain_name(s["name"]) for s in first))
    for name, segments in cases[1:]:
        if set(plain_name(s["name"]) for s in segments) != set(names):
            raise RuntimeError(f"{name} has segments {[s['name'] for s in segments]}, {first_name} "
                               f"{[s['name'] for s in first]}: every case needs the same segments (an empty one "
                               "where the structure is absent)")
    unique = [next(s for s in first if plain_name(s["name"]) == name) for name in names]
    notes = [f"segments that are none of the labels of the model the run starts from: {', '.join(unmatched)}; the "
             "run learns the segments' own labels (those named as its labels keep their output channels)"] \
        if init_labels else []
    return CaseLabels(labels_from_segments(unique),
                      [[names.index(plain_name(s["name"])) + 1 for s in segments] for _, segments in cases], notes)


def relabelled(exported: np.ndarray, values: list[int]) -> np.ndarray:
    """A label map exported with segments numbered 1, 2, … in the order given, with each segment's value instead."""
    return np.asarray([0, *values], dtype=np.uint16)[exported]


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
