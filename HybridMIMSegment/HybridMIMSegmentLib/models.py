"""The models the panel offers: the catalog's, then the user's own checkpoints (remembered in a
JSON file), each with the details a clinician needs before choosing it. Reads checkpoint
headers only (no torch)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from hybridmim.atomic import atomic_output
from hybridmim.catalog import load_catalog
from hybridmim.checkpoint import ModelMeta, read_metadata
from hybridmim.errors import UserError
from hybridmim.labels import Label


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model selector: ``spec`` is what the engine's ``--model``/``--init`` takes."""

    spec: str
    label: str
    modality: str
    task: str
    channels: tuple[str, ...]
    details: str
    user: bool = False
    labels: tuple[Label, ...] = ()  # what a segmentation model segments (none for a pre-trained one)


def details_text(meta: ModelMeta, licence: str = "", source: str = "") -> str:
    """Title, inputs, segments, licence and the recorded metrics, for a tooltip or a details box."""
    lines = [meta.title or source]
    lines.append("Inputs: " + ", ".join(f"{c['name']} ({c.get('modality', '')})" for c in meta.channels))
    if meta.labels:
        lines.append("Segments: " + ", ".join(label.name for label in meta.labels))
    if meta.regions:
        lines.append("Regions: " + ", ".join(region["name"] for region in meta.regions))
    if licence:
        lines.append(f"Licence: {licence}")
    for name, value in meta.metrics.items():
        lines.append(f"{name}: {json.dumps(value)[:300]}")
    if source:
        lines.append(f"File: {source}")
    return "\n".join(lines)


def _choice(spec: str, path: Path, licence: str, user: bool) -> ModelChoice:
    meta = read_metadata(path)
    modality = "+".join(sorted({c.get("modality", "") for c in meta.channels}))
    label = f"{meta.title or path.stem} [{'your model' if user else spec}]"
    return ModelChoice(spec, label, modality, meta.task, tuple(c["name"] for c in meta.channels),
                       details_text(meta, licence, str(path)), user, tuple(meta.labels))


def catalog_choices() -> list[ModelChoice]:
    """The catalog's models that are on this machine (bundled or downloaded before), default first."""
    catalog = load_catalog()
    choices = []
    for entry in sorted(catalog.models, key=lambda e: e.name != catalog.default_model):
        path = catalog.local_path(entry)
        if path.is_file():
            choices.append(_choice(entry.name, path, entry.license, user=False))
    return choices


class UserModels:
    """The user's own checkpoints, remembered across sessions in ``store`` (a JSON list of paths)."""

    def __init__(self, store: str | Path):
        self.store = Path(store)

    def paths(self) -> list[Path]:
        """The remembered checkpoints that still exist, in the order they were added."""
        try:
            listed = json.loads(self.store.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return []
        return [Path(p) for p in listed if isinstance(p, str) and Path(p).is_file()]

    def add(self, path: str | Path) -> ModelChoice:
        """Remember ``path`` (checked first: a file that is not one of our checkpoints is refused)."""
        path = Path(path).resolve()
        choice = _choice(str(path), path, "", user=True)
        kept = [p for p in self.paths() if p != path] + [path]
        with atomic_output(self.store) as tmp:
            tmp.write_text(json.dumps([str(p) for p in kept], indent=1), encoding="utf-8")
        return choice

    def choices(self) -> list[ModelChoice]:
        """Remembered checkpoints that are still readable; one that became unreadable is skipped."""
        found = []
        for path in self.paths():
            try:
                found.append(_choice(str(path), path, "", user=True))
            except UserError:
                continue
        return found


def needs_conversion(path: str | Path) -> bool:
    """An official HybridMIM pickle, to import with ``hybridmim convert`` before use."""
    return Path(path).suffix.lower() in (".pt", ".pth", ".ckpt")
