"""Inference as fast as the plain MONAI pipeline allows without changing its result: the same model
grid as MONAI's Orientation + Spacing, the same windows and blending as sliding_window_inference,
a body crop that never changes the result inside the body, and a cached ONNX export that runs on the
CPU without importing torch."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DEFAULT_MODEL, REPO, WarningsKept, data_file
from hybridmim.checkpoint import load_model, read_metadata
from hybridmim.inference import sliding_window
from hybridmim.modelgrid import prepare
from hybridmim import onnxnet
from hybridmim.onnxnet import OnnxNetwork, cached_onnx_network, export_onnx_network, onnx_path
from hybridmim.predict import load_network, predict_labels
from hybridmim.progress import Reporter, parse_event
from hybridmim.windows import blend_windows, count_windows, gaussian_weights, window_aligned_box, window_starts

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def default_model():
    return load_model(DEFAULT_MODEL, CPU)


def test_window_starts_are_monais():
    from monai.data.utils import dense_patch_slices
    from monai.inferers.utils import _get_scan_interval

    for size in range(1, 200, 3):
        for roi in (16, 31, 64, 96):
            for overlap in (0.0, 0.25, 0.5, 0.75):
                padded = max(size, roi)
                interval = _get_scan_interval((padded,), (roi,), 1, (overlap,))
                expected = [s[0].start for s in dense_patch_slices((padded,), (roi,), interval)]
                assert window_starts(size, roi, overlap) == expected, (size, roi, overlap)


def test_sliding_window_equals_monais_with_torch_and_with_openvino(default_model, tmp_path, monkeypatch):
    from monai.inferers import sliding_window_inference

    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path))
    meta, network = default_model
    # z shorter than the window (padded), y two windows, x one window exactly
    volume = np.random.default_rng(0).random((1, 10, 70, 64), dtype=np.float32)
    ours = sliding_window(network, volume, meta.roi_size, 0.5, CPU, Reporter("quiet"))
    with torch.inference_mode():
        reference = sliding_window_inference(torch.from_numpy(volume)[None], meta.roi_size, 1, network,
                                             overlap=0.5, mode="gaussian")
    assert ours.shape == reference.shape
    assert float((ours - reference).abs().max()) <= 1e-5  # float rounding of outputs up to 5
    assert torch.equal(ours.argmax(1), reference.argmax(1))
    reference = reference[0].numpy()

    def run(windows):
        with torch.inference_mode():
            return network(torch.from_numpy(windows)).numpy()

    # the CPU path blends in numpy: the same sums
    on_host = blend_windows(run, volume, meta.roi_size, 0.5, 1, gaussian_weights(meta.roi_size),
                            lambda shape: np.zeros(shape, np.float32), Reporter("quiet"))
    assert on_host.shape == reference.shape and float(np.abs(on_host - reference).max()) <= 1e-5
    # with OpenVINO's windows, whose convolutions round differently: here up to 1.8e-3 of the range, as the
    # windows are mostly zero padding and instance norm over a near-constant input amplifies rounding
    onnx = export_onnx_network(network, DEFAULT_MODEL, meta, Reporter("quiet"))
    via_onnx = onnx.sliding_window(volume, meta.roi_size, 0.5, Reporter("quiet"))
    assert float(np.abs(via_onnx - reference).max()) <= 3e-3 * float(np.abs(reference).max())
    assert (via_onnx.argmax(0) == reference.argmax(0)).mean() >= 0.999


def test_model_grid_is_monais_orientation_and_spacing():
    """ct_b (0.98 x 0.98 x 2 mm, LPS) onto the default model's 3 mm RAS grid: the same voxels, values
    and size as MONAI's Spacing (bilinear, border) of the RAS-oriented scan, including the last plane
    that lies beyond the scan's last slice centre."""
    from monai.data import MetaTensor
    from monai.transforms import ScaleIntensityRange, Spacing

    image = sitk.ReadImage(str(data_file("abdomen_ct/ct_b.nii.gz")))[150:350, 180:330, :]
    spec = dataclasses.replace(read_metadata(DEFAULT_MODEL).preprocessing, foreground_threshold=None)
    ours = prepare([image], spec)

    # MONAI's RAS orientation of this LPS-aligned scan, done by hand (Orientation needs nibabel):
    # x and y reversed, the affine's origin at the voxel that becomes the first
    assert np.allclose(image.GetDirection(), np.eye(3).ravel())
    xyz = sitk.GetArrayFromImage(image).astype(np.float32).transpose(2, 1, 0)[::-1, ::-1, :]
    affine = np.diag([*image.GetSpacing(), 1.0])
    last = image.TransformIndexToPhysicalPoint([image.GetSize()[0] - 1, image.GetSize()[1] - 1, 0])
    affine[:3, 3] = [-last[0], -last[1], last[2]]  # LPS → RAS
    monai = MetaTensor(torch.from_numpy(xyz.copy())[None], affine=torch.from_numpy(affine))
    monai = Spacing(pixdim=spec.spacing, mode="bilinear")(monai)
    window = spec.intensity
    monai = ScaleIntensityRange(*window.window, *window.output_range, clip=True)(monai)
    monai_zyx = monai[0].numpy().transpose(2, 1, 0)
    assert monai_zyx.shape == ours.array.shape[1:]
    assert float(np.abs(monai_zyx - ours.array[0]).max()) < 1e-5


