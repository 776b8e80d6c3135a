#!/usr/bin/env python
"""Inference benchmark: `hybridmim segment`'s pipeline against the plain MONAI pipeline a user
would write with the same weights (LoadImage → Orientation → Spacing → intensity window →
sliding_window_inference, overlap 0.5 → invert → save), on real CTs from ../shared/data.

    .venv/bin/pip install nibabel==5.4.2   # MONAI's LoadImage reads NIfTI through it (not needed by the engine)
    .venv/bin/python scripts/bench_inference.py -o docs/benchmarks/inference-cpu.json [--device cpu]
        [--model NAME|PATH] [--cases ct_b crlm_1006 ct_a_512]

Each pipeline runs in a child process of its own, so its peak resident memory (VmHWM) and its
cold start (process start → first window done) are its own. A first run of ours exports the model to
ONNX into a fresh cache (reported apart); the measured runs find that export, as every run after a
user's first does. Reported per case: wall time per stage, peak memory, cold start, the ratios, and
the Dice agreement of the two label maps per label.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CASES = {
    "ct_b": DATA / "abdomen_ct/ct_b.nii.gz",
    "crlm_1006": DATA / "unlabeled_ct/CRLM-CT-1006.nii.gz",
    "ct_a_512": None,  # ct_a resampled to 512 x 512 x 400: how time grows with voxels
}


def _large_ct(folder: Path) -> Path:
    import SimpleITK as sitk

    source = sitk.ReadImage(str(DATA / "abdomen_ct/ct_a.nii.gz"))
    size = (512, 512, 400)
    spacing = [n * s / m for n, s, m in zip(source.GetSize(), source.GetSpacing(), size)]
    resampled = sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), spacing,
                              source.GetDirection(), -1024.0, sitk.sitkInt16)
    path = folder / "ct_a_512.nii.gz"
    sitk.WriteImage(resampled, str(path))
    return path


class _Clock:
    """Stage timestamps as seconds since the child's parent started it (``started``: epoch seconds)."""

    def __init__(self, started: float):
        self.started, self.stages, self.first_window = started, {}, None

    def stage(self, name: str) -> None:
        self.stages[name] = time.time() - self.started

    def window(self) -> None:
        if self.first_window is None:
            self.first_window = time.time() - self.started


def run_ours(image: str, output: str, model: str, device: str, clock: _Clock) -> None:
    from hybridmim.progress import Reporter
    from hybridmim.segment import segment

    class Timed(Reporter):
        def stage(self, name):
            clock.stage(name)

        def progress(self, done, total):
            clock.window()

    segment([image], output, model, device, reporter=Timed("quiet"))
    clock.stage("end")


