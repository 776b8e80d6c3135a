"""The model catalog (Resources/Models/catalog.json): bundled and downloadable
models, sample data, and turning ``--model NAME|PATH`` into a verified file."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .download import cache_dir, fetch_verified, file_sha256
from .errors import UserError
from .jsonfile import read_json
from .progress import Reporter

_PACKAGE = Path(__file__).resolve().parent


def resources_dir() -> Path:
    """The module's Resources folder (Slicer layout or source tree), else hybridmim/resources (an installed wheel)."""
    for candidate in (_PACKAGE.parent / "Resources", _PACKAGE / "resources"):
        if (candidate / "Models" / "catalog.json").is_file():
            return candidate
    raise UserError("the model catalog (Resources/Models/catalog.json) is missing from this installation")


def models_dir() -> Path:
    """``$HYBRIDMIM_MODELS_DIR``, else the installation's Resources/Models."""
    if os.environ.get("HYBRIDMIM_MODELS_DIR"):
        return Path(os.environ["HYBRIDMIM_MODELS_DIR"])
    return resources_dir() / "Models"


@dataclass(frozen=True)
class Entry:
    """A catalog model or sample: bundled (``file`` in the models folder) or downloadable (``url``)."""

    name: str
    title: str
    file: str
    sha256: str
    url: str = ""
    size: int = 0
    modality: str = ""
    license: str = ""
    description: str = ""

    @property
    def bundled(self) -> bool:
        return not self.url


@dataclass(frozen=True)
class Catalog:
    models: tuple[Entry, ...]
    samples: tuple[Entry, ...]
    default_model: str
    folder: Path
    default_pretrained_model: str = ""

    def model(self, name: str) -> Entry:
        for entry in self.models:
            if entry.name == name:
                return entry
        raise UserError(f"unknown model {name!r}; `hybridmim models` lists the available ones")

    def sample(self, name: str) -> Entry:
        for entry in self.samples:
            if entry.name == name:
                return entry
        known = ", ".join(e.name for e in self.samples)
        raise UserError(f"unknown sample {name!r} (available: {known})")

    def local_path(self, entry: Entry, kind: str = "models") -> Path:
        return self.folder / entry.file if entry.bundled else cache_dir() / kind / entry.file


def _entries(items, source: Path) -> tuple[Entry, ...]:
    fields = set(Entry.__dataclass_fields__)
    try:
        return tuple(Entry(**{k: v for k, v in item.items() if k in fields}) for item in items)
    except TypeError as exc:
        raise UserError(f"{source}: bad entry ({exc})") from None


def load_catalog(folder: Path | None = None) -> Catalog:
    folder = folder or models_dir()
    path = folder / "catalog.json"
    data = read_json(path, "model catalog", an_object=True)
    return Catalog(_entries(data.get("models", []), path), _entries(data.get("samples", []), path),
                   data.get("default_model", ""), folder, data.get("default_pretrained_model", ""))


def _looks_like_path(spec: str) -> bool:
    return os.sep in spec or "/" in spec or spec.endswith((".safetensors", ".pt", ".pth")) or Path(spec).exists()


def resolve_model(spec: str | None, reporter: Reporter, catalog: Catalog | None = None,
                  pretrained: bool = False) -> Path:
    """A checkpoint file for ``spec``: a path, a catalog name, or None for the default
    segmentation model (``pretrained``: the default pre-trained reconstruction model)."""
    if spec and _looks_like_path(spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise UserError(f"{path}: no such model file")
        return path
    catalog = catalog or load_catalog()
    default = catalog.default_pretrained_model if pretrained else catalog.default_model
    if not (spec or default):
        raise UserError("the catalog names no default pre-trained model; pass --model")
    entry = catalog.model(spec or default)
    path = catalog.local_path(entry)
    if entry.bundled:
        if not path.is_file():
            raise UserError(f"bundled model {entry.name!r} is missing ({path}); reinstall the extension")
        if file_sha256(path) != entry.sha256:
            raise UserError(f"bundled model {entry.name!r} ({path}) does not match the catalog's SHA256; "
                            "reinstall the extension")
        return path
    return fetch_verified(entry.url, path, entry.sha256, reporter)


def resolve_sample(name: str, reporter: Reporter, catalog: Catalog | None = None) -> Path:
    catalog = catalog or load_catalog()
    entry = catalog.sample(name)
    return fetch_verified(entry.url, catalog.local_path(entry, "samples"), entry.sha256, reporter)
