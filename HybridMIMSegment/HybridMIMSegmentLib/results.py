"""What the panel's log says about a finished segmentation, from the engine's ``done`` outputs."""

from __future__ import annotations

from hybridmim.progress import MEAN_PREFIX


def segment_lines(segments: list[dict]) -> list[str]:
    """One line per segment found (its volume and mean intensity in each input channel), then one line
    naming the segments not found."""
    lines, missing = [], []
    for segment in segments:
        if not segment["volume_ml"]:
            missing.append(segment["name"])
            continue
        means = [f"mean {key[len(MEAN_PREFIX):]} {value:.1f}" for key, value in segment.items()
                 if key.startswith(MEAN_PREFIX) and value is not None]
        lines.append(f"  {segment['name']}: {segment['volume_ml']:.1f} ml" + "".join(f", {m}" for m in means))
    if missing:
        lines.append(f"  not found: {', '.join(missing)}")
    return lines
