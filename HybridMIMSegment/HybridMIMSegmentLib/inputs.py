"""The scene volumes a segment or reconstruct run reads: those whose names name a model's channels are offered
for them, and they are written for the engine in their own coordinates (a transform above a volume is not
applied), so every channel must sit under the same transform, and the result is put under it again: it then lies
on the volume as the views show it."""

from __future__ import annotations

import re

from hybridmim.channelnames import spelled_as_model


def volumes_named_as_channels(channels: list[str], volumes: list[str]) -> dict[str, str]:
    """{channel: the scene volume named as it} for each of a model's ``channels`` that one volume of ``volumes``
    (their names) names, whole or in one of its words ("BraTS2021_00003_t1ce" and "T1c_subtrMeanDivStd" are T1c,
    "pat3 FLAIR" is FLAIR): a two-channel model's second channel is otherwise left for the user to pick, and a
    T1c picked as FLAIR gives a wrong segmentation without a word. None for a model of one channel: the volume on
    view is the one to segment, whatever its name."""
    picks = {}
    for channel in channels if len(channels) > 1 else ():
        wanted = spelled_as_model(channel)
        named = [volume for volume in volumes if spelled_as_model(volume) == wanted
                 or wanted in (spelled_as_model(word) for word in re.split(r"[\s_\-.]+", volume))]
        if len(named) == 1:
            picks[channel] = named[0]
    return picks


def shared_transform(volumes: list[tuple[str, str | None, str | None]]) -> str | None:
    """The ID of the transform every volume sits under (None: none), from ``(volume name, transform node ID,
    transform name)`` triples; channels under different transforms would reach the model misaligned."""
    transforms = {transform_id for _, transform_id, _ in volumes}
    if len(transforms) > 1:
        where = ", ".join(f"{name}: {transform_name or 'none'}" for name, _, transform_name in volumes)
        raise RuntimeError(f"The input volumes are under different transforms ({where}): harden them "
                           "(Transforms module) or put them under the same transform first.")
    return transforms.pop() if transforms else None
