"""Where a fine-tuning run starts: the network, pre-processing and labels, and the init checkpoint's weights.

The encoder and decoder come from ``--init`` (any of our checkpoints: a pre-trained reconstruction model, or a
segmentation model to refine on new cases); network, channels and pre-processing follow it (the recipe's
``scratch`` block when there is none), so the data are prepared exactly as in pre-training. Of the output layer,
the channels of the labels the init model segments too (by name, else terminology codes) carry over; the others
are new.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..catalog import resolve_model
from ..checkpoint import check_channels, inference_settings, read_metadata
from ..datasetindex import dataset_labels, is_dataset_folder, values_named_as
from ..download import file_sha256
from ..errors import UserError
from ..jsonfile import read_json
from ..labels import Label, label_of_codes, label_of_segment, parse_label_file, plain_name, source_lookup
from ..preprocessing import Preprocessing
from ..progress import Reporter
from ..volumes import find_cases, is_prepared_folder, is_segmentation_file, prepared_labels


def read_labels(source) -> tuple[list[Label], list[dict]]:
    """(labels, regions) from a labels file path or an inline document (see labels.py)."""
    if not isinstance(source, str):
        return parse_label_file(source, "recipe labels")
    return parse_label_file(read_json(source, "labels file"), source)


@dataclass
class Start:
    """Where a run starts: the network description and, unless from scratch, the init weights."""

    network: dict
    channels: list
    preprocessing: Preprocessing
    roi_size: tuple
    overlap: float
    labels: list[Label]
    regions: list[dict]
    init: dict  # provenance of the init checkpoint ({} from scratch)
    weights: dict | None
    # per output channel (0: background), the init model's channel for the same structure, or None (new); None
    # when the two share no label: the output layer is new
    head_channels: list[int | None] | None
    labels_of_data: list[dict] | None = None  # labels read from the cases' segmentations (kept for a resume)
    init_labels: list[Label] = field(default_factory=list)  # the labels the init model segments

    @property
    def keep_head(self) -> bool:
        """The init model segments these very labels: its whole output layer carries over."""
        return self.head_channels == list(range(len(self.labels) + 1)) and len(self.init_labels) == len(self.labels)

    def kept_labels(self) -> list[Label]:
        """The labels whose output channel comes from the init model."""
        return [label for label, channel in zip(self.labels, (self.head_channels or [])[1:]) if channel is not None]


def labels_named_by_datasets(data_paths, known: list[Label], reporter: Reporter) -> list[dict] | None:
    """The labels the dataset.json of the run's dataset folders name (the same in each that names any), or None.
    They describe the data's label maps, so they come before the init model's; those named as one of ``known`` (the
    init model's labels) take its colour and terminology codes."""
    tables = [table for path in map(Path, data_paths) if is_dataset_folder(path) and (table := dataset_labels(path))]
    if not tables:
        return None
    if any(table != tables[0] for table in tables):
        raise UserError("the data's dataset.json files name different labels: name those to segment with --labels "
                        "FILE")
    entries = []
    for entry in tables[0]:
        same = label_of_segment(entry, known)  # by name: the dataset's labels have no codes
        described = {key: value for key, value in same.to_dict().items() if key in ("color", "terminology")} \
            if same else {}
        entries.append({**entry, **described})
    uncoded = [entry["name"] for entry in entries if "terminology" not in entry]
    which = "" if len(uncoded) == len(entries) else f"{', '.join(uncoded)} "
    reporter.info(f"labels of the data's dataset.json: {', '.join(e['name'] for e in entries)}"
                  + (f" ({which}without terminology codes: --labels FILE gives them)" if uncoded else ""))
    return entries


def check_datasets_name_labels_alike(labels: list[Label], data_paths) -> None:
    """Refuse labels (a labels file's, a recipe's) that read a value of the data's label maps as another label than
    the one their dataset.json names it by: a Decathlon BrainTumour's 3 ("enhancing tumour") is tumour core to the
    BraTS codes of scripts/labels/brats.json, which would teach it as that."""
    lookup, by_value = source_lookup(labels), {label.value: label.name for label in labels}
    for path in map(Path, data_paths):
        for entry, named in values_named_as(path, labels):
            taken = lookup.get(entry["value"])
            if named is not None and taken != named.value:
                reads = f"as {by_value[taken]!r}" if taken else "as background"
                raise UserError(f"{path}: its dataset.json names the value {entry['value']} {entry['name']!r}, which "
                                f"the labels read {reads}: give {named.name!r} that value (or \"source_values\": "
                                f"[{entry['value']}]) in the labels file, or leave --labels out to use the dataset's")


def labels_from_cases(data_paths, reporter: Reporter) -> list[dict]:
    """The labels of a run that nothing else names: those a prepared folder was made with, or those of its cases'
    Slicer segmentations (label.seg.nrrd), one per distinct segment name."""
    from ..segfile import labels_of_segmentations

    asked = ("name the structures to segment with --labels FILE (a JSON list of value, name, colour and "
             "terminology; see scripts/labels/)")
    prepared = [prepared_labels(Path(p)) for p in data_paths if is_prepared_folder(p)]
    if prepared:
        if len(prepared) < len(data_paths) or not prepared[0] or any(p != prepared[0] for p in prepared):
            raise UserError(asked)
        reporter.info(f"labels of the prepared data: {', '.join(e['name'] for e in prepared[0])}")
        return prepared[0]
    if not data_paths:
        raise UserError(asked)
    files = [case.label for case in find_cases(data_paths, labelled=True)]
    if not all(is_segmentation_file(f) for f in files):
        raise UserError(f"{asked}, or give every case as a Slicer segmentation (label.seg.nrrd), whose segments "
                        "name them")
    entries = labels_of_segmentations(files)
    if not entries:
        raise UserError(f"{asked}: the cases' segmentations hold no named segments")
    reporter.info(f"labels from the cases' segmentations: {', '.join(e['name'] for e in entries)}")
    return entries


def resolve_start(init: str, recipe: dict, labels_file, reporter: Reporter, data_paths=()) -> Start:
    """Network, pre-processing, labels and init weights of a run. Labels: ``labels_file`` (a path, or the labels
    themselves), else the recipe's, else those its dataset folders' dataset.json name, else the init model's, else
    the distinct segments of ``data_paths``' cases."""
    if init == "scratch":
        scratch = recipe["scratch"]
        check_channels(scratch["channels"], "recipe 'scratch'")
        roi_size, overlap = inference_settings(scratch, "recipe 'scratch'")
        base = {"network": scratch["network"], "channels": scratch["channels"],
                "preprocessing": Preprocessing.from_dict(scratch["preprocessing"]),
                "roi_size": roi_size, "overlap": overlap}
        init_meta, weights, provenance = None, None, {}
    else:
        from safetensors.torch import load_file

        path = resolve_model(init, reporter)
        init_meta = read_metadata(path)
        base = {"network": init_meta.network, "channels": init_meta.channels, "preprocessing": init_meta.preprocessing,
                "roi_size": tuple(init_meta.roi_size), "overlap": init_meta.overlap}
        weights = load_file(str(path))
        provenance = {"file": path.name, "sha256": file_sha256(path), "task": init_meta.task,
                      "method": init_meta.method, "title": init_meta.title, "pretraining": init_meta.pretraining}
    labels_of_data = None
    if labels_file or recipe.get("labels"):
        labels, regions = read_labels(labels_file or recipe["labels"])
        check_datasets_name_labels_alike(labels, data_paths)
    else:
        labels_of_data = labels_named_by_datasets(data_paths, init_meta.labels if init_meta else [], reporter)
        if labels_of_data is None and init_meta is not None and init_meta.labels:
            labels, regions = list(init_meta.labels), list(init_meta.regions)
        else:
            labels_of_data = labels_of_data or labels_from_cases(data_paths, reporter)
            labels, regions = parse_label_file(labels_of_data, "the data's labels")
    network = {**base["network"], "in_channels": len(base["channels"]), "out_channels": len(labels) + 1}
    init_labels = list(init_meta.labels) if init_meta is not None else []
    return Start(network, list(base["channels"]), base["preprocessing"], base["roi_size"], base["overlap"], labels,
                 regions, provenance, weights, shared_channels(init_labels, labels), labels_of_data, init_labels)


def shared_channels(init_labels: list[Label], labels: list[Label]) -> list[int | None] | None:
    """Per output channel of a network for ``labels`` (0: background), the channel of a model for ``init_labels``
    that segments the same structure, else None; None where they share no structure (a pre-trained model has
    none), the background then being another thing too. The same structure: the same name (case and spacing
    aside), else the one label whose terminology codes are the same (a structure renamed, "Hepar" for "liver");
    each init channel carries over once."""
    by_name = {plain_name(label.name): index for index, label in enumerate(init_labels, start=1)}
    shared = [by_name.get(plain_name(label.name)) for label in labels]
    for position, label in enumerate(labels):
        if shared[position] is None:
            found = label_of_codes(label.terminology, [init for index, init in enumerate(init_labels, start=1)
                                                       if index not in shared])
            shared[position] = None if found is None else init_labels.index(found) + 1
    return [0, *shared] if any(channel is not None for channel in shared) else None


def transfer_weights(network: torch.nn.Module, weights: dict, head_channels: list[int | None] | None) -> dict:
    """Load every init tensor into ``network``; of the output layer, the channels ``head_channels`` names (see
    Start), the others left at their initialisation.

    Returns {"transferred": n, "new": [names of the tensors left wholly at their initialisation]}.
    """
    head = network.head_name + "."
    own = network.state_dict()
    taken = {k: v for k, v in weights.items() if k in own and not k.startswith(head)}
    mismatched = [k for k, v in taken.items() if tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise UserError(f"init checkpoint: {mismatched[0]} has shape {tuple(taken[mismatched[0]].shape)}, "
                        f"the network needs {tuple(own[mismatched[0]].shape)}")
    loaded = {k: v.to(own[k].dtype) for k, v in taken.items()}
    shared_head = [k for k in own if k.startswith(head) and k in weights] if head_channels else []
    for name in shared_head:
        if tuple(weights[name].shape[1:]) != tuple(own[name].shape[1:]):
            raise UserError(f"init checkpoint: {name} has shape {tuple(weights[name].shape)}, the network needs "
                            f"{tuple(own[name].shape)}")
        rows = own[name].clone()
        for channel, init_channel in enumerate(head_channels):
            if init_channel is not None:
                rows[channel] = weights[name][init_channel].to(rows.dtype)
        loaded[name] = rows
    new = sorted(set(own) - set(loaded))
    if any(not k.startswith(head) for k in new):
        raise UserError(f"init checkpoint lacks {len(new)} of the network's tensors (first: {new[0]})")
    network.load_state_dict({**own, **loaded})
    return {"transferred": len(loaded), "new": new}


def head_summary(start: Start, new: list[str]) -> str:
    """What became of the output layer, for the log."""
    if start.keep_head:
        return "the output layer kept too: the same labels"
    channels = start.head_channels[1:] if start.head_channels else []
    kept = [_kept_name(label, start.init_labels[channel - 1]) for label, channel in zip(start.labels, channels)
            if channel is not None]
    if not kept:
        return f"{len(new)} new ({', '.join(new)})"
    fresh = [label.name for label, channel in zip(start.labels, channels) if channel is None]
    left_out = "; its other labels left out" if len(kept) < len(start.init_labels) else ""
    return (f"of the output layer, the channels of background, {', '.join(kept)} kept (labels of the init model)"
            + (f", of {', '.join(fresh)} new" if fresh else "") + left_out)


def _kept_name(label: Label, init_label: Label) -> str:
    """A kept label as the log names it: with the init model's name for it where that differs."""
    same = plain_name(label.name) == plain_name(init_label.name)
    return label.name if same else f"{label.name} (its {init_label.name})"
