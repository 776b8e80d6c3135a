#!/usr/bin/env python
"""Checks the CUDA inference path (fp16 autocast) against the CPU, on model-grid arrays.

The GPU machines lent to this project have no SimpleITK, so scans travel
already on the model grid:

    # here (CPU): prepare the held-out cases and record the CPU results
    .venv/bin/python scripts/gpu_inference_check.py prepare .devdata/gpu_check.npz
    # on the GPU machine (PYTHONPATH=HybridMIMSegment, MONAI installed):
    python3 scripts/gpu_inference_check.py run .devdata/gpu_check.npz -o gpu_check.json

Reconstruction: ct-hybridmim-cnn on STS_036 (40% of patches masked, seed 0),
mean absolute error on masked voxels in HU, CPU against CUDA. Segmentation:
the default model on ct_b, voxel agreement and Dice per label between the
CPU and CUDA label maps. Also the CUDA wall time of each (after one warm-up).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
RECONSTRUCTION_CASE = "sarcoma_ct/STS_036/image.nii.gz"
SEGMENTATION_CASE = "abdomen_ct/ct_b.nii.gz"


def _models():
    from hybridmim.catalog import load_catalog, resolve_model
    from hybridmim.progress import Reporter

    catalog = load_catalog()
    quiet = Reporter("quiet")
    return resolve_model(None, quiet, catalog, pretrained=True), resolve_model(None, quiet, catalog)


def _reconstruction_mae(network, meta, array, scale, device):
    from hybridmim.progress import Reporter
    from hybridmim.reconstruct import mask_and_fill, masked_mae

    mask, prediction = mask_and_fill(network, array, meta, 0.4, 0, device, Reporter("quiet"))
    return masked_mae(prediction, array, mask, [scale])


def _labels(network, meta, array, device):
    from hybridmim.predict import predict_labels
    from hybridmim.progress import Reporter

    return predict_labels(network, array, meta.roi_size, meta.overlap, meta.output_values, device,
                          Reporter("quiet")).labels


def prepare(output: Path) -> None:
    import torch

    from hybridmim.checkpoint import load_model
    from hybridmim.imageio import read_channels
    from hybridmim.modelgrid import prepare as to_model_grid

    pretrained, segmenter = _models()
    cpu = torch.device("cpu")
    meta_r, net_r = load_model(pretrained)
    grid_r = to_model_grid(read_channels([DATA / RECONSTRUCTION_CASE]), meta_r.preprocessing)
    scale = grid_r.intensity_maps[0][0]
    meta_s, net_s = load_model(segmenter)
    grid_s = to_model_grid(read_channels([DATA / SEGMENTATION_CASE]), meta_s.preprocessing)
    np.savez_compressed(output, reconstruction_array=grid_r.array, scale=scale,
                        cpu_mae=_reconstruction_mae(net_r, meta_r, grid_r.array, scale, cpu),
                        segmentation_array=grid_s.array, cpu_labels=_labels(net_s, meta_s, grid_s.array, cpu))
    print(f"wrote {output}")


def run(source: Path, report: Path) -> None:
    import torch

    from hybridmim.checkpoint import load_model
    from hybridmim.metrics import dice_per_label

    device = torch.device("cuda")
    pretrained, segmenter = _models()
    data = np.load(source)
    results = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__}

    meta_r, net_r = load_model(pretrained, device)
    array = data["reconstruction_array"]
    _reconstruction_mae(net_r, meta_r, array, float(data["scale"]), device)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    mae = _reconstruction_mae(net_r, meta_r, array, float(data["scale"]), device)
    torch.cuda.synchronize()
    results["reconstruction"] = {"case": RECONSTRUCTION_CASE, "model_grid": list(array.shape[1:]),
                                 "mae_hu_cpu": round(float(data["cpu_mae"]), 3), "mae_hu_cuda": round(mae, 3),
                                 "cuda_seconds": round(time.perf_counter() - started, 3)}

    meta_s, net_s = load_model(segmenter, device)
    array = data["segmentation_array"]
    _labels(net_s, meta_s, array, device)  # warm-up
    torch.cuda.synchronize()
    started = time.perf_counter()
    labels = _labels(net_s, meta_s, array, device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    reference = data["cpu_labels"]
    present = sorted(int(v) for v in np.unique(reference) if v)
    results["segmentation"] = {"case": SEGMENTATION_CASE, "model_grid": list(array.shape[1:]),
                               "voxel_agreement": round(float((labels == reference).mean()), 6),
                               "dice_cuda_vs_cpu": {str(k): round(v, 4) for k, v in
                                                    dice_per_label(labels, reference, present).items()},
                               "cuda_seconds": round(seconds, 3)}
    report.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(results, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["prepare", "run"])
    parser.add_argument("arrays", type=Path, help="the .npz prepare writes and run reads")
    parser.add_argument("-o", "--output", type=Path, default=Path("gpu_check.json"), help="run: JSON report")
    args = parser.parse_args()
    prepare(args.arrays) if args.mode == "prepare" else run(args.arrays, args.output)


if __name__ == "__main__":
    main()
