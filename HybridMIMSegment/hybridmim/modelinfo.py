"""Human-readable descriptions of checkpoints, of the catalog and of the devices (CLI and Slicer panel)."""

from __future__ import annotations

from pathlib import Path

from .catalog import load_catalog
from .checkpoint import ModelMeta, read_metadata
from .errors import UserError


def describe(meta: ModelMeta, path: Path) -> str:
    p = meta.preprocessing
    spacing = "native" if p.spacing is None else " x ".join(f"{s:g}" for s in p.spacing) + " mm"
    if p.intensity.kind == "window":
        intensity = f"window {p.intensity.window[0]:g}..{p.intensity.window[1]:g} -> {p.intensity.output_range}"
    else:
        intensity = "z-score" + (" over non-zero voxels" if p.intensity.nonzero else "")
    lines = [
        f"{meta.title or path.stem}",
        f"  file:          {path}",
        f"  task:          {meta.task}",
        f"  method:        {meta.method}",
        "  network:       " + ", ".join(f"{k}={v}" for k, v in meta.network.items()),
        "  inputs:        " + ", ".join(f"{c['name']} ({c.get('modality', '?')})" for c in meta.channels),
        f"  preprocessing: orientation {p.orientation}, spacing {spacing}, {intensity}"
        + ("" if p.foreground_threshold is None else f", crop to > {p.foreground_threshold:g}"),
        f"  inference:     window {tuple(meta.roi_size)}, overlap {meta.overlap}",
    ]
    if meta.pretraining:
        lines.append("  pretraining:   " + ", ".join(f"{k}={v}" for k, v in meta.pretraining.items()))
    if meta.labels:
        lines.append(f"  labels ({len(meta.labels)}):")
    for label in meta.labels:
        code = label.terminology.get("type", ["", "", ""])
        modifier = label.terminology.get("typeModifier")
        codes = f"{code[0]} {code[1]} {code[2]}" + (f", {modifier[2]}" if modifier else "") if code[1] else "no code"
        sources = f"  (label-map values {', '.join(map(str, label.source_values))})" if label.source_values else ""
        largest = "  (largest piece only)" if label.largest_component else ""
        lines.append(f"    {label.value:>3} {label.name:<28} rgb{tuple(label.color)}  [{codes}]{sources}{largest}")
    for region in meta.regions:
        names = [label.name for label in meta.labels if label.value in region["values"]]
        lines.append(f"  region:        {region['name']} = {' + '.join(names)}")
    if meta.description:
        lines.append(f"  description:   {meta.description}")
    provenance = meta.provenance
    if provenance:
        lines.append("  provenance:    " + ", ".join(
            f"{k}={provenance[k]}" for k in ("steps", "train_seconds", "created") if k in provenance))
    for name, value in meta.metrics.items():
        lines.append(f"  metric:        {name}: {value}")
    return "\n".join(lines)


def list_models() -> list[dict]:
    catalog = load_catalog()
    rows = []
    for entry in catalog.models:
        path = catalog.local_path(entry)
        if entry.bundled:
            status = "bundled"
        elif path.is_file():
            status = "downloaded"
        else:
            status = f"download ({entry.size / 2**20:.0f} MB)" if entry.size else "download"
        row = {"name": entry.name, "title": entry.title, "modality": entry.modality, "status": status,
               "default": entry.name == catalog.default_model,
               "default_pretrained": entry.name == catalog.default_pretrained_model,
               "license": entry.license, "path": str(path)}
        if path.is_file():
            try:
                meta = read_metadata(path)
                row["task"] = meta.task
                row["segments"] = [label.name for label in meta.labels]
                row["channels"] = [c["name"] for c in meta.channels]
                row["metrics"] = meta.metrics
            except UserError as exc:
                row["status"] = f"unreadable: {exc}"
        rows.append(row)
    return rows


def describe_devices(devices: dict) -> str:
    """One line for ``hybridmim devices``' outputs: the GPUs, or that the CPU will be used."""
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']:g} GiB)" for g in devices["gpus"])
    return f"GPU: {gpus}" if gpus else f"no GPU: the CPU will be used ({devices['cpu_threads']} threads)"
