"""Self-describing checkpoints: weights in safetensors, everything else in its metadata.

The metadata key ``hybridmim`` holds one JSON document (see docs/CHECKPOINT.md):
format, task, network, channels, preprocessing, inference, labels, method,
pretraining, provenance, metrics. Reading never unpickles anything.

Two tasks: ``segmentation`` (outputs: background + one channel per label) and
``reconstruction`` (a pre-trained encoder-decoder whose outputs rebuild its
inputs; no labels), which fine-tuning turns into a segmentation model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import UserError, message_line
from .labels import Label, parse_labels, parse_regions, source_lookup
from .preprocessing import Preprocessing
from .runfiles import model_of_state

FORMAT = "hybridmim-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "hybridmim"
TASKS = ("segmentation", "reconstruction")


@dataclass
class ModelMeta:
    """The parsed, validated metadata of a checkpoint."""

    network: dict
    channels: list[dict]
    preprocessing: Preprocessing
    roi_size: tuple[int, int, int]
    overlap: float
    labels: list[Label]
    method: str
    task: str = "segmentation"
    pretraining: dict = field(default_factory=dict)
    title: str = ""
    description: str = ""
    provenance: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    regions: list[dict] = field(default_factory=list)  # named unions of labels that evaluate scores

    @property
    def source_lookup(self) -> dict[int, int]:
        """{value in reference label maps: label value} (see labels.py)."""
        return source_lookup(self.labels)

    @property
    def output_values(self) -> list[int]:
        """Label value of each output channel (channel 0 is background)."""
        return [0] + [label.value for label in self.labels]

    @property
    def largest_component_values(self) -> list[int]:
        """The label values cut to their largest connected piece after inference."""
        return [label.value for label in self.labels if label.largest_component]

    def check_input_count(self, given: list[str], model_name: str) -> None:
        """Refuse a run given another number of input images (``given``: each one's name) than the model has
        channels."""
        if len(given) != len(self.channels):
            wanted = ", ".join(c["name"] for c in self.channels)
            raise UserError(f"model {model_name} expects {len(self.channels)} input channel(s) ({wanted}); got "
                            f"{len(given)} ({', '.join(given)})")

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "task": self.task,
            "title": self.title,
            "description": self.description,
            "network": self.network,
            "channels": self.channels,
            "preprocessing": self.preprocessing.to_dict(),
            "inference": {"roi_size": list(self.roi_size), "overlap": self.overlap},
            "labels": [label.to_dict() for label in self.labels],
            "method": self.method,
            "pretraining": self.pretraining,
            "provenance": self.provenance,
            "metrics": self.metrics,
            **({"regions": self.regions} if self.regions else {}),
        }

    @classmethod
    def from_dict(cls, d: dict, source: str = "checkpoint") -> "ModelMeta":
        if d.get("format") != FORMAT:
            raise UserError(f"{source}: not a HybridMIMSegment checkpoint")
        _check_metadata_kinds(d, source)
        if d.get("format_version", 0) > FORMAT_VERSION:
            raise UserError(f"{source}: written by a newer HybridMIMSegment (format {d['format_version']}); "
                            "update the extension")
        task = d.get("task", "segmentation")
        if task not in TASKS:
            raise UserError(f"{source}: unknown task {task!r} (expected one of {', '.join(TASKS)})")
        try:
            network = dict(d["network"])
            channels = d["channels"]
            inference = dict(d["inference"])
            labels = parse_labels(d["labels"], f"{source} labels") if task == "segmentation" else []
            regions = parse_regions(d.get("regions", []), labels, f"{source} regions")
            preprocessing = Preprocessing.from_dict(d["preprocessing"])
            pretraining = dict(d.get("pretraining") or {})
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source}: incomplete checkpoint metadata ({exc})") from None
        check_channels(channels, source)
        if network.get("in_channels") != len(channels):
            raise UserError(f"{source}: network has {network.get('in_channels')} input channels, "
                            f"metadata lists {len(channels)}")
        expected_outputs = len(labels) + 1 if task == "segmentation" else len(channels)
        if network.get("out_channels") != expected_outputs:
            what = (f"{len(labels)} labels + background" if task == "segmentation"
                    else f"{len(channels)} reconstructed channel(s)")
            raise UserError(f"{source}: network has {network.get('out_channels')} outputs for {what}")
        roi_size, overlap = inference_settings(inference, source)
        return cls(network, channels, preprocessing, roi_size, overlap, labels, str(d.get("method", "unknown")),
                   task, pretraining, str(d.get("title", "")), str(d.get("description", "")),
                   dict(d.get("provenance") or {}), dict(d.get("metrics") or {}), regions)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_metadata_kinds(d: dict, source: str) -> None:
    """Refuse metadata of the wrong kinds (edited by hand, or by another tool) in one line: the blocks read as
    objects, the format version, and the network widths that memory estimates read before any network is built."""
    for key in ("network", "inference", "pretraining", "metrics", "provenance"):
        if not isinstance(d.get(key) or {}, dict):
            raise UserError(f"{source}: its '{key}' metadata must be an object, got {json.dumps(d[key])[:40]}")
    if not isinstance(d.get("format_version", 0), int):
        raise UserError(f"{source}: its 'format_version' must be a whole number, got {json.dumps(d['format_version'])}")
    network = d.get("network") or {}
    features = network.get("features", [1])
    if not (isinstance(features, list) and features and all(map(_whole, features)) and
            _whole(network.get("feature_size", 1))):
        raise UserError(f"{source}: its network's 'features' (or 'feature_size') must be whole numbers ≥ 1")


def check_channels(channels, source: str) -> None:
    """Refuse input channels that are not a list of objects, each with a name and, where given, a modality as text
    (a recipe's, or a checkpoint's)."""
    if not isinstance(channels, list) or not channels or not all(
            isinstance(c, dict) and isinstance(c.get("name"), str) and c["name"] and
            isinstance(c.get("modality", ""), str) for c in channels):
        raise UserError(f"{source}: 'channels' must list the input channels with their names (and modalities, "
                        "such as CT or MR)")


def inference_settings(settings: dict, source: str) -> tuple[tuple[int, int, int], float]:
    """(window size, overlap) of ``settings``' ``roi_size`` and ``overlap`` (default 0.5), refused where the sliding
    window cannot use them (an overlap of 1 or more would step by a voxel: millions of windows)."""
    def number(value) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    roi_size, overlap = settings.get("roi_size"), settings.get("overlap", 0.5)
    sizes = roi_size if isinstance(roi_size, list | tuple) else []
    if not (len(sizes) == 3 and all(number(v) and float(v).is_integer() and v >= 1 for v in sizes)
            and number(overlap) and 0 <= overlap < 1):
        raise UserError(f"{source}: bad inference settings (roi_size {json.dumps(roi_size, default=str)}, overlap "
                        f"{json.dumps(overlap, default=str)}): give a window of three whole numbers ≥ 1 and an "
                        "overlap in [0, 1)")
    return tuple(int(v) for v in sizes), float(overlap)


def _open_header(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file")
    try:
        with safe_open(str(path), framework="np") as f:
            return f.metadata() or {}
    except Exception as exc:  # safetensors raises several types for a bad header
        model = model_of_state(path)
        if model is not None:
            raise UserError(f"{path}: a training run's resume state (what --resume continues), not a model; the run "
                            f"writes its model as {model.name}") from None
        if path.suffix in (".pt", ".pth", ".ckpt"):  # torch's pickles, which safetensors cannot read at all
            raise UserError(f"{path}: a PyTorch file, not one of our checkpoints; an official HybridMIM checkpoint "
                            f"is imported with `hybridmim convert {path.name} -o {path.stem}.safetensors`") from None
        raise UserError(f"{path}: not a safetensors checkpoint: {message_line(exc)}") from None


def read_metadata(path: str | Path) -> ModelMeta:
    """Metadata only (fast: reads the header, not the weights)."""
    path = Path(path)
    header = _open_header(path)
    if METADATA_KEY not in header:
        raise UserError(f"{path}: a safetensors file, but not a HybridMIMSegment checkpoint "
                        f"(no '{METADATA_KEY}' metadata)")
    try:
        document = json.loads(header[METADATA_KEY])
    except ValueError:
        raise UserError(f"{path}: checkpoint metadata is not valid JSON") from None
    return ModelMeta.from_dict(document, str(path))


def save_checkpoint(path: str | Path, state_dict: dict, meta: ModelMeta, half: bool = False) -> None:
    """Write weights + metadata atomically; ``half`` stores floating tensors as float16."""
    import torch
    from safetensors.torch import save

    from .atomic import atomic_output

    tensors = {}
    for name, tensor in state_dict.items():
        tensor = tensor.detach().cpu()
        if half and tensor.is_floating_point():
            tensor = tensor.to(torch.float16)
        tensors[name] = tensor.contiguous()
    with atomic_output(Path(path)) as tmp:
        # Python writes the bytes: a full disk is then OSError ENOSPC, which atomic_output says in one line
        tmp.write_bytes(save(tensors, metadata={METADATA_KEY: json.dumps(meta.to_dict())}))


def load_model(path: str | Path, device="cpu"):
    """(metadata, network in eval mode with float32 weights on ``device``)."""
    from safetensors.torch import load_file

    from .networks import build_network

    path = Path(path)
    meta = read_metadata(path)
    network = build_network(meta.network)
    _check_tensor_shapes(path, {name: tuple(t.shape) for name, t in network.state_dict().items()})
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
    network.load_state_dict(state, strict=True)
    return meta, network.to(device).eval()


def _check_tensor_shapes(path: Path, expected: dict[str, tuple]) -> None:
    """Refuse, from the header alone (before any weight is read), tensors that do not fit the described network."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        found = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    problems = [f"missing {name}" for name in expected if name not in found]
    problems += [f"unexpected {name}" for name in found if name not in expected]
    problems += [f"{name} is {list(found[name])}, the network needs {list(shape)}"
                 for name, shape in expected.items() if name in found and found[name] != shape]
    if problems:
        more = f" and {len(problems) - 1} more" if len(problems) > 1 else ""
        raise UserError(f"{path}: weights do not match the described network ({problems[0]}{more})")