def test_body_crop_to_whole_windows_keeps_the_result_inside_the_body(small_ct, default_model):
    """A scan with 100 voxels of air beside the body: the crop skips the windows that lie wholly in
    the air, and every voxel of the body gets exactly the label of a pass over the whole scan."""
    meta, network = default_model
    body = sitk.ReadImage(str(small_ct))
    wide = sitk.ConstantPad(body, [100, 0, 0], [0, 0, 0], -1024.0)
    whole = prepare([wide], dataclasses.replace(meta.preprocessing, foreground_threshold=None))
    cropped = prepare([wide], meta.preprocessing, windows=(meta.roi_size, meta.overlap))
    assert count_windows(cropped.array.shape[1:], meta.roi_size, 0.5) < count_windows(whole.array.shape[1:],
                                                                                        meta.roi_size, 0.5)

    def labels(model_input):
        return predict_labels(network, model_input.array, meta.roi_size, meta.overlap, meta.output_values, CPU,
                              Reporter("quiet")).labels

    offset = [round((c - w) / s) for c, w, s in zip(cropped.grid.origin, whole.grid.origin, whole.grid.spacing)]
    offset = [abs(o) for o in offset]  # RAS grids run against LPS coordinates along x and y
    x0 = offset[0]
    inside = labels(whole)[:, :, x0:x0 + cropped.grid.size[0]]
    body_x = slice(100 - x0 if 100 > x0 else 0, None)  # the body starts 100 voxels in
    assert np.array_equal(labels(cropped)[:, :, body_x], inside[:, :, body_x])


def test_window_aligned_box_holds_exactly_the_windows_touching_the_box():
    assert window_aligned_box((slice(100, 140),), (148,), (64,), 0.5) == (slice(64, 148),)
    assert window_aligned_box((slice(0, 10),), (148,), (64,), 0.5) == (slice(0, 64),)
    assert window_aligned_box((slice(5, 20),), (30,), (64,), 0.5) == (slice(0, 30),)  # one padded window
    # a pass over the aligned box visits the same starts as the whole pass, shifted
    box = window_aligned_box((slice(40, 90),), (200,), (64,), 0.5)[0]
    inner = [box.start + s for s in window_starts(box.stop - box.start, 64, 0.5)]
    assert inner == [s for s in window_starts(200, 64, 0.5) if s < 90 and s + 64 > 40]


