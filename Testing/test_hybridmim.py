"""HybridMIM's loss terms on hand-checkable inputs, token order, and weight transfer to segmentation."""

from __future__ import annotations

import math

import pytest
import torch

from hybridmim.errors import UserError
from hybridmim.masking import expand_patch_mask, random_patch_mask
from hybridmim.networks import build_network
from hybridmim.pretraining.hybridmim import HybridMIM

TINY_UNET = {"name": "unet", "in_channels": 1, "out_channels": 1, "features": [4, 8, 8, 16]}  # stride 8
PATCH = 8  # regions of 16³, crops of 48³


def tiny_method(**kwargs) -> HybridMIM:
    torch.manual_seed(0)
    return HybridMIM(build_network(TINY_UNET), patch_size=PATCH, **kwargs)


def zero_(*layers) -> None:
    with torch.no_grad():
        for layer in layers:
            layer.weight.zero_()
            layer.bias.zero_()


def test_loss_terms_with_zeroed_heads_equal_their_hand_values():
    method = tiny_method().eval()
    zero_(method.network.head, method.count_head, method.location_head)
    generator = torch.Generator().manual_seed(0)
    image = torch.rand(2, 1, 48, 48, 48, generator=generator) * 0.9 + 0.05
    valid = torch.ones(2, 1, 48, 48, 48)
    valid[1, :, :, :, 40:] = 0  # the second crop's last patch column is padding
    image = image * valid
    choices = method.sample(2, generator)
    block_start = (16, 0, 16)

    with torch.no_grad():
        total, terms = method(image, valid, choices["mask"], block_start)

    # A zeroed output layer reconstructs 0.5 everywhere: pixel loss = mean (0.5 - x)² over the
    # masked, non-padding voxels of the decoded block (32³ at block_start) only.
    voxel_mask = expand_patch_mask(choices["mask"], PATCH).float() * valid
    block = (..., slice(16, 48), slice(0, 32), slice(16, 48))
    scored = voxel_mask[block]
    expected_pixel = (((0.5 - image[block]) ** 2) * scored).sum() / scored.sum()
    assert float(terms["pixel"]) == pytest.approx(float(expected_pixel), rel=1e-5)
    # Zero logits: 9-way count CE is log 9, each location bit's BCE log 2; the location head
    # then implies a count of 0 (sigmoid 0.5 is not above 0.5), again log 9 for consistency.
    assert float(terms["count"]) == pytest.approx(math.log(9), rel=1e-6)
    assert float(terms["location"]) == pytest.approx(math.log(2), rel=1e-6)
    assert float(terms["consistency"]) == pytest.approx(math.log(9), rel=1e-6)
    weights = method.loss_weights
    assert float(total) == pytest.approx(sum(weights[k] * float(v) for k, v in terms.items()), rel=1e-5)


def test_count_and_location_targets_of_a_known_mask():
    """All eight patches of region 0 masked and nothing else: trained heads must find exactly that."""
    method = tiny_method().eval()
    mask = torch.zeros(1, 6, 6, 6, dtype=torch.bool)
    mask[0, :2, :2, :2] = True
    image = torch.full((1, 1, 48, 48, 48), 0.5)
    valid = torch.ones_like(image)
    with torch.no_grad():
        tokens = method.region_tokens(method.network.bottleneck(image * (1 - expand_patch_mask(mask, PATCH).float())))
        # Heads that read nothing but say "8, all bits" for region 0 and "0, none" elsewhere:
        zero_(method.count_head, method.location_head)
    logits_for = torch.full((27, 9), -20.0)
    logits_for[0, 8] = logits_for[1:, 0] = 20.0
    bits_for = torch.full((27, 8), -20.0)
    bits_for[0] = 20.0
    method.count_head.forward = lambda t: logits_for.expand(t.shape[0], 27, 9)
    method.location_head.forward = lambda t: bits_for.expand(t.shape[0], 27, 8)
    with torch.no_grad():
        _, terms = method(image, valid, mask, (0, 0, 0))
    assert tokens.shape == (1, 27, 16)
    assert float(terms["count"]) < 1e-6 and float(terms["location"]) < 1e-6 and float(terms["consistency"]) < 1e-6
    bits_for[0, 3] = -20.0  # one patch said visible: location and consistency (7 ≠ 8) must notice
    with torch.no_grad():
        _, terms = method(image, valid, mask, (0, 0, 0))
    assert float(terms["location"]) == pytest.approx(20 / (27 * 8), rel=1e-3)
    assert float(terms["consistency"]) == pytest.approx(40 / 27, rel=1e-3)


