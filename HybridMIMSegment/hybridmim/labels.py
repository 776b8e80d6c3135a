"""Label tables: value, name, colour and standard (SNOMED CT) terminology.

A terminology entry uses Slicer's structure (as in slicerio): ``category``
and ``type`` (and optional ``typeModifier``, ``anatomicRegion``,
``anatomicRegionModifier``) are ``[scheme, code, meaning]`` triplets.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UserError

_CODE_FIELDS = ("category", "type", "typeModifier", "anatomicRegion", "anatomicRegionModifier")
DEFAULT_CONTEXT = "Segmentation category and type - DICOM master list"


@dataclass(frozen=True)
class Label:
    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict = field(default_factory=dict, compare=False)

    def to_dict(self) -> dict:
        out = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.terminology:
            out["terminology"] = self.terminology
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
        if not (isinstance(color, list) and len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)):
            raise UserError(f"{where}: 'color' must be [r, g, b] with integers 0-255")
        terminology = entry.get("terminology") or {}
        if not isinstance(terminology, dict):
            raise UserError(f"{where}: 'terminology' must be an object")
        for key in _CODE_FIELDS:
            if key in terminology:
                _check_code(f"{where}, terminology {key}", terminology[key])
        if terminology and not all(k in terminology for k in ("category", "type")):
            raise UserError(f"{where}: terminology needs at least 'category' and 'type'")
        seen_values.add(value)
        labels.append(Label(value, name.strip(), tuple(color), dict(terminology)))
    return labels
