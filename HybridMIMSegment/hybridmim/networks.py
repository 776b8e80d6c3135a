"""The two backbone families, built from MONAI, behind one factory.

Every network has ``encode(x, box=None) -> features`` (skip features first,
the bottleneck last), ``decode(features) -> decoder output``, ``bottleneck(x)``
(the last feature alone, computed as cheaply as the network allows), and an
output layer named by ``head_name``. Pre-training methods call these
separately (HybridMIM decodes only a sub-volume: ``box`` crops the skip
features to it), and fine-tuning transfers every weight except the head.
"""

from __future__ import annotations

import inspect

import torch
from monai.networks.blocks import Convolution, UpSample
from monai.networks.nets import SwinUNETR
from torch import nn

from .errors import UserError

_ACT = ("LeakyReLU", {"negative_slope": 0.1, "inplace": True})
_NORM = ("instance", {"affine": True})


Box = tuple[tuple[int, int, int], tuple[int, int, int]]  # (start, size) in input voxels, (z, y, x)


def crop_to_box(feature: torch.Tensor, box: Box, input_shape) -> torch.Tensor:
    """The part of ``feature`` (at its own stride) that covers ``box`` of an input of ``input_shape``."""
    (start, size) = box
    slices = []
    for axis in range(3):
        stride = input_shape[axis] // feature.shape[2 + axis]
        if start[axis] % stride or size[axis] % stride:
            raise ValueError(f"box {box} is not aligned with a stride-{stride} feature")
        slices.append(slice(start[axis] // stride, (start[axis] + size[axis]) // stride))
    return feature[(..., *slices)]


class _TwoConv(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(
            Convolution(3, in_channels, out_channels, act=_ACT, norm=_NORM, dropout=dropout, padding=1),
            Convolution(3, out_channels, out_channels, act=_ACT, norm=_NORM, dropout=dropout, padding=1),
        )


class _Down(nn.Sequential):
    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(nn.MaxPool3d(2), _TwoConv(in_channels, out_channels, dropout))


class _Up(nn.Module):
    def __init__(self, in_channels: int, skip_channels: int, dropout: float):
        super().__init__()
        self.up = UpSample(3, in_channels, skip_channels, scale_factor=2, mode="deconv")
        self.convs = _TwoConv(2 * skip_channels, skip_channels, dropout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.convs(torch.cat([skip, self.up(x)], dim=1))


class UNet(nn.Module):
    """HybridMIM's CNN backbone: a U-Net with InstanceNorm and LeakyReLU.

    ``features[0]`` channels at full resolution, then one max-pool stage per
    further entry; the bottleneck has ``features[-1]`` channels at stride
    ``2 ** (len(features) - 1)``.
    """

    head_name = "head"

    def __init__(self, in_channels: int, out_channels: int, features=(32, 32, 64, 128, 256), dropout: float = 0.0):
        super().__init__()
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise UserError("unet needs at least two feature sizes")
        self.stem = _TwoConv(in_channels, features[0], dropout)
        self.downs = nn.ModuleList(_Down(a, b, dropout) for a, b in zip(features[:-1], features[1:]))
        self.ups = nn.ModuleList(_Up(b, a, dropout) for a, b in reversed(list(zip(features[:-1], features[1:]))))
        self.head = nn.Conv3d(features[0], out_channels, kernel_size=1)
        self.out_channels = out_channels
        self.bottleneck_stride = 2 ** (len(features) - 1)
        self.bottleneck_channels = features[-1]

    def encode(self, x: torch.Tensor, box: Box | None = None) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for down in self.downs:
            features.append(down(features[-1]))
        if box is not None:  # the skips are stages of the encoder itself: computed whole, then cropped
            features[:-1] = [crop_to_box(f, box, x.shape[2:]) for f in features[:-1]]
        return features

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for down in self.downs:
            x = down(x)
        return x

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for up, skip in zip(self.ups, reversed(features[:-1])):
            x = up(x, skip)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(self.encode(x)))


class SwinUNETRBackbone(SwinUNETR):
    """MONAI's SwinUNETR with its forward split into encode/decode.

    A subclass rather than a wrapper so the state-dict keys stay MONAI's (and
    the official HybridMIM Swin weights load by name). The bottleneck is the
    last Swin stage: 768 channels at stride 32 with feature_size 48, i.e. the
    27 region tokens of a 96³ crop.
    """

    head_name = "out"
    bottleneck_stride = 32

    def __init__(self, in_channels: int, out_channels: int, feature_size: int = 48, drop_rate: float = 0.0,
                 depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24), use_v2: bool = False):
        super().__init__(in_channels=in_channels, out_channels=out_channels, feature_size=feature_size,
                         drop_rate=drop_rate, depths=tuple(depths), num_heads=tuple(num_heads), use_v2=use_v2)
        self.out_channels = out_channels
        self.bottleneck_channels = 16 * feature_size

    def encode(self, x: torch.Tensor, box: Box | None = None) -> list[torch.Tensor]:
        hidden = self.swinViT(x, self.normalize)
        skips_in = [x, *hidden[:4]]
        if box is not None:  # skip blocks are side branches: run them on the box alone
            skips_in = [crop_to_box(f, box, x.shape[2:]) for f in skips_in]
        return [self.encoder1(skips_in[0]), self.encoder2(skips_in[1]), self.encoder3(skips_in[2]),
                self.encoder4(skips_in[3]), skips_in[4], hidden[4]]

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.swinViT(x, self.normalize)[4]

    def decode(self, features: list[torch.Tensor]) -> torch.Tensor:
        enc0, enc1, enc2, enc3, hidden3, bottleneck = features
        x = self.decoder5(self.encoder10(bottleneck), hidden3)
        x = self.decoder4(x, enc3)
        x = self.decoder3(x, enc2)
        x = self.decoder2(x, enc1)
        return self.decoder1(x, enc0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.decode(self.encode(x)))


ARCHITECTURES = {"unet": UNet, "swinunetr": SwinUNETRBackbone}


def build_network(spec: dict) -> nn.Module:
    """A network from its checkpoint description ``{"name", "in_channels", "out_channels", ...}``."""
    spec = dict(spec)
    name = spec.pop("name", None)
    if name not in ARCHITECTURES:
        raise UserError(f"unknown network {name!r} (known: {', '.join(ARCHITECTURES)})")
    cls = ARCHITECTURES[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    unknown = set(spec) - accepted
    missing = {"in_channels", "out_channels"} - set(spec)
    if unknown or missing:
        raise UserError(f"network {name!r}: unknown parameters {sorted(unknown)}, missing {sorted(missing)}")
    return cls(**spec)