def test_a_second_run_starts_from_the_cached_onnx_export_without_torch(small_ct, tmp_path):
    env = {**os.environ, "HYBRIDMIM_CACHE": str(tmp_path / "cache"), "HOME": str(tmp_path / "home")}
    code = ("import sys\n"
            # what Python code does towards other hosts; urllib3's import binds a local socket to probe IPv6,
            # which is not counted
            "sockets = []\n"
            "outward = ('socket.connect', 'socket.getaddrinfo', 'socket.sendto', 'socket.sendmsg', 'urllib.Request')\n"
            "sys.addaudithook(lambda event, args: event in outward and sockets.append(event))\n"
            "from hybridmim.devices import gpu_driver_present\n"
            "from hybridmim.segment import segment\n"
            "segment([sys.argv[1]], sys.argv[2])\n"  # --device auto
            "print(*(name in sys.modules for name in ('torch', 'monai', 'openvino')), sockets, gpu_driver_present())\n")
    outputs = []
    for run in ("first", "second"):
        output = tmp_path / f"{run}.nii.gz"
        done = subprocess.run([sys.executable, "-c", code, str(small_ct), str(output)], capture_output=True,
                              text=True, encoding="utf-8", cwd=REPO / "HybridMIMSegment", env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        outputs.append((done.stdout.strip().splitlines()[-1], sitk.GetArrayFromImage(sitk.ReadImage(str(output)))))
    # the first run builds the network and exports it; neither run opens a connection, nor has OpenVINO's telemetry
    # keep its client id in the home folder (it sends from a process it forks, where these hooks do not reach)
    assert outputs[0][0].startswith("True True True []")
    assert not (tmp_path / "home" / "intel").exists()
    if outputs[1][0].endswith("False"):  # no GPU driver: the device is chosen without torch too
        assert outputs[1][0] == "False False True [] False"
    assert np.array_equal(outputs[0][1], outputs[1][1])
    assert len(list((tmp_path / "cache" / "onnx").iterdir())) == 1


def test_a_run_that_may_use_a_gpu_imports_torch_while_the_scan_is_read(small_ct, tmp_path, monkeypatch):
    """Where a GPU driver is present (pretended: this machine has none) the imports a torch network needs start
    before the scan's read is waited for, and the run (which finds no GPU and runs on the CPU) writes the labels of
    a plain run; asked for the CPU, with the export cached, nothing of torch is imported (the test above for no
    driver); a model's first CPU run, which exports it, imports torch during the read too."""
    from hybridmim import devices, imageio, predict
    from hybridmim.segment import segment

    segment([str(small_ct)], str(tmp_path / "plain.nii.gz"))
    order, start, result = [], predict.start_torch_imports, imageio.BackgroundRead.result
    monkeypatch.setattr(devices, "gpu_driver_present", lambda: True)
    monkeypatch.setattr(predict, "start_torch_imports", lambda: (order.append("imports"), start())[1])
    monkeypatch.setattr(imageio.BackgroundRead, "result",
                        lambda read, warn: (order.append("read"), result(read, warn))[1])
    segment([str(small_ct)], str(tmp_path / "gpu.nii.gz"))
    assert order == ["imports", "read"]
    plain, gpu = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{run}.nii.gz"))) for run in ("plain", "gpu"))
    assert np.array_equal(plain, gpu) and plain.any()
    order.clear()
    segment([str(small_ct)], str(tmp_path / "cpu.nii.gz"), device="cpu")
    assert order == ["read"]  # with the export cached by the first run
    assert not devices.gpu_may_run("cpu") and devices.gpu_may_run("cuda")
    order.clear()
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "empty-cache"))  # a model's first CPU run: torch exports it
    segment([str(small_ct)], str(tmp_path / "first.nii.gz"), device="cpu")
    assert order == ["imports", "read"]


def test_a_cpu_run_compiles_the_cached_export_on_its_thread_while_the_scan_is_read(small_ct, tmp_path, monkeypatch):
    """With the export cached, a CPU run starts compiling it before it waits for the scan's read, on a thread of
    its own, and segments with that network: the labels of a run that compiled it after the read."""
    import threading

    from hybridmim import imageio
    from hybridmim.segment import segment

    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    segment([str(small_ct)], str(tmp_path / "exported.nii.gz"), device="cpu")  # the model's first run exports it
    order, compile_export, result = [], onnxnet._session, imageio.BackgroundRead.result
    monkeypatch.setattr(onnxnet, "_session", lambda path, meta: (order.append(threading.current_thread().name),
                                                                 compile_export(path, meta))[1])
    monkeypatch.setattr(imageio.BackgroundRead, "result",
                        lambda read, warn: (order.append("read"), result(read, warn))[1])
    segment([str(small_ct)], str(tmp_path / "compiled.nii.gz"), device="cpu")
    assert order == ["openvino-compile", "read"] and not onnxnet._compiling
    first, then = (sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / f"{run}.nii.gz")))
                   for run in ("exported", "compiled"))
    assert np.array_equal(first, then) and first.any()


