"""``hybridmim segment --data``: many scans segmented with one model load, one label map per case in a folder.

Cases are found as for ``evaluate`` and ``finetune`` (image files, case folders, folders of them,
Decathlon folders; label maps are ignored), and DICOM series folders. Everything that can be
refused for the whole run is refused before the first case (model, channel counts, clashing or
existing outputs); a case that fails on its own (unreadable, too large for the memory, …) is
reported and skipped, and the run ends with an error naming the failed cases once the others are
written; an image that is no 3-D scan (a PACS export's scout or dose report) is left out with a warning, not
failed; a full disk stops the run at its case (every next write would fail too). ``statistics.csv``
beside the label maps lists every segment's volume and mean intensity per case. Outputs are written
atomically, so an interrupted or stopped run can be continued with ``--skip-existing``.
"""

from __future__ import annotations

import csv
import io
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_output, check_inputs_kept, check_new_output, make_folder
from .errors import DiskFull, NotAScan, UserError
from .progress import MEAN_PREFIX, Reporter

if TYPE_CHECKING:  # imageio loads SimpleITK: imported where it is used
    from .imageio import LabelmapOrigin

STATISTICS_NAME = "statistics.csv"
FORMATS = (".seg.nrrd", ".nii.gz", ".nrrd", ".mha")


def output_format(text: str) -> str:
    """A label-map format given as ``seg.nrrd`` or ``.seg.nrrd``, as its suffix."""
    suffix = "." + text.lower().lstrip(".")
    if suffix not in FORMATS:
        raise UserError(f"--format {text}: use one of {', '.join(f[1:] for f in FORMATS)}")
    return suffix


def _planned_outputs(cases, folder: Path, suffix: str, previews: bool) -> dict[str, dict[str, Path]]:
    """{case name: {"segmentation": path, "preview": path}}; refuses names that would share a file."""
    seen: dict[str, str] = {}
    for case in cases:
        key = case.name.lower()  # one file on case-insensitive file systems (Windows, macOS)
        if key in seen:
            raise UserError(f"two cases are named {case.name!r} ({seen[key]} and {case.channels[0]}); their outputs "
                            "would be the same file: rename one, or segment them in separate runs")
        seen[key] = str(case.channels[0])
    planned = {}
    for case in cases:
        paths = {"segmentation": folder / f"{case.name}{suffix}"}
        if previews:
            paths["preview"] = folder / f"{case.name}.png"
        check_inputs_kept(case.channels, paths.values())
        planned[case.name] = paths
    return planned


