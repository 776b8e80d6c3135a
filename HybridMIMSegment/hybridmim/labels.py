"""Label tables: value, name, colour and standard (SNOMED CT) terminology.

A terminology entry uses Slicer's structure (as in slicerio): ``category``
and ``type`` (and optional ``typeModifier``, ``anatomicRegion``,
``anatomicRegionModifier``) are ``[scheme, code, meaning]`` triplets.

``source_values``: the values that stand for a label in the training data's
label maps when they differ from its own value (BraTS maps, for instance,
code necrosis 1 and non-enhancing tumour 3, which one label may join).
Regions are named unions of labels scored by ``evaluate`` (BraTS whole
tumour, tumour core); a labels file is then ``{"labels": [...], "regions":
[{"name": ..., "values": [...]}]}`` instead of a plain list.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

CODE_FIELDS = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")
# what a label entry holds (Label.to_dict writes no other)
LABEL_FIELDS = ("value", "name", "color", "terminology", "source_values", "largest_component")
DEFAULT_CONTEXT = "Segmentation category and type - DICOM master list"
# DICOM retired the designator SRT for SNOMED CT's SCT (same codes), which older Slicer versions wrote
_SCHEME_NAMES = {"SRT": "SCT"}


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict = field(default_factory=dict, compare=False)
    source_values: tuple[int, ...] = ()
    largest_component: bool = False  # one structure per scan (an organ, a tumour): keep its largest piece

    @property
    def sources(self) -> tuple[int, ...]:
        """The label-map values this label stands for in training data."""
        return self.source_values or (self.value,)

    def to_dict(self) -> dict:
        out = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.terminology:
            out["terminology"] = self.terminology
        if self.source_values:
            out["source_values"] = list(self.source_values)
        if self.largest_component:
            out["largest_component"] = True
        return out

    def slicer_terminology(self) -> dict | None:
        """The entry in slicerio's form, with Slicer's default context names filled in."""
        if not self.terminology:
            return None
        entry = {"contextName": DEFAULT_CONTEXT, "anatomicContextName": "Anatomic codes - DICOM master list"}
        entry.update(self.terminology)
        return entry


def _check_code(where: str, code) -> None:
    if not (isinstance(code, list) and len(code) == 3 and all(isinstance(c, str) for c in code) and code[1]):
        raise UserError(f"{where}: a code must be [scheme, value, meaning], got {code!r}")


def parse_labels(entries, source: str = "label table") -> list[Label]:
    """Validated labels from a list of dicts; raises UserError naming the bad entry."""
    if not isinstance(entries, list) or not entries:
        raise UserError(f"{source}: expected a non-empty list of labels")
    labels, seen_values = [], set()
    for i, entry in enumerate(entries):
        where = f"{source}, label {i + 1}"
        if not isinstance(entry, dict):
            raise UserError(f"{where}: expected an object")
        value, name, color = entry.get("value"), entry.get("name"), entry.get("color")
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 65535:
            raise UserError(f"{where}: 'value' must be an integer from 1 to 65535 (0 is background)")
        if value in seen_values:
            raise UserError(f"{where}: value {value} appears twice")
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"{where}: 'name' must be a non-empty string")
        channels_ok = isinstance(color, list) and len(color) == 3
        if not (channels_ok and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise UserError(f"{where}: 'color' must be [r, g, b] with integers 0-255")
        terminology = entry.get("terminology") or {}
        if not isinstance(terminology, dict):
            raise UserError(f"{where}: 'terminology' must be an object")
        for key in CODE_FIELDS:
            if key in terminology:
                _check_code(f"{where}, terminology {key}", terminology[key])
        if terminology and not all(k in terminology for k in ("category", "type")):
            raise UserError(f"{where}: terminology needs at least 'category' and 'type'")
        sources = entry.get("source_values", [])
        if not (isinstance(sources, list) and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1
                                                  for v in sources)):
            raise UserError(f"{where}: 'source_values' must be a list of positive integers")
        largest = entry.get("largest_component", False)
        if not isinstance(largest, bool):
            raise UserError(f"{where}: 'largest_component' must be true or false")
        seen_values.add(value)
        labels.append(Label(value, name.strip(), tuple(color), dict(terminology), tuple(sources), largest))
    source_lookup(labels, source)
    return labels


def plain_name(name: str) -> str:
    """A segment's or label's name as names are compared: case and spacing aside."""
    return " ".join(name.split()).casefold()


def _same_code(first, second) -> bool:
    """Two [scheme, value, meaning] codes are the same code: scheme and value (the meaning is free text)."""
    return _SCHEME_NAMES.get(first[0], first[0]) == _SCHEME_NAMES.get(second[0], second[0]) and first[1] == second[1]


def _terminology_names(entry: dict, label: Label) -> bool:
    """Whether a terminology entry (slicerio's form: a segment's, or another label's) is the label's: the same
    category, type and type modifier; the anatomic region counts only where both give one (Slicer leaves it empty
    for most structures)."""
    ours = label.terminology
    if not ours or not all(f in entry and _same_code(entry[f], ours[f]) for f in ("category", "type")):
        return False
    if ("typeModifier" in entry) != ("typeModifier" in ours):
        return False
    shared = [f for f in ("typeModifier", "anatomicRegion") if f in entry and f in ours]
    return all(_same_code(entry[f], ours[f]) for f in shared)


def label_of_segment(segment: dict, labels: list[Label]) -> Label | None:
    """The label a segment is: the one of its name (case and spacing aside; the name is what Slicer shows), else
    the one its terminology names (None where the codes fit several labels: Slicer gives new segments the same
    generic "Tissue" codes)."""
    name = plain_name(str(segment.get("name", "")))
    by_name = [label for label in labels if plain_name(label.name) == name]
    return by_name[0] if by_name else label_of_codes(segment.get("terminology"), labels)


def label_of_codes(entry: dict | None, labels: list[Label]) -> Label | None:
    """The one label whose terminology a terminology entry (slicerio's form) names; None where none or several do."""
    by_codes = [label for label in labels if entry and _terminology_names(entry, label)]
    return by_codes[0] if len(by_codes) == 1 else None


def segment_entry(value: int, name: str, color, terminology: dict | None) -> dict:
    """A label entry (parse_labels' form) for a Slicer segment: ``color`` (r, g, b) in 0..1, ``terminology`` in
    slicerio's form (or None); only the codes Slicer filled in are kept, and only with a category and a type."""
    entry = {"value": value, "name": name, "color": [max(0, min(255, round(c * 255))) for c in color]}
    codes = {k: list(terminology[k]) for k in CODE_FIELDS if terminology and terminology.get(k) and terminology[k][1]}
    if "category" in codes and "type" in codes:
        entry["terminology"] = codes
    return entry


def class_indices(labels: list[Label]) -> dict[int, int]:
    """{value in the training label maps: class index (the output channel; 0 is background)}."""
    return {source: i + 1 for i, label in enumerate(labels) for source in label.sources}


def source_lookup(labels: list[Label], source: str = "label table") -> dict[int, int]:
    """{value in the training label maps: label value}; a map value may stand for one label only."""
    lookup: dict[int, int] = {}
    for label in labels:
        for value in label.sources:
            if value in lookup:
                raise UserError(f"{source}: label-map value {value} is claimed by two labels")
            lookup[value] = label.value
    return lookup


def parse_regions(entries, labels: list[Label], source: str = "label table") -> list[dict]:
    """Validated regions: [{"name": str, "values": [label values]}]."""
    if not isinstance(entries, list):
        raise UserError(f"{source}: 'regions' must be a list")
    known, names = {label.value for label in labels}, {label.name for label in labels}
    regions = []
    for i, entry in enumerate(entries):
        where = f"{source}, region {i + 1}"
        name, values = (entry.get("name"), entry.get("values")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or not name.strip() or name.strip() in names:
            raise UserError(f"{where}: 'name' must be a non-empty string unlike every other label or region name")
        if not (isinstance(values, list) and values and set(values) <= known):
            raise UserError(f"{where}: 'values' must list some of the labels' values {sorted(known)}")
        names.add(name.strip())
        regions.append({"name": name.strip(), "values": sorted(set(values))})
    return regions


def _check_label_fields(entries, source: str) -> None:
    for i, entry in enumerate(entries if isinstance(entries, list) else ()):
        unknown = set(entry) - set(LABEL_FIELDS) if isinstance(entry, dict) else set()
        if unknown:
            raise UserError(f"{source}, label {i + 1}: unknown keys {sorted(unknown)} "
                            f"(known: {', '.join(LABEL_FIELDS)})")


def parse_label_file(document, source: str = "labels file") -> tuple[list[Label], list[dict]]:
    """(labels, regions) from a labels document: a list of labels, or {"labels": [...], "regions": [...]}. A
    misspelt key ("source_value") and two labels of one name are refused: unread, the one would be left out without a
    word, and segments are matched to labels by name (checkpoints made before these checks are read as they are)."""
    if isinstance(document, dict):
        unknown = set(document) - {"labels", "regions"}
        if unknown:
            raise UserError(f"{source}: unknown keys {sorted(unknown)} (expected 'labels' and 'regions')")
        _check_label_fields(document.get("labels"), source)
        labels = parse_labels(document.get("labels"), source)
        regions = parse_regions(document.get("regions", []), labels, source)
    else:
        _check_label_fields(document, source)
        labels, regions = parse_labels(document, source), []
    names = [plain_name(label.name) for label in labels]
    twice = next((label.name for label, name in zip(labels, names) if names.count(name) > 1), None)
    if twice is not None:
        raise UserError(f"{source}: two labels are named {twice!r} (case and spacing aside); name each structure once")
    return labels, regions