def test_a_segment_run_whose_export_its_thread_compiled_is_interrupted_cleanly(tmp_path, monkeypatch):
    """OpenVINO's CPU plugin swaps the alternate signal stack of the thread that makes its Core (see the test
    below), here the compiling thread: Ctrl-C during the windows still ends the run with its one line and code 130,
    and writes nothing."""
    from conftest import run_cli_here, signalled_run

    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path / "cache"))
    ct = data_file("abdomen_ct/ct_b.nii.gz")
    run_cli_here("segment", ct, "-o", tmp_path / "exported.nii.gz", "--device", "cpu", check_rc=0)
    output = tmp_path / "interrupted.nii.gz"
    process, _, after = signalled_run(["segment", ct, "-o", output, "--device", "cpu", "--progress", "json"],
                                      lambda e: e["event"] == "progress", signal.SIGINT)
    assert process.returncode == 130, process.stderr.read()[-2000:]
    assert [e["message"] for e in after if e["event"] == "error"] == ["interrupted"] and not output.exists()


def test_the_torch_imports_of_a_fresh_process_are_made_on_their_thread():
    code = ("import sys\n"
            "from hybridmim.devices import start_torch_imports\n"
            "assert 'torch' not in sys.modules\n"
            "start_torch_imports().join()\n"
            "print(*(name in sys.modules for name in ('torch', 'monai', 'hybridmim.networks')))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8",
                          cwd=REPO / "HybridMIMSegment", timeout=120)
    assert done.returncode == 0 and done.stdout.split() == ["True"] * 3 and not done.stderr, done.stderr


def test_a_stop_signal_after_networks_come_and_go_is_handled(tmp_path):
    """OpenVINO's CPU plugin swaps the thread's alternate signal stack per Core; networks freed in the
    order they were made once left a freed stack in place, and the next signal (a Stop's SIGTERM, Ctrl-C)
    crashed the process instead of reaching its handler."""
    code = ("import os, signal, sys\n"
            "from hybridmim.checkpoint import read_metadata\n"
            "from hybridmim.predict import load_network\n"
            "from hybridmim.progress import Reporter\n"
            "meta = read_metadata(sys.argv[1])\n"
            "first = load_network(sys.argv[1], meta, 'cpu', Reporter('quiet'))\n"  # exported, then loaded
            "second = load_network(sys.argv[1], meta, 'cpu', Reporter('quiet'))\n"
            "del first, second\n"
            "signal.signal(signal.SIGTERM, lambda *_: print('stop handled'))\n"
            "os.kill(os.getpid(), signal.SIGTERM)\n")
    done = subprocess.run([sys.executable, "-c", code, str(DEFAULT_MODEL)], capture_output=True, text=True,
                          cwd=REPO / "HybridMIMSegment", env={**os.environ, "HYBRIDMIM_CACHE": str(tmp_path)},
                          timeout=300)
    assert (done.returncode, done.stdout.strip()) == (0, "stop handled"), done.stderr[-2000:]


