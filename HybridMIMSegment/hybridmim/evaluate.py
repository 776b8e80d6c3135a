"""``hybridmim evaluate``: a model against reference label maps, per case and per label.

Each case is segmented exactly as ``hybridmim segment`` does it, and compared
with its reference on the input's own grid: Dice, and the 95th-percentile
symmetric Hausdorff distance in millimetres (MONAI's surface distances, with
the voxel spacing). Reference values are mapped onto the model's labels
through the labels' source values (e.g. BraTS 1 and 3 → tumour core), a
dataset.json's label names or the user's file (referencevalues.py), and
the model's regions (unions of labels, e.g. BraTS whole tumour) are scored
too. The report is one JSON file and a CSV beside it (one row per case and
label), both written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import time
import warnings
from pathlib import Path

import numpy as np

from .atomic import atomic_output, check_new_output
from .errors import UserError
from .progress import Reporter


def _union_box(mask_a: np.ndarray, mask_b: np.ndarray, margin: int = 2) -> tuple[slice, ...]:
    """The bounding box of both masks, ``margin`` voxels wider (clipped): surface distances stay the same
    inside it, and the distance transform runs on a fraction of the volume."""
    either = mask_a | mask_b
    box = []
    for axis in range(3):
        hit = np.flatnonzero(either.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, hit[0] - margin), min(either.shape[axis], hit[-1] + margin + 1)))
    return tuple(box)


def overlap_scores(prediction: np.ndarray, reference: np.ndarray, spacing_zyx) -> dict:
    """Dice and HD95 (mm) of two boolean masks (z, y, x).

    Both empty: both None (nothing to score). One empty: Dice 0 and HD95 None (undefined).
    """
    predicted, expected = int(prediction.sum()), int(reference.sum())
    if predicted == 0 and expected == 0:
        return {"dice": None, "hd95_mm": None}
    dice = 2.0 * int(np.logical_and(prediction, reference).sum()) / (predicted + expected)
    if predicted == 0 or expected == 0:
        return {"dice": dice, "hd95_mm": None}
    import torch
    from monai.metrics import compute_hausdorff_distance

    box = _union_box(prediction, reference)
    as_batch = [torch.from_numpy(np.ascontiguousarray(m[box]))[None, None] for m in (prediction, reference)]
    with warnings.catch_warnings():  # MONAI warns about its own internal use of a deprecated argument
        warnings.simplefilter("ignore", FutureWarning)
        hd95 = compute_hausdorff_distance(*as_batch, include_background=True, percentile=95,
                                          spacing=[float(s) for s in spacing_zyx])
    return {"dice": dice, "hd95_mm": float(hd95.item())}


def values_of_no_label(reference: np.ndarray, lookup: dict[int, int]) -> list[int]:
    """The values a reference label map holds that ``lookup`` ({value: the model's label value}) does not take
    (scored as background)."""
    present = np.flatnonzero(np.bincount(reference.ravel()))
    return [int(v) for v in present if v and int(v) not in lookup]


def reference_on_model_labels(reference: np.ndarray, lookup: dict[int, int]) -> np.ndarray:
    """A reference label map's values turned into the model's label values by ``lookup`` (0 where none applies)."""
    table = np.zeros(max(int(reference.max()), max(lookup, default=0)) + 1, dtype=np.uint16)
    for source, value in lookup.items():
        table[source] = value
    return table[reference]


def score_case(prediction: np.ndarray, reference: np.ndarray, meta, spacing_zyx, unsure_ml: dict) -> dict[str, dict]:
    """{structure name: scores} for every label and region of the model: Dice, HD95, the predicted volume in ml
    and the volume the model was unsure of (``unsure_ml`` by label value; None for a region)."""
    from .geometry import voxel_ml

    ml = voxel_ml(spacing_zyx)
    scores = {}
    for label in meta.labels:
        predicted = prediction == label.value
        scores[label.name] = {**overlap_scores(predicted, reference == label.value, spacing_zyx),
                              "volume_ml": round(int(predicted.sum()) * ml, 2),
                              "unsure_ml": round(unsure_ml.get(label.value, 0.0), 2)}
    for region in meta.regions:
        predicted = np.isin(prediction, list(region["values"]))
        scores[region["name"]] = {**overlap_scores(predicted, np.isin(reference, list(region["values"])), spacing_zyx),
                                  "volume_ml": round(int(predicted.sum()) * ml, 2), "unsure_ml": None}
    return scores


def summarise(cases: list[dict], names: list[str]) -> dict[str, dict]:
    """Per structure: mean Dice over the cases where it is in either map, mean HD95 over those where
    it is in both, and how many cases had an undefined HD95 (found in only one of the two maps)."""
    summary = {}
    for name in names:
        scored = [c["scores"][name] for c in cases if c["scores"][name]["dice"] is not None]
        distances = [s["hd95_mm"] for s in scored if s["hd95_mm"] is not None]
        summary[name] = {"dice_mean": float(np.mean([s["dice"] for s in scored])) if scored else None,
                         "hd95_mm_mean": float(np.mean(distances)) if distances else None,
                         "cases": len(scored), "hd95_undefined": len(scored) - len(distances)}
    return summary


_CSV_COLUMNS = (("dice", 4), ("hd95_mm", 2), ("volume_ml", 2), ("unsure_ml", 2))  # score, decimals


def _csv_text(cases: list[dict], names: list[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["case", "structure", *(key for key, _ in _CSV_COLUMNS)])
    for case in cases:
        for name in names:
            s = case["scores"][name]
            writer.writerow([case["case"], name, *("" if s[key] is None else f"{s[key]:.{digits}f}"
                                                   for key, digits in _CSV_COLUMNS)])
    return out.getvalue()


def evaluate(model: str | None, data: list[str], output: str | None = None, overlays: str | None = None,
             device: str = "auto", overwrite: bool = False, reporter: Reporter | None = None,
             reference_values: str | None = None) -> dict:
    """Segment every labelled case in ``data`` with ``model`` and score it; returns the report. ``reference_values``:
    a file saying which of the model's labels each value of the reference label maps stands for."""
    from .predict import cases_fitted_to_model, load_network, read_inputs, segment_channels
    from .referencevalues import dataset_lookup, read_reference_values
    from .segment import segmentation_model
    from .volumes import check_case_label, find_cases, is_segmentation_file

    reporter = reporter or Reporter("quiet")
    report_path = check_new_output(output, overwrite) if output else None
    if report_path is not None and report_path.suffix.lower() != ".json":
        raise UserError(f"{report_path}: the report is JSON; name it *.json (the CSV is written beside it)")
    csv_path = report_path.with_suffix(".csv") if report_path else None
    if csv_path is not None:
        check_new_output(csv_path, overwrite)
    overlay_dir = Path(overlays) if overlays else None
    if overlay_dir is not None and overlay_dir.is_file():
        raise UserError(f"{overlay_dir}: is a file; --overlays names a folder")
    cases_of = {path: find_cases([path], labelled=True) for path in map(Path, data)}
    checkpoint, meta = segmentation_model(model, reporter)
    given = read_reference_values(reference_values, meta) if reference_values else None
    lookups, read_otherwise = [], {}  # of each case's label map (a Slicer segmentation's are the model's labels)
    label_names = {label.value: label.name for label in meta.labels}
    for path, found in cases_of.items():
        lookup = given or dataset_lookup(path, meta, reporter.warning)
        lookups += [meta.source_lookup if is_segmentation_file(case.label) else lookup for case in found]
        if lookup != meta.source_lookup:  # the report says how, beside the scores it gave
            read_otherwise[str(path)] = {str(value): label_names.get(label, "background")
                                         for value, label in sorted(lookup.items())}
    cases = cases_fitted_to_model([case for found in cases_of.values() for case in found], meta, checkpoint.name,
                                  reporter.warning)
    for case in cases:
        check_case_label(case, meta.labels)
    if overlay_dir is not None:
        for case in cases:
            check_new_output(overlay_dir / f"{case.name}.png", overwrite)

    import SimpleITK as sitk

    from .devices import resolve_device
    from .volumes import read_case_label

    device = resolve_device(device, reporter)
    network = load_network(checkpoint, meta, device, reporter)
    names = [label.name for label in meta.labels] + [region["name"] for region in meta.regions]
    results, started = [], time.time()
    reporter.stage("evaluate")
    for index, (case, lookup) in enumerate(zip(cases, lookups)):
        channels = read_inputs(case, meta, reporter.warning)
        reference_image = read_case_label(case, meta.labels, reporter.warning)
        prediction_image, unsure_ml = segment_channels(channels, network, meta, device)
        prediction = sitk.GetArrayFromImage(prediction_image)
        label_values = sitk.GetArrayFromImage(reference_image)
        unknown = values_of_no_label(label_values, lookup)
        if unknown:
            listed = ", ".join(map(str, unknown[:10])) + " …" * (len(unknown) > 10)
            reporter.warning(f"{case.name}: {case.label.name}: no label of the model takes the value"
                             f"{'s' * (len(unknown) > 1)} {listed}, counted as background: is the reference "
                             "labelled as `hybridmim info` lists the model's labels? (--reference-values FILE "
                             "says which label each value is)")
        reference = reference_on_model_labels(label_values.astype(np.int64), lookup)
        scores = score_case(prediction, reference, meta, channels[0].GetSpacing()[::-1], unsure_ml)
        results.append({"case": case.name, "scores": scores})
        reporter.metric(case=case.name, **{f"dice {n}": s["dice"] for n, s in scores.items()})
        if overlay_dir is not None:
            from .preview import render_comparison

            reference_labels = sitk.GetImageFromArray(reference.astype(prediction.dtype))
            reference_labels.CopyInformation(prediction_image)
            render_comparison(channels[0], prediction_image, reference_labels, meta.labels,
                              overlay_dir / f"{case.name}.png", meta.preprocessing.intensity.window,
                              f"{case.name}: reference (solid) vs model (dashed)")
        reporter.progress(index + 1, len(cases))

    report = {"model": {"file": checkpoint.name, "title": meta.title},
              "data": [str(p) for p in data], "device": device,
              "seconds": round(time.time() - started, 1),
              "summary": summarise(results, names), "cases": results,
              **({"reference_values": read_otherwise} if read_otherwise else {})}
    outputs = {}
    if report_path is not None:
        with atomic_output(report_path) as tmp:
            tmp.write_text(json.dumps(report, indent=1), encoding="utf-8")
        with atomic_output(csv_path) as tmp:
            tmp.write_text(_csv_text(results, names), encoding="utf-8")
        outputs = {"report": str(report_path), "csv": str(csv_path)}
    if overlay_dir is not None:
        outputs["overlays"] = str(overlay_dir)
    reporter.done({**outputs, "summary": report["summary"]})
    return report
