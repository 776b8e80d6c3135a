"""Dataset folders described by a ``dataset.json``: the Medical Segmentation Decathlon's, whose cases are listed
under "training" (with label maps) and "test" (without), and nnU-Net v2's raw datasets, whose cases are found by
name: ``imagesTr/CASE_0000.nii.gz`` (``_0001``, … for more channels) with ``labelsTr/CASE.nii.gz``, and
``imagesTs`` without labels. Where labels are read (``labelled``), the cases without them are not listed."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .jsonfile import read_json
from .volumes import IMAGE_SUFFIXES, Case, image_stem

DATASET_JSON = "dataset.json"
# nnU-Net v2's folders: (images, their label maps or None)
NNUNET_PARTS = (("imagesTr", "labelsTr"), ("imagesTs", None))


def is_dataset_folder(folder: Path) -> bool:
    return (folder / DATASET_JSON).is_file()


def dataset_cases(folder: Path, labelled: bool) -> list[Case]:
    """The cases of a Decathlon or nnU-Net v2 dataset folder; those with label maps only, where ``labelled``."""
    path = folder / DATASET_JSON
    index = read_json(path, "dataset index", an_object=True)
    if _is_decathlon(index):
        return _decathlon_cases(path, index, labelled)
    if "file_ending" in index:
        return _nnunet_cases(path, index, labelled)
    raise UserError(f"{path}: lists no cases: a Decathlon index has 'training' (and 'test'), an nnU-Net v2 index "
                    "'file_ending' and 'channel_names'")


def dataset_labels(folder: Path) -> list[dict] | None:
    """The labels a dataset.json names (the Decathlon's ``{"1": "tumour"}``, nnU-Net v2's ``{"tumour": 1}``) as label
    entries (parse_labels' form), valued as in the label maps, coloured from matplotlib's tab10, without
    terminology codes; None where it names none."""
    path = folder / DATASET_JSON
    index = read_json(path, "dataset index", an_object=True)
    table = index.get("labels")
    if not isinstance(table, dict) or not table:
        return None
    if _is_decathlon(index):
        pairs = [(int(key) if key.isdigit() else key, name) for key, name in table.items()]
    elif any(isinstance(value, list) for value in table.values()):
        raise UserError(f"{path}: its labels are nnU-Net regions (lists of values, which overlap); name the "
                        "structures to segment with --labels FILE")
    else:
        pairs = [(value, name) for name, value in table.items()]
    if not all(isinstance(value, int) and isinstance(name, str) for value, name in pairs):
        raise UserError(f"{path}: its 'labels' pair each label-map value with a name, not {json.dumps(table)[:80]}")
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    named = sorted((value, name) for value, name in pairs if value != 0)  # 0: the background
    return [{"value": value, "name": name, "color": [round(255 * c) for c in colours(number % colours.N)[:3]]}
            for number, (value, name) in enumerate(named)]


def _is_decathlon(index: dict) -> bool:
    return "training" in index or "test" in index


def _decathlon_cases(path: Path, index: dict, labelled: bool) -> list[Case]:
    lists = [index.get(part, []) for part in ("training", "test")]
    if not all(isinstance(entries, list) for entries in lists):
        raise UserError(f"{path}: its 'training' and 'test' are lists of cases")
    cases = []
    for entry in lists[0] + ([] if labelled else lists[1]):  # "test" cases have no label maps
        image = entry.get("image") if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        if not isinstance(image, str) or not isinstance(label, (str, type(None))):
            raise UserError(f"{path}: a case whose image (or label) is no file name: {json.dumps(entry)[:80]}")
        if labelled and label is None:
            raise UserError(f"{path}: the training case {image} names no 'label'")
        cases.append(Case(image_stem(Path(image)), (path.parent / image,), path.parent / label if label else None))
    if not cases:
        raise UserError(f"{path}: lists no {'training ' if labelled else ''}cases")
    return cases


def _nnunet_cases(path: Path, index: dict, labelled: bool) -> list[Case]:
    ending, channels = index.get("file_ending"), index.get("channel_names")
    if not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: its images are {json.dumps(ending)} files; the engine reads "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{path}: its 'channel_names' name no channel ({{\"0\": \"CT\"}} for one)")
    names = ", ".join(str(name) for name in channels.values())
    cases = []
    for images, labels in NNUNET_PARTS[:1] if labelled else NNUNET_PARTS:
        firsts = sorted(p for p in (path.parent / images).glob(f"*_0000{ending}") if not p.name.startswith("."))
        for first in firsts:  # (a "._" file is macOS's resource fork, not an image)
            name = first.name[:-len(f"_0000{ending}")]
            files = tuple(first.parent / f"{name}_{k:04d}{ending}" for k in range(len(channels)))
            missing = next((f for f in files if not f.is_file()), None)
            if missing is not None:
                raise UserError(f"{missing}: missing; {path} names {len(channels)} channels ({names}), a file each")
            label = path.parent / labels / f"{name}{ending}" if labels else None
            if label is not None and not label.is_file():
                if labelled:
                    raise UserError(f"{label}: missing; {labels} holds the label map of each case in {images}")
                label = None
            cases.append(Case(name, files, label))
    if not cases:
        where = " or ".join(part for part, _ in (NNUNET_PARTS[:1] if labelled else NNUNET_PARTS))
        raise UserError(f"{path.parent}: no images named CASE_0000{ending} in {where} (nnU-Net v2's layout)")
    return cases
