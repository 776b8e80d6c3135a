"""The scene volumes a segment or reconstruct run reads. They are written for the engine in their own
coordinates (a transform above a volume is not applied), so every channel must sit under the same
transform, and the result is put under it again: it then lies on the volume as the views show it."""

from __future__ import annotations


def shared_transform(volumes: list[tuple[str, str | None, str | None]]) -> str | None:
    """The ID of the transform every volume sits under (None: none), from ``(volume name, transform node ID,
    transform name)`` triples; channels under different transforms would reach the model misaligned."""
    transforms = {transform_id for _, transform_id, _ in volumes}
    if len(transforms) > 1:
        where = ", ".join(f"{name}: {transform_name or 'none'}" for name, _, transform_name in volumes)
        raise RuntimeError(f"The input volumes are under different transforms ({where}): harden them "
                           "(Transforms module) or put them under the same transform first.")
    return transforms.pop() if transforms else None
