"""The engine command lines the panel runs (arguments after ``python -m hybridmim``;
EngineProcess adds ``--progress json``). One builder per panel action."""

from __future__ import annotations

DEVICES = ("auto", "cuda", "cpu")


def _device(device: str) -> list[str]:
    if device not in DEVICES:
        raise ValueError(f"device must be one of {DEVICES}, got {device!r}")
    return ["--device", device]


def _time_limit(max_minutes: float | None) -> list[str]:
    return [] if max_minutes is None else ["--max-minutes", f"{max_minutes:g}"]


def segment_command(inputs: list[str], output: str, model: str | None = None, device: str = "auto") -> list[str]:
    """Segment: one input file per model channel, in the model's order; the output is new (no --overwrite)."""
    if not inputs:
        raise ValueError("segment needs at least one input volume")
    return ["segment", *inputs, "-o", output, *(["--model", model] if model else []), *_device(device)]


def reconstruct_command(inputs: list[str], output_dir: str, model: str | None = None, mask_ratio: float | None = None,
                        seed: int = 0, device: str = "auto") -> list[str]:
    command = ["reconstruct", *inputs, "-o", output_dir, "--seed", str(int(seed)), *_device(device)]
    if model:
        command += ["--model", model]
    if mask_ratio is not None:
        command += ["--mask-ratio", f"{mask_ratio:g}"]
    return command


def finetune_command(init: str, data: list[str], output: str, epochs: int | None = None, labels: str | None = None,
                     val: list[str] | None = None, device: str = "auto", resume: bool = False,
                     max_minutes: float | None = None) -> list[str]:
    """Fine-tune from ``init`` on case folders ``data`` (at most ``epochs``, and only those that fit in
    ``max_minutes``); ``resume`` continues the run that wrote ``output``."""
    if not data:
        raise ValueError("fine-tuning needs at least one training folder")
    command = ["finetune", "--init", init, "--data", *data, "-o", output, *_device(device)]
    if val:
        command += ["--val", *val]
    if resume:
        return command + ["--resume"]
    if epochs is not None:
        command += ["--epochs", str(int(epochs))]
    command += _time_limit(max_minutes)
    if labels:
        command += ["--labels", labels]
    return command


# The pre-training methods the panel offers: (value of --method, what the user reads).
PRETRAIN_METHODS = (
    ("hybridmim", "HybridMIM (U-Net: the network of the shipped CT models)"),
    ("mim", "MiM (convolution + transformer hybrid)"),
    ("hpm", "SelfMedHPM (convolution + transformer hybrid)"),
)


# The scans' modalities the panel offers: (value of --modality, what the user reads).
PRETRAIN_MODALITIES = (
    ("CT", "CT (Hounsfield units)"),
    ("MR", "MR (each scan z-scored)"),
)


def pretrain_command(data: list[str], output: str, method: str = "hybridmim", device: str = "auto",
                     resume: bool = False, max_minutes: float | None = None, modality: str = "CT") -> list[str]:
    """Self-supervised pre-training on the ``modality`` scans in ``data`` (files and folders; at most
    ``max_minutes``); ``resume`` continues the run that wrote ``output``."""
    if not data:
        raise ValueError("pre-training needs at least one scan or folder of scans")
    if method not in dict(PRETRAIN_METHODS):
        raise ValueError(f"method must be one of {[m for m, _ in PRETRAIN_METHODS]}, got {method!r}")
    if modality not in dict(PRETRAIN_MODALITIES):
        raise ValueError(f"modality must be one of {[m for m, _ in PRETRAIN_MODALITIES]}, got {modality!r}")
    command = ["pretrain", "--data", *data, "-o", output, *_device(device)]
    if resume:
        return command + ["--resume"]
    return command + ["--method", method, "--modality", modality, *_time_limit(max_minutes)]


def convert_command(source: str, output: str) -> list[str]:
    """Import an official HybridMIM .pt checkpoint as one of ours."""
    return ["convert", source, "-o", output]


def devices_command() -> list[str]:
    """What the engine finds: its ``done`` outputs feed hybridmim.modelinfo.describe_devices."""
    return ["devices"]