def _statistics_csv(statistics: dict[str, list[dict]], channel_names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    means = [MEAN_PREFIX + name for name in channel_names]
    writer.writerow(["case", "value", "structure", "volume_ml", "at_edge", "unsure_ml", *means])
    for case, segments in statistics.items():
        for s in segments:
            edge = (" ".join(s["at_edge"]) or "no") if s["volume_ml"] else ""
            writer.writerow([case, s["value"], s["name"], f"{s['volume_ml']:.2f}", edge,
                             *("" if s[key] is None else f"{s[key]:.2f}" for key in ["unsure_ml", *means])])
    return out.getvalue()


def _earlier_unsure_ml(path: Path) -> dict[str, dict[int, float]]:
    """{case: {label value: unsure ml}} from an earlier run's statistics.csv (empty where there is none or it
    cannot be read): a NIfTI map's header has no room for them."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        earlier: dict[str, dict[int, float]] = {}
        for row in rows:
            if row.get("unsure_ml"):
                earlier.setdefault(row["case"], {})[int(row["value"])] = float(row["unsure_ml"])
        return earlier
    except (OSError, ValueError, KeyError, TypeError, csv.Error):
        return {}


def _check_kept_maps_model(paths: list[Path], origin: LabelmapOrigin, reporter: Reporter) -> set[Path]:
    """Label maps kept by --skip-existing must be the model's that segments the rest: another model's would be
    counted and drawn with this one's labels (a tumour model's 1 as the abdominal model's spleen). Returns those
    whose headers name no model (made elsewhere: kept with a warning)."""
    from .imageio import labelmap_model

    unnamed = []
    for path in paths:
        made_by = labelmap_model(path)
        if made_by is None:
            unnamed.append(path)
        elif not origin.model_sha256.startswith(made_by.model_sha256):
            name, renamed = made_by.model, made_by.model != origin.model
            raise UserError(f"{path}: made by the model {name}{'' if renamed else ' (another file of that name)'}, "
                            f"not by {origin.model}; --skip-existing keeps only label maps of the model that "
                            f"segments the rest: {f'continue with --model {name}, or ' if renamed else ''}pass "
                            "--overwrite to replace them")
    if unnamed:
        reporter.warning(f"label maps kept whose headers name no model (made elsewhere?), counted with the labels of "
                         f"{origin.model}: {', '.join(p.name for p in unnamed[:3])}{' …' * (len(unnamed) > 3)}")
    return set(unnamed)


def segment_cases(data: list[str], output: str, model: str | None = None, device: str = "auto",
                  suffix: str = ".seg.nrrd", previews: bool = False, overwrite: bool = False,
                  skip_existing: bool = False, reporter: Reporter | None = None) -> dict:
    """Segment every case in ``data`` into the folder ``output``; returns what was written and skipped.

    ``skip_existing``: a case whose label map exists is kept (its preview, if asked for and missing,
    is drawn from that label map).
    """
    from .devices import resolve_device
    from .imageio import labelmap_unsure_ml, read_volume, write_labelmap
    from .predict import cases_fitted_to_model, load_network, read_inputs, segment_channels
    from .segment import labelmap_origin, segment_statistics, segmentation_model
    from .volumes import find_cases

    reporter = reporter or Reporter("quiet")
    started = time.time()
    if overwrite and skip_existing:
        raise UserError("--overwrite and --skip-existing exclude each other: replace the outputs, or keep them")
    folder = Path(output)
    if folder.is_file():
        raise UserError(f"{folder}: is a file; with --data, -o names a folder for the label maps")
    cases = find_cases(data, dicom=True, warn=reporter.warning)
    planned = _planned_outputs(cases, folder, suffix, previews)
    existing = [p for paths in planned.values() for p in paths.values() if p.exists()]
    if existing and not (overwrite or skip_existing):
        raise UserError(f"{existing[0]}: already exists ({len(existing)} of the outputs do); pass --skip-existing "
                        "to continue an earlier run, or --overwrite to replace them")
    statistics_path = check_new_output(folder / STATISTICS_NAME, overwrite or skip_existing)
    kept = set() if overwrite else {c.name for c in cases if planned[c.name]["segmentation"].exists()}
    earlier_unsure = _earlier_unsure_ml(statistics_path) if kept else {}

    reporter.stage("load model")
    checkpoint, meta = segmentation_model(model, reporter)
    cases = cases_fitted_to_model(cases, meta, checkpoint.name, reporter.warning)
    origin = labelmap_origin(checkpoint)
    made_elsewhere = _check_kept_maps_model([planned[name]["segmentation"] for name in sorted(kept)], origin, reporter)
    make_folder(folder, "the output folder")
    network = None
    if len(kept) < len(cases):
        device = resolve_device(device, reporter)
        network = load_network(checkpoint, meta, device, reporter)

    statistics, failed, left_out, channel_names = {}, {}, [], [c["name"] for c in meta.channels]
    full = None  # the case at which the disk was found full: the run stops there
    reporter.stage("segment")
    for index, case in enumerate(cases):
        paths, case_started, keep = planned[case.name], time.time(), case.name in kept
        draw = "preview" in paths and not (keep and paths["preview"].exists())
        try:
            warn = lambda text, name=case.name: reporter.warning(f"{name}: {text}")  # noqa: E731
            channels = read_inputs(case, meta, warn)
            if keep:  # how unsure the model was, the earlier run kept in the map's header, else (NIfTI) its table
                labels, unsure_ml = read_volume(paths["segmentation"]), labelmap_unsure_ml(paths["segmentation"])
                if unsure_ml is None and paths["segmentation"] not in made_elsewhere:
                    unsure_ml = earlier_unsure.get(case.name)
            else:
                labels, unsure_ml = segment_channels(channels, network, meta, device)
                write_labelmap(labels, paths["segmentation"], meta.labels, origin, unsure_ml)
            if draw:
                from .preview import render_preview

                render_preview(channels[0], labels, meta.labels, paths["preview"],
                               meta.preprocessing.intensity.window, f"{case.name}: {meta.title or checkpoint.stem}")
        except NotAScan as exc:
            left_out.append(case.name)
            reporter.warning(exc.left_out(case.name))
        except UserError as exc:
            failed[case.name] = str(exc)
            reporter.warning(f"{case.name}: skipped: {exc}")
            if isinstance(exc, DiskFull):
                full = f"{case.name} ({index + 1} of {len(cases)})"
                break
        else:
            statistics[case.name] = segment_statistics(labels, meta.labels, channels, channel_names, unsure_ml)
            found = sum(s["volume_ml"] > 0 for s in statistics[case.name])
            how = "kept from an earlier run" if keep else f"{time.time() - case_started:.1f} s"
            reporter.info(f"{case.name}: {found} of {len(meta.labels)} segments found ({how})")
        reporter.progress(index + 1, len(cases))

    try:
        with atomic_output(statistics_path) as tmp:
            tmp.write_text(_statistics_csv(statistics, channel_names), encoding="utf-8")
    except DiskFull:
        if full is None:
            raise
    if full:  # --skip-existing rebuilds the statistics of the cases kept
        done = sum(1 for c in cases if c.name not in failed and planned[c.name]["segmentation"].exists())
        raise UserError(f"the disk is full: stopped at {full}; {done} label maps are in {folder}. Make room, then "
                        "run the same command with --skip-existing to continue")
    if failed:
        names = ", ".join(list(failed)[:5]) + (" …" if len(failed) > 5 else "")
        raise UserError(f"{len(failed)} of {len(cases)} cases failed ({names}; the warnings above say why); "
                        f"the other {len(statistics)} are in {folder}")
    if not statistics:
        raise NotAScan.none_left(len(cases), "segment")
    summary = {"folder": str(folder), "statistics": str(statistics_path), "model": checkpoint.stem,
               "cases": len(cases), "segmented": len(cases) - len(kept) - len(left_out), "kept": len(kept),
               "left_out": left_out,
               "seconds": round(time.time() - started, 2)}
    if network is not None:
        summary["device"] = device
    reporter.done(summary)
    return summary
