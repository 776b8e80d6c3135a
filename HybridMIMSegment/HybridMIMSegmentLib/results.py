"""What the panel says about a finished run, from the engine's ``done`` outputs."""

from __future__ import annotations

from hybridmim.progress import MEAN_PREFIX, edge_text


def segment_lines(segments: list[dict]) -> list[str]:
    """One line per segment found (its volume, mean intensity in each input channel, the volume the model was
    unsure of, and where it reaches the scan's edge), then one line naming the segments not found."""
    lines, missing = [], []
    for segment in segments:
        if not segment["volume_ml"]:
            missing.append(segment["name"])
            continue
        details = [f"mean {key[len(MEAN_PREFIX):]} {value:.1f}" for key, value in segment.items()
                   if key.startswith(MEAN_PREFIX) and value is not None]
        if segment.get("unsure_ml") is not None:
            share = 100 * segment["unsure_ml"] / segment["volume_ml"]
            details.append(f"model unsure of {segment['unsure_ml']:.1f} ml ({share:.0f} % of its volume)")
        sides = segment.get("at_edge")
        edge = f" (reaches the scan's {edge_text(sides)}: may go on beyond it)" if sides else ""
        lines.append(f"  {segment['name']}: {segment['volume_ml']:.1f} ml" + "".join(f", {d}" for d in details) + edge)
    if missing:
        lines.append(f"  not found: {', '.join(missing)}")
    return lines


def training_stop_message(outputs: dict) -> str | None:
    """What a training run (fine-tuning or pre-training) that was stopped before its end says; None when it ran
    to its end and wrote its model."""
    if outputs.get("before_training"):
        earlier = "Resume continues the earlier run." if outputs.get("resume_state") else "nothing to resume."
        return f"Stopped before training began: {earlier}"
    if outputs.get("stopped"):
        return f"Stopped at step {outputs['step']} of {outputs['steps']}: Resume continues."
    return None
