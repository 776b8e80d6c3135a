#!/usr/bin/env python
"""Seconds per step and peak memory of a pre-training step: HybridMIM's partial-region step against a
full-volume step, and MiM's and SelfMedHPM's steps beside them.

For HybridMIM, same backbone, batch, crops and masks; the only difference is
the decoder: on a 64³ block of the 96³ crop (HybridMIM) or on the whole crop
(SimMIM-style full-volume reconstruction). MiM and SelfMedHPM run their packaged
recipes' hybrid network with ``--batch`` crops (a MiM crop is 192³ and makes
1 + 4 + 16 volumes of 96³). One step = forward, backward, optimiser step (and
SelfMedHPM's teacher update), as in training. Each variant runs in its own
process so peak memory is its own (CPU: peak resident set size; CUDA: peak
allocated by PyTorch).

    .venv/bin/python scripts/bench_pretrain_step.py --data ../shared/data/lung_tumor_ct -o bench.json
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {"partial": 2, "full": 3}  # HybridMIM's decoder_regions
OTHER_METHODS = ("mim", "hpm")


def run_variant(args) -> dict:
    import numpy as np
    import torch

    from hybridmim.inference import select_device
    from hybridmim.memory import peak_rss_bytes
    from hybridmim.preprocessing import Preprocessing
    from hybridmim.volumes import find_cases, is_prepared_folder, load_prepared, prepare_cases
    from hybridmim.pretraining.run import load_recipe
    from hybridmim.pretraining.trainer import build_method
    from hybridmim.progress import Reporter
    from hybridmim.training.runstate import autocast

    recipe = load_recipe(args.method, args.backbone, None)
    if args.method == "hybridmim":
        recipe["hybridmim"]["decoder_regions"] = VARIANTS[args.variant]
    if args.method == "mim":
        recipe["mim"]["recompute"] = args.recompute
    if args.tiny_swin and args.backbone == "swin":
        recipe["network"].update(feature_size=12, depths=[1, 1, 1, 1])
    preprocessing = Preprocessing.from_dict(recipe["preprocessing"])
    quiet = Reporter("quiet")
    data = load_prepared(Path(args.data[0]), preprocessing, quiet) if is_prepared_folder(args.data[0]) \
        else prepare_cases(find_cases(args.data), preprocessing, Path(args.cache), quiet, None, recipe["channels"])
    device = select_device(args.device, quiet)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    method = build_method(recipe, data.channels).to(device).train()
    optimiser = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=1e-4)
    rng, generator = np.random.default_rng(0), torch.Generator().manual_seed(0)
    times = []
    for step in range(args.warmup + args.steps):
        stored, valid, _ = data.sample_crops(rng, 1, args.batch, method.crop_size)
        valid = torch.from_numpy(valid).to(device)
        image = data.to_model(torch.from_numpy(stored).to(device), valid)
        choices = method.sample(image.shape[0], generator, progress=0.5)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast(device, "bf16"):
            loss, _ = method(image, valid, **choices)
        loss.backward()
        optimiser.step()
        optimiser.zero_grad(set_to_none=True)
        if hasattr(method, "after_step"):  # the teacher update's cost; its decay value does not matter here
            method.after_step(step + 1, 1000)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - started)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_bytes()
    decoded = (VARIANTS[args.variant] * method.region_size) ** 3 if args.method == "hybridmim" else None
    return {"method": args.method, "recompute": args.recompute if args.method == "mim" else None,
            "backbone": args.backbone, "variant": args.variant, "network": recipe["network"],
            "crop_size": method.crop_size, "decoded_voxels": decoded, "batch": args.batch,
            "seconds_per_step": float(np.median(times)), "steps_timed": len(times),
            "peak_memory_mib": round(peak / 2**20, 1),
            "device": (torch.cuda.get_device_name(device) if device.type == "cuda"
                       else f"{platform.machine()} CPU, {torch.get_num_threads()} threads")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True,
                        help="scans, or a folder prepared by `pretrain --prepare-only`")
    parser.add_argument("--cache", default=".cache/bench", help="where scans are prepared")
    parser.add_argument("--backbones", nargs="*", default=["cnn", "swin"], choices=["cnn", "swin"],
                        help="HybridMIM's backbones, each with a partial and a full decoder "
                             "(none: the other methods alone)")
    parser.add_argument("--methods", nargs="*", default=list(OTHER_METHODS), choices=OTHER_METHODS,
                        help="the other methods (hybrid network); none: HybridMIM alone")
    parser.add_argument("--batch", type=int, default=2, help="crops per step")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--recompute", type=int, default=0,
                        help="MiM: keep activations for this many volumes at a time, recompute them in the "
                             "backward pass (0: off, as the recipe)")
    parser.add_argument("--tiny-swin", action="store_true", help="SwinUNETR feature_size 12, depth 1 (CPU-friendly)")
    parser.add_argument("-o", "--output", help="JSON report")
    parser.add_argument("--method", default="hybridmim", help=argparse.SUPPRESS)
    parser.add_argument("--backbone", help=argparse.SUPPRESS)
    parser.add_argument("--variant", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:  # a child: one measurement, printed as JSON
        print(json.dumps(run_variant(args)))
        return

    rows = []
    runs = [("hybridmim", backbone, variant) for backbone in args.backbones for variant in VARIANTS]
    runs += [(method, "hybrid", "-") for method in args.methods]
    for method, backbone, variant in runs:
        command = [sys.executable, __file__, "--method", method, "--backbone", backbone, "--variant", variant,
                   "--data", *args.data, "--cache", args.cache, "--batch", str(args.batch), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--device", args.device, "--threads", str(args.threads),
                   "--recompute", str(args.recompute)]
        if args.tiny_swin:
            command.append("--tiny-swin")
        result = subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace",
                                check=True)
        rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
        print(f"{method:9} {backbone:6} {variant:8} {rows[-1]['seconds_per_step']:8.3f} s/step "
              f"{rows[-1]['peak_memory_mib']:10.0f} MiB  ({rows[-1]['device']})", flush=True)
    report = {"rows": rows, "speed-up": {}}
    for backbone in args.backbones:
        by_variant = {r["variant"]: r for r in rows if r["method"] == "hybridmim" and r["backbone"] == backbone}
        report["speed-up"][backbone] = {
            f"{name}_full_over_partial": round(by_variant["full"][key] / by_variant["partial"][key], 2)
            for name, key in (("time", "seconds_per_step"), ("memory", "peak_memory_mib"))
        }
        print(f"{backbone}: partial step {report['speed-up'][backbone]['time_full_over_partial']}x faster, "
              f"{report['speed-up'][backbone]['memory_full_over_partial']}x less memory")
    if args.output:
        Path(args.output).write_text(json.dumps(report, indent=1), encoding="utf-8")


if __name__ == "__main__":
    main()
