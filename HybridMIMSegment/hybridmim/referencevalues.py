"""What the values of ``evaluate``'s reference label maps stand for: {value in the maps: the model's label value}.

By default the model's own labels say it (their values, or their source values: BraTS 1 and 3 are its tumour
core). A dataset folder's dataset.json names its values; where it names some by the model's label names, those
names decide (a Decathlon liver task's 1 is the abdominal model's liver, not its spleen), and the values it names
otherwise count as background. A JSON file of the user's, {"value": "the model's label name", …}, overrides both.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .datasetindex import values_named_as
from .errors import UserError
from .jsonfile import read_json
from .labels import label_of_segment

EXAMPLE = '{"1": "peritumoral oedema", "3": "enhancing tumour"}'


def read_reference_values(path: str | Path, meta) -> dict[int, int]:
    """The values a user's file ({"value": "label name", …}) says the reference maps hold each of the model's (of
    ``meta``) labels as; values it does not list count as background."""
    document = read_json(path, "reference values file", an_object=True, hint=f"write it as {EXAMPLE}")
    known = ", ".join(label.name for label in meta.labels)
    lookup = {}
    for key, name in document.items():
        if not key.isdigit() or int(key) == 0 or not isinstance(name, str):
            raise UserError(f"{path}: pairs each label-map value from 1 with the name of a label of the model, as "
                            f"{EXAMPLE}; not {key!r}: {name!r}")
        label = label_of_segment({"name": name}, meta.labels)
        if label is None:
            raise UserError(f"{path}: {name!r} is no label of the model ({known})")
        lookup[int(key)] = label.value
    if not lookup:
        raise UserError(f"{path}: names no label-map value; write it as {EXAMPLE}")
    return lookup


def dataset_lookup(folder: Path, meta, warn: Callable[[str], None]) -> dict[int, int]:
    """{value in the label maps of the cases in ``folder``: the model's label value}: the model's own, with the
    values the folder's dataset.json names by a label name of the model taking that label, and the others it
    names counted as background, with a warning. Where it names none by the model's names, its names say nothing
    of the model's labels and the values are scored as the model's, with a warning that says so."""
    lookup = dict(meta.source_lookup)
    matched = values_named_as(folder, meta.labels)
    if not matched:
        return lookup
    hint = "a --reference-values FILE says which label each value is"
    if not any(label for _, label in matched):
        names = {label.value: repr(label.name) for label in meta.labels}
        scored = ", ".join(f"{entry['value']} {entry['name']!r} as "
                           f"{names.get(lookup.get(entry['value']), 'background')}" for entry, _ in matched)
        warn(f"{folder}: its dataset.json names none of the model's labels; its values are scored as the model's: "
             f"{scored} ({hint})")
        return lookup
    for entry, label in matched:
        lookup[entry["value"]] = label.value if label else 0  # 0: background, said here once and not for each case
    unknown = [f"{entry['value']} {entry['name']!r}" for entry, label in matched if label is None]
    if unknown:
        warn(f"{folder}: its dataset.json names values that are no label of the model, counted as background: "
             f"{', '.join(unknown)} ({hint})")
    return lookup
