"""Bad scans, concurrent runs, huge volumes and GPU faults: a one-line refusal or a correct result,
never a crash, a wrong geometry or a lost file. Every scan is derived from ../shared/data in the test."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import DEFAULT_MODEL, REPO, WarningsKept, data_file, run_cli, run_cli_here, warnings_of
from hybridmim.atomic import output_lock
from hybridmim.checkpoint import read_metadata
from hybridmim.errors import UserError
from hybridmim import niftifile
from hybridmim.imageio import read_volume
from hybridmim.inference import WindowPlan, run_with_fallbacks, sliding_window, window_plans
from hybridmim.memory import (BASE_BYTES, GIB, GPU_BUILD_BYTES, ScanHeader, is_gpu_build, segment_bytes,
                              torch_build_bytes, window_bytes)
from hybridmim.networks import build_network
from hybridmim.progress import Reporter
from hybridmim.scancheck import finite_volume, warn_if_thinner_than_window, warn_if_unlike_modality

FLAIR = "brain_tumor_mr/brats_2013_pat0003_1/Flair_subtrMeanDivStd.nii.gz"


def one_line_error(result: subprocess.CompletedProcess, message: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.stderr


@pytest.fixture(scope="module", params=[".nrrd", ".nii.gz", ".nii", "uncompressed .nii.gz"])
def nan_ct(small_ct, tmp_path_factory, request):
    """A small CT as float32 with a NaN slab, a few +Inf and a few -Inf voxels (ITK's NIfTI reader, before ITK 6,
    reads them as 0), and the array written. ITK also reads an uncompressed NIfTI named .nii.gz."""
    image = sitk.Cast(sitk.ReadImage(str(small_ct)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image)
    array[:3] = np.nan
    array[10, 10, :5] = np.inf
    array[20, 20, :5] = -np.inf
    poisoned = sitk.GetImageFromArray(array)
    poisoned.CopyInformation(image)
    path = tmp_path_factory.mktemp("nan") / f"nan{request.param.split()[-1]}"
    sitk.WriteImage(poisoned, str(path.with_suffix("") if request.param.startswith("uncompressed") else path))
    if request.param.startswith("uncompressed"):
        path.with_suffix("").rename(path)
    return path, array


def test_non_finite_voxels_become_the_lowest_finite_value_with_a_warning(nan_ct):
    path, array = nan_ct
    image = read_volume(path)
    bad = ~np.isfinite(array)
    np.testing.assert_array_equal(~np.isfinite(sitk.GetArrayViewFromImage(image)), bad)  # found where written
    said = []
    fixed = sitk.GetArrayFromImage(finite_volume(image, path.name, said.append))
    assert np.isfinite(fixed).all()
    np.testing.assert_array_equal(fixed[~bad], array[~bad])
    assert (fixed[bad] == array[~bad].min()).all()
    assert said == [f"{path.name}: {int(bad.sum())} voxels (9.4%) are NaN or infinite; they are treated as the "
                    f"lowest value in the scan ({array[~bad].min():g})"]


def test_a_float_nifti_without_a_zero_voxel_is_read_as_itk_reads_it(small_ct, tmp_path):
    """ITK turns NaN into 0: a float NIfTI without a voxel at 0 has no NaN to look for (the search stops)."""
    array = sitk.GetArrayFromImage(sitk.Cast(sitk.ReadImage(str(small_ct)), sitk.sitkFloat32)) + 0.5
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(sitk.ReadImage(str(small_ct)))
    sitk.WriteImage(image, str(tmp_path / "shifted.nii.gz"))
    read = read_volume(tmp_path / "shifted.nii.gz")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(read), array)
    assert not niftifile.may_hide_non_finite(read, tmp_path / "shifted.nii.gz")  # so the search is stopped,
    # and a stopped search gives nothing
    stopped = threading.Event()
    stopped.set()
    assert niftifile.non_finite_indices(tmp_path / "shifted.nii.gz", stopped) is None
    zeros = sitk.GetImageFromArray(np.zeros_like(array))
    assert niftifile.may_hide_non_finite(zeros, tmp_path / "shifted.nii.gz")  # a 0 may be a NaN ITK read


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nan_voxels_of_a_nifti_with_an_intercept_are_found(small_ct, tmp_path, suffix):
    """ITK puts 0 for NaN before applying the header's scl_slope and scl_inter, so such a NaN reads as scl_inter:
    that value, not 0, is what may hide one."""
    import gzip
    import struct

    image = sitk.Cast(sitk.ReadImage(str(small_ct)), sitk.sitkFloat32)
    array = sitk.GetArrayFromImage(image) + 0.5  # no voxel at 0 or at the intercept once read
    array[:2] = np.nan
    written = sitk.GetImageFromArray(array)
    written.CopyInformation(image)
    sitk.WriteImage(written, str(tmp_path / "plain.nii"))
    raw = bytearray((tmp_path / "plain.nii").read_bytes())
    raw[112:120] = struct.pack("<2f", 1.0, -1000.0)  # scl_slope, scl_inter
    path = tmp_path / f"intercept{suffix}"
    path.write_bytes(gzip.compress(bytes(raw)) if suffix == ".nii.gz" else bytes(raw))
    read = sitk.GetArrayFromImage(read_volume(path))
    np.testing.assert_array_equal(np.isnan(read), np.isnan(array))
    np.testing.assert_array_equal(read[2:], array[2:] - 1000.0)


def test_segmenting_a_scan_with_nan_voxels_warns_and_keeps_the_grid(nan_ct, tmp_path):
    path, _ = nan_ct
    output = tmp_path / "seg.nii.gz"
    result = run_cli("segment", path, "-o", output, "--device", "cpu", "--progress", "json", check_rc=0)
    assert any("NaN or infinite" in w for w in warnings_of(result))
    segmentation, image = sitk.ReadImage(str(output)), sitk.ReadImage(str(path))
    assert segmentation.GetSize() == image.GetSize() and segmentation.GetDirection() == image.GetDirection()
    assert sitk.GetArrayViewFromImage(segmentation).any()


@pytest.mark.parametrize("fill, suffix, message", [(np.nan, ".nrrd", "every voxel is NaN or infinite"),
                                                   (np.nan, ".nii.gz", "every voxel is NaN or infinite"),
                                                   (40.0, ".nrrd", "every voxel has the same value (40)")])
def test_an_all_nan_or_constant_scan_is_refused_with_one_line(small_ct, tmp_path, fill, suffix, message):
    image = sitk.Cast(sitk.ReadImage(str(small_ct)), sitk.sitkFloat32)
    blank = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(image).shape, fill, dtype=np.float32))
    blank.CopyInformation(image)
    path = tmp_path / f"blank{suffix}"
    sitk.WriteImage(blank, str(path))
    output = tmp_path / "out" / "seg.nii.gz"
    one_line_error(run_cli("segment", path, "-o", output), message)
    assert not output.exists()


def test_intensities_unlike_the_expected_modality_are_warned_about(abdomen_crop):
    mr, ct = sitk.ReadImage(str(data_file(FLAIR))), sitk.ReadImage(str(abdomen_crop["image"]))
    said = []
    warn_if_unlike_modality(ct, "ct", "CT", said.append)
    warn_if_unlike_modality(mr, "flair", "MR", said.append)
    assert said == []
    warn_if_unlike_modality(mr, "flair", "CT", said.append)
    warn_if_unlike_modality(ct, "ct", "MR", said.append)
    assert len(said) == 2 and "is this an MR" in said[0] and "like a CT in Hounsfield units" in said[1]


def test_a_scan_thinner_than_half_a_window_is_warned_about_along_its_thin_axis(abdomen_crop):
    """From the header: ct_b covers 40 mm head–foot of the default model's 192 mm windows; the abdomen crop
    (288 x 216 x 168 mm) is under half a window on no axis, also when stored with head–foot as its first
    axis; cut to 14 slices there, it is warned about head–foot. A model at the scan's own spacing has
    windows of its voxels (64 x 2 mm on ct_b)."""
    meta = read_metadata(DEFAULT_MODEL)

    def said(image, preprocessing=meta.preprocessing):
        messages = []
        warn_if_thinner_than_window(image, "scan", preprocessing, meta.roi_size, messages.append)
        return messages

    ct_b, crop = (sitk.ReadImage(str(p)) for p in (data_file("abdomen_ct/ct_b.nii.gz"), abdomen_crop["image"]))
    [message] = said(ct_b)
    assert "covers only 40 mm head–foot (window 192 mm)" in message and "left–right" not in message
    head_foot_first = sitk.PermuteAxes(crop, [2, 0, 1])
    assert said(crop) == [] and said(head_foot_first) == []
    [message] = said(head_foot_first[:14])
    assert "covers only 42 mm head–foot" in message and "left–right" not in message
    [message] = said(ct_b, dataclasses.replace(meta.preprocessing, spacing=None))
    assert "40 mm head–foot (window 128 mm)" in message


def test_an_mr_given_to_the_ct_model_runs_with_a_warning(tmp_path):
    mr = sitk.ReadImage(str(data_file(FLAIR)))
    path = tmp_path / "flair.nii.gz"
    sitk.WriteImage(mr[40:140:2, 40:180:2, 40:120:2], str(path))
    result = run_cli("segment", path, "-o", tmp_path / "seg.nii.gz", "--device", "cpu", "--progress", "json",
                     check_rc=0)
    assert any("the model expects CT" in w for w in warnings_of(result))


def test_a_left_handed_grid_gives_the_same_labels_on_its_own_grid(small_ct, tmp_path):
    """The same anatomy stored with its x axis reversed (direction determinant -1)."""
    image = sitk.ReadImage(str(small_ct))
    array = sitk.GetArrayFromImage(image)
    mirrored = sitk.GetImageFromArray(np.ascontiguousarray(array[:, :, ::-1]))
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    direction[:, 0] *= -1
    mirrored.SetSpacing(image.GetSpacing())
    mirrored.SetDirection(tuple(direction.ravel()))
    mirrored.SetOrigin(image.TransformIndexToPhysicalPoint((image.GetSize()[0] - 1, 0, 0)))
    assert np.linalg.det(direction) < 0
    sitk.WriteImage(mirrored, str(tmp_path / "left.nrrd"))
    for name, source in (("straight", small_ct), ("left", tmp_path / "left.nrrd")):
        run_cli("segment", source, "-o", tmp_path / f"{name}_seg.nrrd", "--device", "cpu", "--progress", "quiet",
                check_rc=0)
    straight, left = (sitk.ReadImage(str(tmp_path / f"{n}_seg.nrrd")) for n in ("straight", "left"))
    assert left.GetDirection() == mirrored.GetDirection() and left.GetOrigin() == mirrored.GetOrigin()
    labels = sitk.GetArrayFromImage(left)
    assert labels.any()
    np.testing.assert_array_equal(labels[:, :, ::-1], sitk.GetArrayFromImage(straight))


def test_an_absurdly_large_volume_is_refused_from_its_header(tmp_path):
    """A MetaImage header announcing 4000 x 4000 x 2000 voxels of 0.5 x 0.5 x 1 mm (a patient's 2 m, in 32 billion
    voxels) whose data file was never written."""
    header = tmp_path / "huge.mhd"
    header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 4000 4000 2000\nElementType = MET_SHORT\n"
                      "ElementSpacing = 0.5 0.5 1\nElementDataFile = huge.raw\n", encoding="ascii")
    started = time.time()
    one_line_error(run_cli("segment", header, "-o", tmp_path / "seg.nii.gz"), "GiB of memory and")
    assert time.time() - started < 60


def test_the_memory_estimate_grows_with_the_voxels_the_classes_and_the_window():
    meta = read_metadata(DEFAULT_MODEL)  # 3 mm grid, 64³ windows

    def estimate(size=(100, 100, 100), spacing=(3.0, 3.0, 3.0), voxel_bytes=2, **changes):
        return segment_bytes(ScanHeader(size, spacing, voxel_bytes), 1, dataclasses.replace(meta, **changes))

    fixed = BASE_BYTES + torch_build_bytes() + window_bytes(meta.network, meta.roi_size)
    small = estimate() - fixed
    assert estimate(size=(200, 200, 200)) - fixed == 8 * small
    assert estimate(spacing=(6.0, 6.0, 6.0)) - fixed > 4 * small  # the model grid counts: finer than the scan
    assert estimate(voxel_bytes=4) > estimate()  # a float32 scan is held as read
    assert estimate(network={**meta.network, "out_channels": 28}) > estimate()
    assert estimate(roi_size=(96, 96, 96)) > estimate() + 100 * 2**20  # activations of a larger window
    # a 512 x 512 x 300 CT at 0.8 mm onto a 1.5 mm grid, 14 classes: a few GiB, not tens
    assert 1 * GIB < estimate((512, 512, 300), (0.8, 0.8, 1.0), preprocessing=dataclasses.replace(
        meta.preprocessing, spacing=(1.5, 1.5, 2.0))) < 6 * GIB


def test_a_gpu_build_of_torch_counts_the_memory_its_import_takes(tmp_path):
    """torch's CUDA build maps its GPU libraries on a CPU run too (0.28 GiB more than the CPU build): told from
    its version.py as torch writes it, without importing it."""
    import torch

    builds = {"cpu": ("None", "None"), "cuda": ("'13.0'", "None"), "rocm": ("None", "'6.2.41133'")}
    for build, (cuda, hip) in builds.items():
        version = tmp_path / build / "version.py"
        version.parent.mkdir()
        version.write_text(f"from typing import Optional\n__version__ = '2.13.0'\ncuda: Optional[str] = {cuda}\n"
                           f"hip: Optional[str] = {hip}\n", encoding="utf-8")
        assert is_gpu_build(version) == (build != "cpu"), build
    assert not is_gpu_build(tmp_path / "missing.py")
    installed = torch.version.cuda is not None or torch.version.hip is not None
    assert torch_build_bytes() == (GPU_BUILD_BYTES if installed else 0)


def test_the_memory_estimate_bounds_a_real_run_on_a_large_ct_closely(tmp_path):
    """A 12 cm slab of ct_a resampled to 512 x 512 x 400 (int16: input voxels like the inference benchmark's
    largest case, a ninth of its windows), segmented for real on the model's first run (an empty cache:
    the network is built and exported to ONNX, the worst case): its peak resident memory lies under the estimate,
    and not far under."""
    source = sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))[:, :, 36:76]
    size = (512, 512, 400)
    spacing = [n * s / m for n, s, m in zip(source.GetSize(), source.GetSpacing(), size)]
    large = tmp_path / "large.nii"  # uncompressed: written in a second
    sitk.WriteImage(sitk.Resample(source, size, sitk.Transform(), sitk.sitkLinear, source.GetOrigin(), spacing,
                                  source.GetDirection(), -1024.0, sitk.sitkInt16), str(large))
    code = ("import sys\nfrom hybridmim.cli import main\nfrom hybridmim.memory import peak_rss_bytes\ntry:\n"
            "    main(sys.argv[1:])\nfinally:\n    print('peak', peak_rss_bytes())")
    result = subprocess.run([sys.executable, "-c", code, "segment", str(large), "-o", str(tmp_path / "seg.nii.gz"),
                             "--device", "cpu", "--progress", "quiet"], capture_output=True, text=True, cwd=REPO,
                            env={**os.environ, "HYBRIDMIM_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    peak = int(result.stdout.split("peak")[-1])
    estimated = segment_bytes(ScanHeader(size, tuple(spacing), 2), 1, read_metadata(DEFAULT_MODEL))
    assert peak < estimated < 1.4 * peak, (peak / GIB, estimated / GIB)


def test_a_second_run_on_the_same_output_refuses_and_a_killed_holder_does_not_block(small_ct, tmp_path):
    output = tmp_path / "seg.nii.gz"
    with output_lock(output):
        result = run_cli("segment", small_ct, "-o", output, "--device", "cpu")
        one_line_error(result, "another run is writing this output now")
        with pytest.raises(UserError, match="another run"):
            with output_lock(output):
                pass
    assert not output.exists() and list(tmp_path.iterdir()) == []  # nothing is left beside the output

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom hybridmim.atomic import output_lock\n"
                               "with output_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(60)",
                               str(output)], cwd=REPO, stdout=subprocess.PIPE, text=True, encoding="utf-8")
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(UserError, match="another run"):
        with output_lock(output):
            pass
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait(timeout=30)
    with output_lock(output):  # the OS released the dead holder's lock; its file is reused
        pass


def _tiny_network() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_network({"name": "unet", "features": [4, 8], "in_channels": 1, "out_channels": 3}).eval()


def _cuda_out_of_memory():
    """Fault injection (no GPU here): the error torch raises, with its message, when a GPU's memory runs out."""
    raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of "
                                      "7.79 GiB of which 1.02 GiB is free.")


