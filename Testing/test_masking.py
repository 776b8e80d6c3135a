"""Patch masking and HybridMIM's region labels: counts, alignment with the bottleneck tokens
(hand-checked cases, then properties over many drawn grids, ratios and seeds)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridmim.masking import (complete_regions, expand_patch_mask, masked_count, patchify, random_patch_mask,
                               region_labels, unpatchify, volume_patch_mask)


def test_masked_count_rounds_up_like_hybridmim():
    assert masked_count(216, 0.4) == 87
    assert masked_count(216, 0.0) == 0
    assert masked_count(10, 0.3) == 3  # 0.3·10 is 3.0000000000000004 in floats: not 4
    with pytest.raises(ValueError):
        masked_count(216, 1.0)


def test_random_mask_has_exactly_the_count_per_sample_and_is_reproducible():
    mask = random_patch_mask(5, (6, 6, 6), 0.4, torch.Generator().manual_seed(3))
    assert mask.shape == (5, 6, 6, 6) and mask.dtype == torch.bool
    assert mask.flatten(1).sum(1).tolist() == [87] * 5
    assert not torch.equal(mask[0], mask[1])
    assert torch.equal(mask, random_patch_mask(5, (6, 6, 6), 0.4, torch.Generator().manual_seed(3)))


def test_patchify_round_trip_and_row_major_patch_order():
    volume = torch.arange(2 * 2 * 8 * 12 * 4, dtype=torch.float32).reshape(2, 2, 8, 12, 4)
    tokens = patchify(volume, 4)
    assert tokens.shape == (2, 2 * 3 * 1, 4 ** 3 * 2)
    assert torch.equal(unpatchify(tokens, 4, (2, 3, 1), 2), volume)
    # Patch 1 is the second along y (row-major z, y, x), channel last in a row.
    assert torch.equal(tokens[0, 1].view(4, 4, 4, 2)[..., 0], volume[0, 0, 0:4, 4:8, 0:4])


def test_voxel_mask_masks_exactly_the_chosen_patches():
    mask = random_patch_mask(1, (6, 6, 6), 0.4, torch.Generator().manual_seed(0))
    voxels = expand_patch_mask(mask, 16)
    assert voxels.shape == (1, 1, 96, 96, 96)
    rows = patchify(voxels.float(), 16)[0]
    # every patch row is all ones or all zeros, and the ones are the masked patches
    assert torch.equal(rows.min(1).values, rows.max(1).values)
    assert torch.equal(rows[:, 0].bool(), mask.flatten())


def test_region_labels_describe_the_patches_under_each_bottleneck_token():
    """Un-patchify the region labels and compare them, token by token, with the mask."""
    generator = torch.Generator().manual_seed(1)
    mask = random_patch_mask(3, (6, 6, 6), 0.4, generator)
    count, location = region_labels(mask)
    assert count.shape == (3, 27) and location.shape == (3, 27, 8)
    assert torch.equal(count, location.sum(-1).long())
    assert count.sum(1).tolist() == [87] * 3

    # A bottleneck of a 96³ crop (stride 16) pooled by 2 has 27 tokens in a 3×3×3 grid;
    # token t's receptive block is region t. Paint each token's location bits back as
    # 2×2×2 patch cubes (a "patch size" of 1 per patch and 2 per region):
    painted = unpatchify(location, 2, (3, 3, 3), 1)[:, 0]
    assert torch.equal(painted.bool(), mask)

    # Token 0 covers the patches {0, 1, 6, 7, 36, 37, 42, 43} of the flattened grid.
    single = torch.zeros(1, 216, dtype=torch.bool)
    single[0, [0, 1, 6, 7, 36, 37, 42, 43]] = True
    count, location = region_labels(single.view(1, 6, 6, 6))
    assert count[0].tolist() == [8] + [0] * 26
    single = torch.zeros(1, 216, dtype=torch.bool)
    single[0, 1] = True  # offset (0, 0, 1) inside region 0: location bit 1
    count, location = region_labels(single.view(1, 6, 6, 6))
    assert count[0, 0] == 1 and location[0, 0].tolist() == [0, 1, 0, 0, 0, 0, 0, 0]
    single = torch.zeros(1, 216, dtype=torch.bool)
    single[0, 2] = True  # patch (0, 0, 2) is region 1's (0, 0, 0)
    count, location = region_labels(single.view(1, 6, 6, 6))
    assert count[0, :2].tolist() == [0, 1] and location[0, 1, 0] == 1


def test_regions_touching_padding_are_not_complete():
    valid = torch.ones(1, 1, 96, 96, 96)
    valid[..., 80:] = 0  # the last patch column along x is padding
    usable = complete_regions(valid, 16)
    assert usable.shape == (1, 27)
    grid = usable.view(3, 3, 3)
    assert grid[..., :2].all() and not grid[..., 2].any()
    valid[..., 80:] = 1
    valid[..., 95] = 0  # a patch that is only partly padding still holds image
    assert complete_regions(valid, 16).all()


def test_volume_mask_covers_partial_patches_at_the_far_edges():
    mask = volume_patch_mask((40, 33, 20), 16, 0.5, seed=7)
    assert mask.shape == (40, 33, 20)
    assert torch.equal(mask, volume_patch_mask((40, 33, 20), 16, 0.5, seed=7))
    assert not torch.equal(mask, volume_patch_mask((40, 33, 20), 16, 0.5, seed=8))
    # constant within each 16³ patch, including the partial ones
    for z0 in (0, 16, 32):
        for y0 in (0, 16, 32):
            for x0 in (0, 16):
                block = mask[z0:z0 + 16, y0:y0 + 16, x0:x0 + 16]
                assert block.all() or not block.any()
    patches = 3 * 3 * 2
    masked = sum(bool(mask[z, y, x]) for z in (0, 16, 32) for y in (0, 16, 32) for x in (0, 16))
    assert masked == masked_count(patches, 0.5)


# Property-based: the same invariants for every grid, ratio, patch size and seed hypothesis draws.
grids = st.tuples(*[st.integers(1, 4).map(lambda n: 2 * n)] * 3)  # even: whole 2×2×2 regions
ratios = st.floats(0.0, 0.95, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(grids, ratios, st.integers(1, 3), st.integers(0, 2**31))
def test_property_mask_count_and_region_labels_agree_with_the_mask(grid, ratio, batch, seed):
    mask = random_patch_mask(batch, grid, ratio, torch.Generator().manual_seed(seed))
    patches = grid[0] * grid[1] * grid[2]
    assert mask.flatten(1).sum(1).tolist() == [masked_count(patches, ratio)] * batch
    count, location = region_labels(mask)
    assert count.shape == (batch, patches // 8) and location.shape == (batch, patches // 8, 8)
    assert torch.equal(count, location.sum(-1).long()) and int(count.sum()) == int(mask.sum())
    # every location bit is the patch at its (a, b, c) offset in its region
    for r_index in range(patches // 8):
        rz, rest = divmod(r_index, (grid[1] // 2) * (grid[2] // 2))
        ry, rx = divmod(rest, grid[2] // 2)
        cube = mask[:, 2 * rz:2 * rz + 2, 2 * ry:2 * ry + 2, 2 * rx:2 * rx + 2].reshape(batch, 8)
        assert torch.equal(location[:, r_index].bool(), cube)


@settings(max_examples=40, deadline=None)
@given(st.tuples(*[st.integers(1, 3)] * 3), st.sampled_from([1, 2, 4]), st.integers(1, 2), st.integers(0, 2**31))
def test_property_patchify_inverts_and_expanded_masks_are_whole_patches(grid, patch, channels, seed):
    generator = torch.Generator().manual_seed(seed)
    volume = torch.rand(2, channels, *(g * patch for g in grid), generator=generator)
    assert torch.equal(unpatchify(patchify(volume, patch), patch, grid, channels), volume)
    mask = random_patch_mask(2, grid, 0.5, generator)
    rows = patchify(expand_patch_mask(mask, patch).float(), patch)
    assert torch.equal(rows.amin(-1), rows.amax(-1)) and torch.equal(rows[..., 0].bool(), mask.flatten(1))


@settings(max_examples=40, deadline=None)
@given(st.tuples(*[st.integers(1, 40)] * 3), st.sampled_from([4, 8, 16]), ratios, st.integers(0, 2**31))
def test_property_volume_mask_covers_the_volume_and_is_reproducible(shape, patch, ratio, seed):
    mask = volume_patch_mask(shape, patch, ratio, seed)
    assert tuple(mask.shape) == shape
    assert torch.equal(mask, volume_patch_mask(shape, patch, ratio, seed))
    grid = [-(-n // patch) for n in shape]
    chosen = random_patch_mask(1, tuple(grid), ratio, torch.Generator().manual_seed(seed))[0]
    # each voxel carries its patch's choice
    z, y, x = (torch.arange(n) // patch for n in shape)
    assert torch.equal(mask, chosen[z][:, y][:, :, x])
