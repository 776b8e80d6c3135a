"""Would ONNX Runtime serve `hybridmim segment` on the CPU better than torch? A measurement, not engine code.

The model is exported to ONNX once; then each runtime runs in a fresh process of its own on the same
real window (the central model window of abdomen_ct/ct_a): its import time, network load time (torch:
the cached TorchScript trace `hybridmim segment` loads), seconds a window (median of 5 after 2
warm-ups), peak resident memory after them, and the agreement of the two outputs (largest difference,
share of voxels with the same argmax).

    .venv/bin/pip install onnx==1.23.2 onnxruntime==1.32.0   # for this measurement only, not the engine's
    .venv/bin/python scripts/bench_onnxruntime.py -o docs/benchmarks/onnxruntime-window-cpu.json [--model NAME|PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SCAN = REPO.parent / "shared" / "data" / "abdomen_ct" / "ct_a.nii.gz"


def _child(runtime: str, workdir: Path) -> None:
    """In a fresh process: import ``runtime``, load the network, time windows; print one JSON line."""
    from hybridmim.memory import peak_rss_bytes  # no torch import: it is what is timed below

    window = np.load(workdir / "window.npy")
    started = time.perf_counter()
    if runtime == "torch":
        import torch

        imported = time.perf_counter()
        from hybridmim.checkpoint import read_metadata
        from hybridmim.progress import Reporter
        from hybridmim.traced import load_for_inference

        checkpoint = Path((workdir / "checkpoint.txt").read_text())  # segment's way: the cached trace
        network = load_for_inference(checkpoint, read_metadata(checkpoint), torch.device("cpu"), Reporter("quiet"))[0]
        loaded = time.perf_counter()

        def run():
            with torch.inference_mode():
                return network(torch.from_numpy(window)).numpy()
    else:
        import onnxruntime

        imported = time.perf_counter()
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = len(os.sched_getaffinity(0))
        session = onnxruntime.InferenceSession(str(workdir / "model.onnx"), options,
                                               providers=["CPUExecutionProvider"])
        loaded = time.perf_counter()

        def run():
            return session.run(None, {"window": window})[0]
    for _ in range(2):
        output = run()
    seconds = []
    for _ in range(5):
        tick = time.perf_counter()
        output = run()
        seconds.append(time.perf_counter() - tick)
    np.save(workdir / f"{runtime}.npy", output)
    print(json.dumps({"import_s": round(imported - started, 3), "load_s": round(loaded - imported, 3),
                      "window_s": round(statistics.median(seconds), 4),
                      "peak_rss_mib": round(peak_rss_bytes() / 2**20)}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-o", "--output", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--child", choices=["torch", "onnxruntime"], help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return _child(args.child, Path(args.workdir))

    import SimpleITK as sitk
    import torch

    from hybridmim.catalog import resolve_model
    from hybridmim.checkpoint import load_model, read_metadata
    from hybridmim.modelgrid import prepare
    from hybridmim.progress import Reporter
    from hybridmim.traced import load_for_inference

    checkpoint = resolve_model(args.model, Reporter("quiet"))
    meta = read_metadata(checkpoint)
    array = prepare([sitk.ReadImage(str(SCAN))], meta.preprocessing).array
    roi = meta.roi_size  # the central window, wholly inside the scan
    assert all(n >= r for n, r in zip(array.shape[1:], roi)), f"{SCAN.name} is smaller than a window"
    box = tuple(slice((n - r) // 2, (n - r) // 2 + r) for n, r in zip(array.shape[1:], roi))
    window = np.ascontiguousarray(array[(slice(None), *box)][None])
    load_for_inference(checkpoint, meta, torch.device("cpu"), Reporter("quiet"))  # the trace cached before timing
    network = load_model(checkpoint, torch.device("cpu"))[1].eval()
    with tempfile.TemporaryDirectory() as folder:
        workdir = Path(folder)
        np.save(workdir / "window.npy", window)
        (workdir / "checkpoint.txt").write_text(str(checkpoint))
        tick = time.perf_counter()
        torch.onnx.export(network, (torch.from_numpy(window),), str(workdir / "model.onnx"), dynamo=False,
                          input_names=["window"], output_names=["logits"], opset_version=17)
        export_s = time.perf_counter() - tick
        rows = {}
        for runtime in ("torch", "onnxruntime"):
            done = subprocess.run([sys.executable, __file__, "-o", "-", "--child", runtime, "--workdir", folder],
                                  capture_output=True, text=True, check=True, cwd=REPO)
            rows[runtime] = json.loads(done.stdout.strip().splitlines()[-1])
        first, second = np.load(workdir / "torch.npy"), np.load(workdir / "onnxruntime.npy")
        report = {"model": checkpoint.name, "window": list(window.shape), "scan": SCAN.name,
                  "onnx_bytes": (workdir / "model.onnx").stat().st_size, "export_s": round(export_s, 2), **rows,
                  "max_abs_difference": float(np.abs(first - second).max()),
                  "argmax_agreement": float((first.argmax(1) == second.argmax(1)).mean()),
                  "versions": {"torch": torch.__version__, "onnxruntime": version("onnxruntime")}}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
