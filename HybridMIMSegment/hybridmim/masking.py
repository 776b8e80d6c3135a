"""Patch masking for masked image modelling.

A crop is cut into a grid of cubic patches (16³ voxels: a 6×6×6 grid over a
96³ crop). Patches are masked at random, a fixed number per sample. HybridMIM
adds a second level: regions of 2×2×2 patches (27 over a 96³ crop), each the
receptive block of one bottleneck token. A region's labels (how many of its
8 patches are masked, and which) are read from the 3-D patch grid, so they
describe exactly the patches under the token that predicts them.

Grids and volumes are indexed (z, y, x); flattening is row-major throughout.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def check_mask_ratio(ratio: float, name: str = "mask ratio") -> None:
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {ratio}")


def masked_count(patches: int, ratio: float) -> int:
    """How many of ``patches`` a ``ratio`` masks (rounded up: 40% of 216 is 87, as in HybridMIM)."""
    check_mask_ratio(ratio)
    return min(patches, math.ceil(round(ratio * patches, 6)))


def random_patch_mask(batch: int, grid: tuple[int, int, int], ratio: float,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """(batch, *grid) booleans, True = masked; exactly ``masked_count`` patches per sample."""
    patches = math.prod(grid)
    noise = torch.rand(batch, patches, generator=generator)
    chosen = noise.argsort(dim=1)[:, : masked_count(patches, ratio)]
    mask = torch.zeros(batch, patches, dtype=torch.bool)
    mask.scatter_(1, chosen, True)
    return mask.view(batch, *grid)


def expand_patch_mask(mask: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(batch, gz, gy, gx) patch mask → (batch, 1, gz·p, gy·p, gx·p) voxel mask of the same dtype."""
    voxels = mask
    for dim in (1, 2, 3):
        voxels = voxels.repeat_interleave(patch_size, dim=dim)
    return voxels[:, None]


def volume_patch_mask(shape_zyx, patch_size: int, ratio: float, seed: int) -> torch.Tensor:
    """A (z, y, x) voxel mask over a whole volume: its patch grid (partial patches at the far
    edges included) masked at ``ratio``, reproducibly from ``seed``."""
    grid = tuple(math.ceil(n / patch_size) for n in shape_zyx)
    mask = random_patch_mask(1, grid, ratio, torch.Generator().manual_seed(seed))
    voxels = expand_patch_mask(mask, patch_size)[0, 0]
    return voxels[: shape_zyx[0], : shape_zyx[1], : shape_zyx[2]]


def patchify(volume: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, D, H, W) → (B, L, p³·C): one row per patch, patches in row-major grid order."""
    b, c, d, h, w = volume.shape
    p = patch_size
    x = volume.reshape(b, c, d // p, p, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 6, 3, 5, 7, 1).reshape(b, (d // p) * (h // p) * (w // p), p ** 3 * c)


def unpatchify(tokens: torch.Tensor, patch_size: int, grid: tuple[int, int, int], channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`."""
    b = tokens.shape[0]
    p = patch_size
    gz, gy, gx = grid
    x = tokens.reshape(b, gz, gy, gx, p, p, p, channels)
    return x.permute(0, 7, 1, 4, 2, 5, 3, 6).reshape(b, channels, gz * p, gy * p, gx * p)


def patch_cubes(rows: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """(N, p³·C) rows of :func:`patchify` → (N, C, p, p, p): each patch as a volume of its own."""
    p = patch_size
    return rows.reshape(-1, p, p, p, channels).permute(0, 4, 1, 2, 3)


def patch_means(feature: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, D, H, W) → (B, L, C): a feature averaged over each patch, patches in row-major grid order."""
    pooled = F.avg_pool3d(feature, patch_size) if patch_size > 1 else feature
    return pooled.flatten(2).transpose(1, 2)


def _regions(grid_values: torch.Tensor, region: int) -> torch.Tensor:
    """(B, gz, gy, gx) → (B, regions, region³): each region's patches, the region's own (a, b, c) order."""
    b, gz, gy, gx = grid_values.shape
    r = region
    x = grid_values.reshape(b, gz // r, r, gy // r, r, gx // r, r)
    return x.permute(0, 1, 3, 5, 2, 4, 6).reshape(b, (gz // r) * (gy // r) * (gx // r), r ** 3)


def region_labels(mask: torch.Tensor, region: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """HybridMIM's region targets from a (B, gz, gy, gx) patch mask.

    Returns (count (B, R) int64: masked patches per region, 0..region³;
    location (B, R, region³) float: 1 where that patch is masked). Region r is
    the r-th cell of the (gz/2, gy/2, gx/2) grid in row-major order, which is
    the r-th token of a bottleneck flattened the same way; bit a·4 + b·2 + c is
    the patch at offset (a, b, c) inside it.

    The official code grouped 8 consecutive flattened patch indices instead
    (token 0 got patches 0..7, a 1×2×... strip, not the 2×2×2 cube {0, 1, 6, 7,
    36, 37, 42, 43} under it), so its labels described other patches.
    """
    location = _regions(mask, region).float()
    return location.sum(-1).long(), location


def complete_regions(valid: torch.Tensor, patch_size: int, region: int = 2) -> torch.Tensor:
    """(B, R) booleans: regions none of whose patches is all padding.

    ``valid`` is the (B, 1, D, H, W) voxel mask of real image (0 = padding). A
    patch of padding looks exactly like a masked one, so such regions carry no
    usable count/location target.
    """
    patch_has_image = F.max_pool3d(valid.float(), patch_size)[:, 0] > 0
    return _regions(patch_has_image, region).all(-1)


def octant_token_mask(octants: torch.Tensor, grid: int) -> torch.Tensor:
    """MiM's level-1 mask: (B, 2, 2, 2) octant booleans → (B, grid, grid, grid) token booleans, each
    octant the (grid/2)³ cube of tokens it covers (3×3×3 on a 6³ grid).

    The official MiM code took 27 consecutive flattened token indices per octant (the first
    four and a half rows of the grid, not a cube), so its level-2 volumes were not the masked regions.
    """
    if grid % 2:
        raise ValueError(f"a token grid of {grid} per axis has no octants")
    return expand_patch_mask(octants, grid // 2)[:, 0]


def hard_patch_mask(predicted: torch.Tensor, noise: torch.Tensor, masked: int, hard: int) -> torch.Tensor:
    """SelfMedHPM's mask: (B, L) booleans with exactly ``masked`` tokens per sample, the ``hard`` of them
    with the highest ``predicted`` loss included, the rest drawn by ``noise`` (uniform in [0, 1)).

    One top-k over scores where the hardest sit above any noise value: no per-sample loop.
    """
    if not 0 <= hard <= masked <= predicted.shape[1]:
        raise ValueError(f"need 0 ≤ hard ({hard}) ≤ masked ({masked}) ≤ tokens ({predicted.shape[1]})")
    scores = noise.clone()
    scores.scatter_(1, predicted.topk(hard, dim=1).indices, 2.0)
    mask = torch.zeros_like(noise, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(masked, dim=1).indices, True)
