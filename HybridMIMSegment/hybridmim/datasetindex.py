"""Dataset folders described by a ``dataset.json``: the Medical Segmentation Decathlon's, whose cases are listed
under "training" (with label maps) and "test" (without), a case's "image" one file (or in MONAI's datalists a file
per channel); and nnU-Net v2's raw datasets, whose cases are found by name: ``imagesTr/CASE_0000.nii.gz``
(``_0001``, … for more channels) with ``labelsTr/CASE.nii.gz``, and ``imagesTs`` without labels (or its training
cases listed by name under "dataset"). Where labels are read (``labelled``), the cases without them are not listed.

Both name their channels (the Decathlon's "modality", whose multi-modal images are 4-D: a volume per channel;
nnU-Net's "channel_names", a file each); a model takes those of its channels' names (channelnames.py)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from .channelnames import is_file_channel_name, named_ends, shared_name
from .errors import UserError
from .jsonfile import read_json
from .labels import Label, label_of_segment
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


def dataset_labels(folder: Path, refuse_unreadable: bool = True) -> list[dict] | None:
    """The labels a dataset.json names (the Decathlon's ``{"1": "tumour"}``, nnU-Net v2's ``{"tumour": 1}``) as label
    entries (parse_labels' form), valued as in the label maps, coloured from matplotlib's tab10, without
    terminology codes; None where it names none. A table of nnU-Net regions or of other than value and name is
    refused where ``refuse_unreadable`` (the labels of a run), else None (they only tell what values are)."""
    path = folder / DATASET_JSON
    index = read_json(path, "dataset index", an_object=True)
    table = index.get("labels")
    if not isinstance(table, dict) or not table:
        return None
    if _is_decathlon(index):
        pairs = [(int(key) if key.isdigit() else key, name) for key, name in table.items()]
    elif any(isinstance(value, list) for value in table.values()):
        if not refuse_unreadable:
            return None
        raise UserError(f"{path}: its labels are nnU-Net regions (lists of values, which overlap); name the "
                        "structures to segment with --labels FILE")
    else:
        pairs = [(value, name) for name, value in table.items()]
    if not all(isinstance(value, int) and isinstance(name, str) for value, name in pairs):
        if not refuse_unreadable:
            return None
        raise UserError(f"{path}: its 'labels' pair each label-map value with a name, not {json.dumps(table)[:80]}")
    from matplotlib import colormaps

    colours = colormaps["tab10"]
    named = sorted((value, name) for value, name in pairs if value != 0)  # 0: the background
    return [{"value": value, "name": name, "color": [round(255 * c) for c in colours(number % colours.N)[:3]]}
            for number, (value, name) in enumerate(named)]


def values_named_as(folder: Path, labels: list[Label]) -> list[tuple[dict, Label | None]]:
    """Each value a dataset folder's dataset.json names (its label entry), with the one of ``labels`` named as it
    (label_of_segment), else None; [] where there is no index or it names no value alone (nnU-Net regions)."""
    named = dataset_labels(folder, refuse_unreadable=False) if is_dataset_folder(folder) else None
    return [(entry, label_of_segment(entry, labels)) for entry in named or []]


def _is_decathlon(index: dict) -> bool:
    return "training" in index or "test" in index


def _channel_names(path: Path, table, key: str) -> tuple[str, ...]:
    """The names an index's ``key`` table ({"0": "FLAIR", "1": "T1w", …}) gives its channels, in their order."""
    if not isinstance(table, dict):  # a Decathlon index's "modality": "CT" (nnU-Net's is checked before)
        return ()
    if not all(isinstance(k, str) and k.isdigit() for k in table) or \
            sorted(map(int, table)) != list(range(len(table))):
        raise UserError(f"{path}: its '{key}' numbers the channels from 0 ({{\"0\": \"FLAIR\", \"1\": \"T1c\"}}), "
                        f"not {json.dumps(table)[:80]}")
    return tuple(str(table[str(number)]) for number in range(len(table)))


def _decathlon_cases(path: Path, index: dict, labelled: bool) -> list[Case]:
    lists = [index.get(part, []) for part in ("training", "test")]
    if not all(isinstance(entries, list) for entries in lists):
        raise UserError(f"{path}: its 'training' and 'test' are lists of cases")
    names = _channel_names(path, index.get("modality"), "modality")
    volumes = tuple(range(len(names))) if len(names) > 1 else ()  # several: the volumes of a 4-D image
    cases = []
    for entry in lists[0] + ([] if labelled else lists[1]):  # "test" cases have no label maps
        image = entry.get("image") if isinstance(entry, dict) else entry
        label = entry.get("label") if isinstance(entry, dict) else None
        images = [image] if isinstance(image, str) else image  # MONAI's datalists: a file per channel
        if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images) or \
                not isinstance(label, (str, type(None))):
            raise UserError(f"{path}: a case whose image (or label) is no file name: {json.dumps(entry)[:80]}")
        if labelled and label is None:
            raise UserError(f"{path}: the training case {images[0]} names no 'label'")
        images = [_portable(image) for image in images]
        label_path = path.parent / _portable(label) if label else None
        if len(images) > 1:
            cases.append(_case_of_files(path, images, label_path, names))
        else:
            cases.append(Case(image_stem(Path(images[0])), (path.parent / images[0],) * max(1, len(volumes)),
                              label_path, volumes=volumes, channel_names=names))
    if not cases:
        raise UserError(f"{path}: lists no {'training ' if labelled else ''}cases")
    _check_listed_files(path, cases, labelled)
    return cases