@pytest.mark.parametrize("allocate, line", [
    (lambda: torch.empty(2**50), "out of memory (it asked for 4194304.0 GiB more): close other programs, or give "
                                 "smaller inputs"),  # 4 PiB: more than any address space, whatever the overcommit
    (lambda: np.empty(2**50), "out of memory (it asked for 8.00 PiB more): close other programs, or give smaller "
                              "inputs"),
    (_cuda_out_of_memory, "out of GPU memory (it asked for 2.00 GiB more): run it on the CPU (--device cpu), or on "
                          "smaller inputs or fewer crops at a time (a recipe's train settings)")],
    ids=["torch-cpu", "numpy", "cuda"])
def test_running_out_of_memory_where_nothing_caught_it_is_one_line_not_a_traceback(monkeypatch, allocate, line):
    """A command that runs out of memory (torch's and numpy's real errors on this machine's CPU; a GPU's injected)
    ends with exit code 1, one line on stderr and an error event, not an internal error's traceback."""
    import hybridmim.cli

    monkeypatch.setattr(hybridmim.cli, "_cmd_info", lambda args, reporter: allocate())
    result = run_cli_here("info", DEFAULT_MODEL, "--progress", "json", check_rc=1)
    assert result.stderr.splitlines() == [f"error: {line}"]
    assert result.stdout.splitlines()[-1] == json.dumps({"event": "error", "message": line})


