"""Shared fixtures: real volumes from ../shared/data, cropped small in the test."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import SimpleITK as sitk
import torch
from hybridmim.progress import Reporter

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
MODELS = REPO / "HybridMIMSegment" / "Resources" / "Models"
DEFAULT_MODEL = MODELS / "abdomen-ct-scratch.safetensors"

# Index box (x, y, z) of ct_a holding all its labelled upper-abdominal organs.
ABDOMEN_BOX = ((8, 104), (18, 90), (56, 112))


if os.environ.get("PYTEST_XDIST_WORKER"):
    # Workers (scripts/test.sh) share the cores: as many threads each as leave none oversubscribed, for the engine
    # processes they start too. With two threads each on two cores the suite (375 tests) took 444-522 s instead of
    # 295 s (one process: 417 s), and a timed tiny step once took so long that one step of 1000 fitted in a 15-s limit.
    _worker_threads = max(1, torch.get_num_threads() // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))
    os.environ["OMP_NUM_THREADS"] = str(_worker_threads)
    torch.set_num_threads(_worker_threads)
THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _torch_threads_as_at_start():
    """A recipe's ``num_threads`` (the tiny ones set 1) must not outlive its run: a later test in this process would
    round differently from its reference run in another (the exact-resume tests compare weights bit for bit)."""
    torch.set_num_threads(THREADS)  # also after a module-scoped fixture's run
    yield
    torch.set_num_threads(THREADS)


def data_file(relative: str) -> Path:
    path = DATA / relative
    if not path.exists():
        pytest.fail(f"test data missing: {path} (../shared/data must sit beside the checkout)")
    return path


def crop(image: sitk.Image, box=ABDOMEN_BOX) -> sitk.Image:
    (x0, x1), (y0, y1), (z0, z1) = box
    return image[x0:x1, y0:y1, z0:z1]


def around_the_tumour(case: Path, target: Path, margin_mm: float = 15.0) -> None:
    """A sarcoma case folder cut to its tumour's box and a margin: validating on it takes a few windows, not sixteen."""
    target.mkdir(parents=True)
    image, label = (sitk.ReadImage(str(case / name)) for name in ("image.nii.gz", "label.nii.gz"))
    shape = sitk.LabelShapeStatisticsImageFilter()
    shape.Execute(sitk.Cast(label > 0, sitk.sitkUInt8))
    box = shape.GetBoundingBox(1)
    cut = tuple(slice(max(0, box[i] - round(margin_mm / image.GetSpacing()[i])),
                      min(image.GetSize()[i], box[i] + box[i + 3] + round(margin_mm / image.GetSpacing()[i])))
                for i in range(3))
    sitk.WriteImage(image[cut], str(target / "image.nii.gz"))
    sitk.WriteImage(label[cut], str(target / "label.nii.gz"))


def write_slicer_segmentation(path: Path, grid: sitk.Image, segments: list[dict]) -> None:
    """A .seg.nrrd as Slicer saves one, on ``grid``'s voxel grid: ``segments`` are {"name", "mask" (bool, z y x),
    "layer", "value" (the label value within its layer), optionally "terminology" (slicerio's form)}."""
    import numpy as np
    import slicerio
    from hybridmim.geometry import Grid

    layers = np.zeros((1 + max(s["layer"] for s in segments), *grid.GetSize()), dtype=np.uint8)
    entries = []
    for number, segment in enumerate(segments, start=1):
        layers[segment["layer"]][segment["mask"].T] = segment["value"]  # slicerio's voxels are (i, j, k)
        entries.append({"id": f"Segment_{number}", "name": segment["name"], "labelValue": segment["value"],
                        "layer": segment["layer"], "color": [0.5, 0.5, 0.5],
                        **({"terminology": segment["terminology"]} if "terminology" in segment else {})})
    voxels = layers if len(layers) > 1 else layers[0]
    slicerio.write_segmentation(str(path), {"voxels": voxels, "ijkToLPS": Grid.of(grid).ijk_to_lps(),
                                            "segments": entries})