def _portable(listed: str) -> str:
    """A file an index lists, its folders parted by "/" where Windows wrote "\\" (Windows reads both; elsewhere a
    backslash would be part of the file's name)."""
    return listed.replace("\\", "/")


def _case_of_files(path: Path, images: list[str], label: Path | None, names: tuple[str, ...]) -> Case:
    """A case of a file per channel (MONAI's datalists), named by what the files' names share, its channels by
    the index's "modality", else by the ends of the files' names (BraTS' _flair, _t1ce), else not at all."""
    stems = [image_stem(Path(image)) for image in images]
    shared = shared_name(stems)
    ends = named_ends(stems, shared) if shared else None
    if len(names) != len(images):
        names = tuple(ends) if ends and all(is_file_channel_name(end) for end in ends) else ()
    return Case(shared or stems[0], tuple(path.parent / image for image in images), label, channel_names=names)


def _check_listed_files(path: Path, cases: list[Case], labelled: bool) -> None:
    """Refuse an index whose cases' files (their label maps too, where ``labelled``) are not all there (a
    download cut short, a case moved)."""
    files = [(file, f"an image of case {case.name}") for case in cases for file in dict.fromkeys(case.channels)]
    files += [(case.label, f"the label map of case {case.name}") for case in cases if labelled]
    missing = [(file, what) for file, what in files if not file.is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more of the {len(files)} files it lists)" if len(missing) > 1 else ""
        raise UserError(f"{missing[0][0]}: missing; {path} lists it as {missing[0][1]}{more}")


def _nnunet_cases(path: Path, index: dict, labelled: bool) -> list[Case]:
    ending, channels = index.get("file_ending"), index.get("channel_names")
    if not isinstance(ending, str) or ending.lower() not in IMAGE_SUFFIXES:
        raise UserError(f"{path}: its images are {json.dumps(ending)} files; the engine reads "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    if not isinstance(channels, dict) or not channels:
        raise UserError(f"{path}: its 'channel_names' name no channel ({{\"0\": \"CT\"}} for one)")
    names = _channel_names(path, channels, "channel_names")
    parts = NNUNET_PARTS[:1] if labelled else NNUNET_PARTS
    listed = index.get("dataset")  # the training cases by name, in place of imagesTr and labelsTr
    cases = _nnunet_listed_cases(path, listed, names, labelled) if listed is not None else []
    for images, labels in parts[1:] if listed is not None else parts:
        firsts = sorted(p for p in (path.parent / images).glob(f"*_0000{ending}") if not p.name.startswith("."))
        for first in firsts:  # (a "._" file is macOS's resource fork, not an image)
            name = first.name[:-len(f"_0000{ending}")]
            files = tuple(first.parent / f"{name}_{k:04d}{ending}" for k in range(len(names)))
            missing = next((f for f in files if not f.is_file()), None)
            if missing is not None:
                raise UserError(f"{missing}: missing; {path} names {len(names)} channels ({', '.join(names)}), "
                                "a file each")
            label = path.parent / labels / f"{name}{ending}" if labels else None
            if label is not None and not label.is_file():
                if labelled:
                    raise UserError(f"{label}: missing; {labels} holds the label map of each case in {images}")
                label = None
            cases.append(Case(name, files, label, channel_names=names))
    if not cases:
        where = " or ".join(part for part, _ in parts)
        raise UserError(f"{path.parent}: no images named CASE_0000{ending} in {where} (nnU-Net v2's layout)")
    return cases


def _nnunet_listed_cases(path: Path, listed, names: tuple[str, ...], labelled: bool) -> list[Case]:
    """The training cases an nnU-Net index lists under "dataset": {CASE: {"images": [a file per channel],
    "label": file}}, their files relative to its folder or absolute."""
    if not isinstance(listed, dict) or not listed:
        raise UserError(f"{path}: its 'dataset' lists no case ({{\"CASE\": {{\"images\": [...], \"label\": ...}}}})")
    cases = []
    for name, entry in listed.items():
        images, label = (entry.get("images"), entry.get("label")) if isinstance(entry, dict) else (None, None)
        if not isinstance(images, list) or not all(isinstance(i, str) for i in images) or not isinstance(label, str):
            raise UserError(f"{path}: its case {name} is no {{\"images\": [a file per channel], \"label\": file}}: "
                            f"{json.dumps(entry)[:80]}")
        if len(images) != len(names):
            raise UserError(f"{path}: its case {name} lists {len(images)} image(s), where 'channel_names' names "
                            f"{len(names)} channels ({', '.join(names)})")
        files = tuple(path.parent / _portable(image) for image in images)  # (an absolute path stays as it is)
        cases.append(Case(name, files, path.parent / _portable(label), channel_names=names))
    _check_listed_files(path, cases, labelled)
    return [case if case.label.is_file() else dataclasses.replace(case, label=None) for case in cases]