class _RunsOutOfMemoryOnBatches(torch.nn.Module):
    """Fault injection (no GPU here): the real network, but a batch of more than one window raises
    the error CUDA raises when it runs out of memory."""

    def __init__(self, network):
        super().__init__()
        self.network, self.out_channels = network, network.out_channels

    def forward(self, x):
        if x.shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.network(x)


def test_window_plans_fall_back_to_host_blending_then_the_cpu():
    assert window_plans("cpu", 10 * GIB, None, 4) == [WindowPlan("cpu", "cpu", 1)]
    assert window_plans("cuda", GIB, 8 * GIB, 4) == [WindowPlan("cuda", "cuda", 4), WindowPlan("cuda", "cpu", 1),
                                                     WindowPlan("cpu", "cpu", 1)]
    # an output buffer larger than half the free GPU memory is blended on the host from the start
    assert window_plans("cuda", 5 * GIB, 8 * GIB, 1) == [WindowPlan("cuda", "cpu", 1), WindowPlan("cpu", "cpu", 1)]
    # a caller that holds more memory anyway (fine-tuning's validation) runs the CPU's windows two at a time
    assert window_plans("cpu", GIB, None, 4, cpu_batch=2) == [WindowPlan("cpu", "cpu", 2)]
    assert window_plans("cuda", GIB, 8 * GIB, 4, cpu_batch=2)[-1] == WindowPlan("cpu", "cpu", 2)


def test_out_of_memory_retries_with_the_next_plan_and_says_so():
    network = _tiny_network()
    volume = np.random.default_rng(0).normal(size=(1, 40, 40, 40)).astype(np.float32)
    expected = sliding_window(network, volume, (32, 32, 32), 0.5, torch.device("cpu"), Reporter("quiet"), 4)
    listening = WarningsKept()
    faulty = _RunsOutOfMemoryOnBatches(network)
    plans = [WindowPlan("cpu", "cpu", 4), WindowPlan("cpu", "cpu", 1)]
    from hybridmim.inference import _sliding_window

    def attempt(plan):
        return _sliding_window(faulty, volume, (32, 32, 32), 0.5, plan, Reporter("quiet"))

    result = run_with_fallbacks(plans, attempt, listening)
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)
    said = listening.warnings
    assert len(said) == 1 and "out of GPU memory with 4 window(s)" in said[0] and "retrying with 1 window(s)" in said[0]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_with_fallbacks(plans[:1], lambda p: _sliding_window(faulty, volume, (32, 32, 32), 0.5, p,
                                                                Reporter("quiet")), Reporter("quiet"))