def run_monai(image: str, output: str, model: str, device: str, clock: _Clock) -> None:
    """The straightforward MONAI pipeline with our checkpoint's weights and settings."""
    clock.stage("load model")
    import torch
    from monai.inferers import sliding_window_inference
    from monai.transforms import (Compose, EnsureChannelFirstd, Invertd, LoadImaged, Orientationd,
                                  SaveImaged, ScaleIntensityRanged, Spacingd)

    from hybridmim.catalog import resolve_model
    from hybridmim.checkpoint import load_model
    from hybridmim.progress import Reporter

    meta, network = load_model(resolve_model(model, Reporter("quiet")), device)
    window = meta.preprocessing.intensity
    low, high = window.output_range
    pre = Compose([
        LoadImaged("image"), EnsureChannelFirstd("image"),
        Orientationd("image", axcodes="RAS"),  # as our checkpoint's "orientation"
        Spacingd("image", pixdim=meta.preprocessing.spacing, mode="bilinear"),  # (x, y, z) in both
        ScaleIntensityRanged("image", a_min=window.window[0], a_max=window.window[1], b_min=low, b_max=high, clip=True),
    ])
    clock.stage("read")
    data = pre({"image": image})
    clock.stage("inference")

    def predictor(x):  # MONAI arrays are (x, y, z); our networks were trained on numpy's (z, y, x)
        out = network(x.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        clock.window()
        return out

    with torch.inference_mode():
        logits = sliding_window_inference(data["image"][None].to(device), tuple(reversed(meta.roi_size)), 2, predictor,
                                          overlap=meta.overlap, mode="gaussian")
    clock.stage("postprocess")
    data["pred"] = logits[0].argmax(0, keepdim=True).to(torch.uint8).cpu()
    saved = Path(output).parent / f"monai-{Path(output).stem}"  # SaveImage names the file after the input
    post = Compose([Invertd("pred", transform=pre, orig_keys="image", nearest_interp=True),
                    SaveImaged("pred", output_dir=str(saved), output_postfix="", separate_folder=False,
                               output_dtype="uint8", resample=False)])
    post(data)
    clock.stage("end")
    next(saved.iterdir()).rename(output)


def child(args) -> None:
    clock = _Clock(args.started)
    clock.stage("python started")
    (run_ours if args.pipeline == "ours" else run_monai)(args.image, args.output, args.model, args.device, clock)
    from hybridmim.memory import peak_rss_bytes

    print(json.dumps({"stages": clock.stages, "first_window_s": clock.first_window,
                      "peak_rss_bytes": peak_rss_bytes()}))


def measure(pipeline: str, image: Path, output: Path, model: str, device: str, cache: Path) -> dict:
    started = time.time()
    result = subprocess.run([sys.executable, __file__, "_child", pipeline, str(image), str(output), model, device,
                             repr(started)], capture_output=True, text=True, encoding="utf-8", errors="replace",
                            cwd=REPO, env={**os.environ, "HYBRIDMIM_CACHE": str(cache)})
    wall = time.time() - started
    if result.returncode != 0:
        raise SystemExit(f"{pipeline} failed on {image.name}:\n{result.stderr[-3000:]}")
    report = json.loads(result.stdout.strip().splitlines()[-1])
    marks = sorted(report["stages"].items(), key=lambda kv: kv[1])
    report["stage_seconds"] = {name: round(later - at, 2) for (name, at), (_, later) in zip(marks, marks[1:])}
    report["wall_s"] = round(wall, 2)
    return report


def agreement(ours: Path, reference: Path, values) -> dict:
    import numpy as np
    import SimpleITK as sitk

    a, b = (sitk.GetArrayFromImage(sitk.ReadImage(str(p))) for p in (ours, reference))
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    dice = {}
    for value in values:
        x, y = a == value, b == value
        total = int(x.sum() + y.sum())
        if total:
            dice[int(value)] = round(2 * float(np.logical_and(x, y).sum()) / total, 4)
    return {"voxels_equal": round(float((a == b).mean()), 6), "dice": dice,
            "dice_min": min(dice.values()) if dice else None}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        args = argparse.Namespace(pipeline=sys.argv[2], image=sys.argv[3], output=sys.argv[4], model=sys.argv[5],
                                  device=sys.argv[6], started=float(sys.argv[7]))
        child(args)
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--model", default="")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()

    from hybridmim.catalog import load_catalog, resolve_model
    from hybridmim.checkpoint import read_metadata
    from hybridmim.progress import Reporter

    model = args.model or load_catalog().default_model
    meta = read_metadata(resolve_model(model, Reporter("quiet")))
    results = {"model": model, "device": args.device, "cases": {}}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        cache = folder / "cache"  # a fresh cache: the first CPU run with the model exports it (hybridmim/onnxnet.py)
        first = measure("ours", CASES["ct_b"], folder / "first.nii.gz", model, args.device, cache)
        results["first_run_with_model"] = {"image": "ct_b", "wall_s": first["wall_s"],
                                           "first_window_s": first["first_window_s"]}
        for name in args.cases:
            image = CASES[name] or _large_ct(folder)
            runs = {p: measure(p, image, folder / f"{name}_{p}.nii.gz", model, args.device, cache)
                    for p in ("ours", "monai")}
            import SimpleITK as sitk

            size = sitk.ReadImage(str(image)).GetSize()
            case = {"size": list(size), "voxels": size[0] * size[1] * size[2], **runs,
                    "speedup": round(runs["monai"]["wall_s"] / runs["ours"]["wall_s"], 2),
                    "memory_ratio": round(runs["ours"]["peak_rss_bytes"] / runs["monai"]["peak_rss_bytes"], 3),
                    "agreement": agreement(folder / f"{name}_ours.nii.gz", folder / f"{name}_monai.nii.gz",
                                           meta.output_values[1:])}
            results["cases"][name] = case
            print(f"{name}: ours {runs['ours']['wall_s']} s / {runs['ours']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"MONAI {runs['monai']['wall_s']} s / {runs['monai']['peak_rss_bytes'] / 2**30:.2f} GiB, "
                  f"Dice min {case['agreement'].get('dice_min')}", flush=True)
            # after every case: a run cut short by a time limit (a lent GPU's call) keeps the cases it measured
            args.output.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