def test_without_openvino_the_torch_network_runs_and_nothing_is_exported(small_ct, tmp_path):
    code = ("import sys\n"
            "sys.modules['openvino'] = None\n"  # as on a platform without its wheel: importing it fails
            "from hybridmim.cli import main\n"
            "main(sys.argv[1:])\n")
    output = tmp_path / "seg.nii.gz"
    done = subprocess.run([sys.executable, "-c", code, "segment", str(small_ct), "-o", str(output), "--device", "cpu",
                           "--progress", "json"], capture_output=True, text=True, encoding="utf-8",
                          cwd=REPO / "HybridMIMSegment", env={**os.environ, "HYBRIDMIM_CACHE": str(tmp_path / "cache")},
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    said = [e["text"] for e in map(parse_event, done.stdout.splitlines()) if e and e["event"] == "message"]
    assert sum("OpenVINO cannot run here (ModuleNotFoundError" in m for m in said) == 1
    assert not any("ONNX" in m for m in said)
    assert output.is_file() and not (tmp_path / "cache" / "onnx").exists()


def test_an_unreadable_onnx_export_is_said_and_rebuilt(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path))
    meta, network = default_model
    path = onnx_path(DEFAULT_MODEL)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an onnx model")
    reporter = WarningsKept()
    rebuilt = load_network(DEFAULT_MODEL, meta, "cpu", reporter)
    assert isinstance(rebuilt, OnnxNetwork) and len(reporter.warnings) == 1 and "cached ONNX model" in \
        reporter.warnings[0]
    loaded = load_network(DEFAULT_MODEL, meta, "cpu", reporter)
    assert isinstance(loaded, OnnxNetwork) and loaded.out_channels == network.out_channels and \
        len(reporter.warnings) == 1
    probe = torch.rand(2, 1, *meta.roi_size)
    with torch.inference_mode():
        expected = network(probe).numpy()
    assert float(np.abs(loaded(probe.numpy()) - expected).max()) <= 1e-3 * float(np.abs(expected).max())
    assert not isinstance(load_network(DEFAULT_MODEL, meta, "cpu", reporter, onnx=False), OnnxNetwork)


def test_the_least_recently_used_exports_go_once_the_cache_passes_its_bound(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path))
    meta, network = default_model
    made = export_onnx_network(network, DEFAULT_MODEL, meta, Reporter("quiet"))
    used, size = onnx_path(DEFAULT_MODEL), onnx_path(DEFAULT_MODEL).stat().st_size
    now = used.stat().st_mtime
    os.utime(used, (now - 1000, now - 1000))  # made long ago, so only its use below keeps it
    older, old = used.with_name("older-0.onnx"), used.with_name("old-0.onnx")
    in_progress, abandoned = used.with_name(".new-0.partial-1.onnx"), used.with_name(".killed-0.partial-2.onnx")
    for age, path in ((300, older), (200, old), (400, in_progress), (2 * 24 * 3600, abandoned)):
        path.write_bytes(b"\0" * 1000)
        os.utime(path, (now - age, now - age))
    assert isinstance(made, OnnxNetwork)
    assert isinstance(cached_onnx_network(DEFAULT_MODEL, meta, Reporter("quiet")), OnnxNetwork)
    # room for the new export, the one just used and one more thousand bytes
    monkeypatch.setattr(onnxnet, "_CACHE_BYTES", 2 * size + 1500)
    other = tmp_path / "other.safetensors"
    other.write_bytes(DEFAULT_MODEL.read_bytes())
    assert isinstance(export_onnx_network(network, other, meta, Reporter("quiet")), OnnxNetwork)
    assert sorted(p.name for p in used.parent.iterdir()) == sorted([used.name, onnx_path(other).name, old.name,
                                                                    in_progress.name])


class _Noisy(torch.nn.Module):
    """A network whose output OpenVINO cannot reproduce (its noise is drawn anew)."""

    def __init__(self, network):
        super().__init__()
        self.network, self.out_channels = network, network.out_channels

    def forward(self, x):
        return self.network(x) + torch.rand_like(x)


def test_an_export_that_does_not_reproduce_the_network_is_not_kept(tmp_path, monkeypatch, default_model):
    monkeypatch.setenv("HYBRIDMIM_CACHE", str(tmp_path))
    meta, network = default_model
    said = []

    class Collect(Reporter):
        def info(self, message):
            said.append(message)

    assert export_onnx_network(_Noisy(network), DEFAULT_MODEL, meta, Collect("quiet")) is None
    assert len(said) == 1 and "runs on torch" in said[0] and "differs from the network's" in said[0]
    assert not onnx_path(DEFAULT_MODEL).parent.exists() or not any(onnx_path(DEFAULT_MODEL).parent.iterdir())
