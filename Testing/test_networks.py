"""The backbone factory: shapes, encode/decode split, bottleneck, errors."""

from __future__ import annotations

import pytest
import torch

from hybridmim.errors import UserError
from hybridmim.networks import build_network


def test_unet_encode_decode_equals_forward_and_exposes_bottleneck():
    torch.manual_seed(0)
    net = build_network({"name": "unet", "in_channels": 2, "out_channels": 3, "features": [4, 8, 8, 16]}).eval()
    x = torch.randn(1, 2, 32, 32, 32)
    features = net.encode(x)
    assert [f.shape[1] for f in features] == [4, 8, 8, 16]
    assert features[-1].shape[2:] == (32 // net.bottleneck_stride,) * 3 == (4, 4, 4)
    assert net.bottleneck_channels == 16
    with torch.no_grad():
        torch.testing.assert_close(net(x), getattr(net, net.head_name)(net.decode(features)))
    assert net(x).shape == (1, 3, 32, 32, 32)


def test_unet_decoder_runs_on_a_cropped_sub_volume():
    """HybridMIM decodes only a block of regions: cropped skips must be accepted."""
    net = build_network({"name": "unet", "in_channels": 1, "out_channels": 1, "features": [4, 8, 8]}).eval()
    features = net.encode(torch.randn(1, 1, 32, 32, 32))
    cropped = [f[..., : f.shape[-3] // 2, : f.shape[-2] // 2, : f.shape[-1] // 2] for f in features]
    assert net.decode(cropped).shape == (1, 4, 16, 16, 16)


def test_swinunetr_bottleneck_is_the_27_region_tokens_of_a_96_crop():
    net = build_network({"name": "swinunetr", "in_channels": 1, "out_channels": 2, "feature_size": 12,
                         "depths": [1, 1, 1, 1]}).eval()
    with torch.no_grad():
        features = net.encode(torch.randn(1, 1, 96, 96, 96))
        assert features[-1].shape == (1, 16 * 12, 3, 3, 3)
        assert net.bottleneck_channels == 192
        assert getattr(net, net.head_name)(net.decode(features)).shape == (1, 2, 96, 96, 96)
    # Keys are MONAI's own, so official SwinUNETR weights load by name.
    assert any(k.startswith("swinViT.") for k in net.state_dict())


@pytest.mark.parametrize("spec, message", [
    ({"name": "vnet", "in_channels": 1, "out_channels": 2}, "unknown network"),
    ({"name": "unet", "in_channels": 1, "out_channels": 2, "depth": 3}, "unknown parameters"),
    ({"name": "unet", "out_channels": 2}, "missing"),
])
def test_factory_refuses_bad_descriptions(spec, message):
    with pytest.raises(UserError, match=message):
        build_network(spec)