def test_region_tokens_follow_the_row_major_region_grid():
    method = tiny_method()
    bottleneck = torch.zeros(1, 16, 6, 6, 6)  # 48³ crop at stride 8
    for z in range(6):
        for y in range(6):
            for x in range(6):
                bottleneck[0, 0, z, y, x] = (z // 2) * 9 + (y // 2) * 3 + x // 2
    tokens = method.region_tokens(bottleneck)
    assert tokens.shape == (1, 27, 16)
    assert tokens[0, :, 0].tolist() == list(range(27))


def test_contrastive_term_is_nt_xent_and_zero_for_identical_single_pairs():
    method = tiny_method(temperature=0.5).eval()  # eval: both passes identical
    image = torch.rand(2, 1, 48, 48, 48, generator=torch.Generator().manual_seed(4))
    valid = torch.ones_like(image)
    mask = random_patch_mask(2, (6, 6, 6), 0.4, torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, single = method(image[:1], valid[:1], mask[:1], (0, 0, 0))
        _, pair = method(image, valid, mask, (0, 0, 0))
        masked = image * (1 - expand_patch_mask(mask, PATCH).float())
        tokens = method.region_tokens(method.network.bottleneck(masked))
        z = torch.nn.functional.normalize(method.projection(tokens.mean(1)), dim=1)
    assert float(single["contrast"]) == pytest.approx(0.0, abs=1e-6)
    # NT-Xent by hand for identical views a, b of two samples: positives have similarity 1.
    s = float(z[0] @ z[1]) / 0.5
    positive = 1 / 0.5
    expected = -math.log(math.exp(positive) / (math.exp(positive) + 2 * math.exp(s)))
    assert float(pair["contrast"]) == pytest.approx(expected, rel=1e-4)
    # In training mode dropout makes the two passes differ, and the term is positive.
    method = HybridMIM(build_network({**TINY_UNET, "dropout": 0.3}), patch_size=PATCH).train()
    _, terms = method(image, valid, mask, (0, 0, 0))
    assert float(terms["contrast"]) > 0


def test_every_region_touching_padding_leaves_the_region_terms_at_zero():
    method = tiny_method()
    image = torch.rand(1, 1, 48, 48, 48)
    valid = torch.zeros_like(image)
    valid[..., :8, :8, :8] = 1  # only one patch of image
    mask = random_patch_mask(1, (6, 6, 6), 0.4, torch.Generator().manual_seed(0))
    total, terms = method(image * valid, valid, mask, (0, 0, 0))
    assert float(terms["count"]) == float(terms["location"]) == float(terms["consistency"]) == 0.0
    total.backward()  # still a graph: DDP needs every parameter used


@pytest.mark.parametrize("spec", [
    {"name": "unet", "features": [4, 8, 8, 16]},
    {"name": "swinunetr", "feature_size": 12, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]},
], ids=["cnn", "swin"])
def test_pretrained_weights_map_one_to_one_onto_the_segmentation_network(spec):
    pretraining = build_network({**spec, "in_channels": 1, "out_channels": 1})
    segmentation = build_network({**spec, "in_channels": 1, "out_channels": 14})
    head = segmentation.head_name + "."
    ours, theirs = pretraining.state_dict(), segmentation.state_dict()
    assert set(ours) == set(theirs)
    differing = {k for k in ours if ours[k].shape != theirs[k].shape}
    assert differing and all(k.startswith(head) for k in differing)
    transferable = {k: v for k, v in ours.items() if not k.startswith(head)}
    result = segmentation.load_state_dict(transferable, strict=False)
    assert sorted(result.missing_keys) == sorted(k for k in theirs if k.startswith(head))
    # the pre-training heads live on the method, not in the network that is saved
    method = HybridMIM(pretraining, patch_size=16)
    assert set(method.network.state_dict()) == set(ours)
    assert {"count_head.weight", "location_head.weight", "projection.weight"} <= set(method.state_dict())


def test_swin_backbone_takes_a_training_step():
    torch.manual_seed(0)
    network = build_network({"name": "swinunetr", "in_channels": 1, "out_channels": 1, "feature_size": 12,
                             "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4]})
    method = HybridMIM(network)
    assert method.crop_size == 96 and method.token_pool == 1
    image = torch.rand(2, 1, 96, 96, 96, generator=torch.Generator().manual_seed(0))
    choices = method.sample(2, torch.Generator().manual_seed(1))
    loss, terms = method(image, torch.ones_like(image), **choices)
    loss.backward()
    assert set(terms) == {"pixel", "count", "location", "consistency", "contrast"}
    assert network.swinViT.patch_embed.proj.weight.grad.abs().sum() > 0
    assert network.out.conv.conv.weight.grad.abs().sum() > 0


def test_settings_are_checked():
    with pytest.raises(UserError, match="unknown HybridMIM loss terms"):
        tiny_method(loss_weights={"pixle": 1.0})
    with pytest.raises(UserError, match="decoder_regions"):
        tiny_method(decoder_regions=1)
    with pytest.raises(UserError, match="bottleneck cells"):
        HybridMIM(build_network(TINY_UNET), patch_size=4 + 2)  # regions of 12 voxels on a stride-8 bottleneck
    method = tiny_method(loss_weights={"contrast": 0.0})
    assert method.loss_weights == {"pixel": 1.0, "count": 0.1, "location": 0.1, "consistency": 0.01, "contrast": 0.0}