@pytest.fixture(scope="session")
def abdomen_crop(tmp_path_factory) -> dict[str, Path]:
    """ct_a and its BTCV-13 labels, cropped to the upper abdomen (96 x 72 x 56 voxels at 3 mm)."""
    folder = tmp_path_factory.mktemp("abdomen")
    paths = {"image": folder / "ct.nii.gz", "label": folder / "label.nii.gz"}
    sitk.WriteImage(crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))), str(paths["image"]))
    sitk.WriteImage(crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a_btcv13.nii.gz")))), str(paths["label"]))
    return paths


@pytest.fixture(scope="session")
def small_ct(abdomen_crop) -> Path:
    """The centre of the abdomen crop, 48 x 48 x 32 voxels at 3 mm: one inference window, for tests of
    the pipeline's mechanics rather than of the model."""
    path = abdomen_crop["image"].with_name("small_ct.nii.gz")
    sitk.WriteImage(sitk.ReadImage(str(abdomen_crop["image"]))[20:68, 10:58, 10:42], str(path))
    return path


def _checked(result: subprocess.CompletedProcess, check_rc: int | None) -> subprocess.CompletedProcess:
    if check_rc is not None:
        assert result.returncode == check_rc, f"rc={result.returncode}\nstdout:{result.stdout}\nstderr:{result.stderr}"
    return result


def run_cli(*args, check_rc: int | None = None) -> subprocess.CompletedProcess:
    """``python -m hybridmim ARGS`` in a subprocess, as users and the Slicer module run it."""
    # The engine writes UTF-8 (tqdm bars), whatever the locale of the test run.
    result = subprocess.run([sys.executable, "-m", "hybridmim", *map(str, args)], capture_output=True, text=True,
                            encoding="utf-8", errors="replace", cwd=REPO, timeout=600)
    return _checked(result, check_rc)


def run_cli_here(*args, check_rc: int | None = None, stdout: io.StringIO | None = None) -> subprocess.CompletedProcess:
    """``hybridmim ARGS`` run by the CLI's ``main`` in this process, with ``run_cli``'s result: the same parsing,
    files, output and exit code, without a new interpreter's ~8 s of torch and MONAI imports. For what a command
    does; ``run_cli`` where the process itself is tested (a kill, what it imports). ``stdout``: where its output
    goes (a ``StopsAt``)."""
    import contextlib

    from hybridmim.cli import main

    stdout, stderr = stdout or io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            main([str(a) for a in args])
        returncode = 0
    except SystemExit as exit_:
        returncode = exit_.code
    finally:
        torch.set_num_threads(THREADS)  # a recipe's num_threads must not outlive its run
    result = subprocess.CompletedProcess(["hybridmim", *map(str, args)], returncode, stdout.getvalue(),
                                         stderr.getvalue())
    return _checked(result, check_rc)


class StopsAt(io.StringIO):
    """An output stream that sends this process SIGTERM (Slicer's Stop) once the run on it reports step ``done`` of
    ``stage`` (``done`` None: once it starts ``stage`` for the ``nth`` time): the stop request as the engine's own
    process gets it, for a run in this process."""

    def __init__(self, stage: str, done: int | None, nth: int = 1):
        super().__init__()
        self.stage, self.done, self.starts_left = stage, done, nth

    def write(self, text: str) -> int:
        from hybridmim.progress import parse_event

        event = parse_event(text)
        if event and event["event"] == "progress" and (event["stage"], event["done"]) == (self.stage, self.done):
            os.kill(os.getpid(), signal.SIGTERM)
        if self.done is None and event == {"event": "stage", "name": self.stage}:
            self.starts_left -= 1
            if self.starts_left == 0:
                os.kill(os.getpid(), signal.SIGTERM)
        return super().write(text)


class WarningsKept(Reporter):
    """A quiet reporter that keeps the warnings it is given, in ``warnings``."""

    def __init__(self):
        super().__init__("quiet")
        self.warnings: list[str] = []

    def warning(self, text: str) -> None:
        self.warnings.append(text)


def record_curve_drawings(monkeypatch) -> list[int]:
    """From now on, the last step of the history that each drawing of a training curve shows."""
    import hybridmim.curves

    drawn, draw = [], hybridmim.curves.plot_curves
    monkeypatch.setattr(hybridmim.curves, "plot_curves", lambda history, *args: (drawn.append(history[-1]["step"]),
                                                                                 draw(history, *args)))
    return drawn


def warnings_of(result: subprocess.CompletedProcess) -> list[str]:
    """The warning messages of a ``--progress json`` run."""
    from hybridmim.progress import parse_event

    return warning_texts(parse_event(line) for line in result.stdout.splitlines())


def warning_texts(events) -> list[str]:
    """The warning messages among progress ``events`` (parsed lines; None for a line that is no event)."""
    return [e["text"] for e in events if e and e["event"] == "message" and e["level"] == "warning"]


def signalled_run(args, at, signal_number) -> tuple[subprocess.Popen, list[dict], list[dict]]:
    """``python -m hybridmim ARGS`` (which asks for JSON progress) sent ``signal_number`` at the first event that
    ``at`` accepts: the process, ended, with the events it reported up to the signal and after it."""
    from hybridmim.progress import parse_event

    process = subprocess.Popen([sys.executable, "-m", "hybridmim", *map(str, args)], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, encoding="utf-8", errors="replace", cwd=REPO)
    before = []
    for line in process.stdout:
        if event := parse_event(line):
            before.append(event)
            if at(event):
                process.send_signal(signal_number)
                break
    after = [e for e in map(parse_event, process.stdout.read().splitlines()) if e]
    process.wait(timeout=120)
    return process, before, after


def stop_while_preparing(*args) -> tuple[int, dict | None, str]:
    """``python -m hybridmim ARGS --progress json`` sent SIGTERM (Slicer's Stop) once it has prepared its first
    case: (exit code, the outputs of its done event, stderr)."""
    process, _, after = signalled_run([*args, "--progress", "json"], lambda e: e["event"] == "progress" and
                                      e["stage"] == "prepare data", signal.SIGTERM)
    done = [e for e in after if e["event"] == "done"]
    return process.returncode, done[0]["outputs"] if done else None, process.stderr.read()


@pytest.fixture
def refused():
    """``refused(*args, message=...)``: the CLI, run in this process, exits with code 2 and one line on stderr that
    holds ``message``; returns that line."""
    def check(*args, message: str) -> str:
        lines = run_cli_here(*args, check_rc=2).stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        return lines[0]
    return check


@pytest.fixture(scope="session")
def scans(tmp_path_factory) -> Path:
    """Two real CTs, cropped: a chest (lung tumour) and an abdomen, as a folder of image files."""
    folder = tmp_path_factory.mktemp("scans")
    lung = sitk.ReadImage(str(data_file("lung_tumor_ct/image.nii.gz")))
    sitk.WriteImage(lung[30:174, 40:170, 10:50], str(folder / "lung.nii.gz"))
    sitk.WriteImage(crop(sitk.ReadImage(str(data_file("abdomen_ct/ct_a.nii.gz")))), str(folder / "abdomen.nii.gz"))
    return folder


@pytest.fixture(scope="session")
def prepared(scans, tmp_path_factory) -> Path:
    """The scans prepared once by the CLI at 3 mm (the tiny pre-training recipes' grid), as a --data folder."""
    folder = tmp_path_factory.mktemp("prepared")
    recipe = folder.with_name("prepare-3mm.json")
    recipe.write_text(json.dumps({"preprocessing": {"spacing": [3.0, 3.0, 3.0]}}), encoding="utf-8")
    run_cli_here("pretrain", "--prepare-only", "--recipe", recipe, "--cache", folder, "--data", scans, check_rc=0)
    return folder
