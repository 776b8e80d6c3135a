"""The engine's JSON inputs (recipes, labels files, the catalog, dataset and prepared-folder indexes), read with a
one-line refusal where a file is missing, is not JSON, or holds a list or value where an object belongs."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError

_SHOWN = 40  # characters of a document of the wrong kind shown in its refusal


def read_json(path: str | Path, what: str, an_object: bool = False, hint: str = ""):
    """The document in ``path``, a ``what`` ("recipe"), which must be a JSON object where ``an_object``; ``hint``:
    what to do where it cannot be read. A byte-order mark (Windows PowerShell and Notepad write one) is read past."""
    try:
        document = json.loads(Path(path).read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable {what} ({exc}){'; ' * bool(hint)}{hint}") from None
    if an_object and not isinstance(document, dict):
        shown = json.dumps(document)
        raise UserError(f"{path}: a {what} is a JSON object ({{…}}), not {shown[:_SHOWN]}"
                        f"{'…' * (len(shown) > _SHOWN)}")
    return document
