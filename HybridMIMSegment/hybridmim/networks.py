"""The backbone families, built from MONAI blocks, behind one factory.

Every network has ``encode(x, box=None) -> features`` (skip features first,
the bottleneck last), ``decode(features) -> decoder output``, ``bottleneck(x)``
(the last feature alone, computed as cheaply as the network allows), and an
output layer named by ``head_name``. Pre-training methods call these
separately (HybridMIM decodes only a sub-volume: ``box`` crops the skip
features to it), and fine-tuning transfers every weight except the head.
The hybrid network's ``encode`` also takes a token ``mask``: MiM and
SelfMedHPM hide whole tokens from it, as MAE does.
"""

from __future__ import annotations

import inspect
import json
import warnings

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, TransformerBlock, UpSample
from monai.networks.blocks.pos_embed_utils import build_sincos_position_embedding
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


class HybridUNet(UNet):
    """Convolution stages, then transformer blocks on tokens, with the U-Net decoder: MiM's and SelfMedHPM's backbone.

    ConvMAE-style: ``features`` are convolution stages at strides 1, 2, 4, …
    (default 16, 48, 96, 192 channels at 96³, 48³, 24³, 12³ for a 96³ input —
    MiM's 48/96/192 stages plus a thin full-resolution one the decoder needs
    for voxel outputs); a stride-2 convolution then embeds one token per
    ``token_size``³ voxels (16³ by default: the 6³ tokens of a 96³ crop) for
    ``depth`` transformer blocks with fixed sin-cos positions. The decoder
    upsamples the tokens back through every convolution stage, so encoder
    and decoder both carry over to fine-tuning as for the U-Net.

    With a token ``mask`` (True = hidden) the encoder is MAE's: the masked
    patches are zeroed, every convolution stage's output is zeroed there too
    (masked convolution: no visible feature draws on a hidden voxel, however
    wide its receptive field), and the transformer's keys exclude the hidden
    tokens, which is what dropping them does to the visible ones while
    allowing a different count per sample. The hidden tokens then become a
    learnt mask token (plus position) for the decoder to fill in.
    """

    def __init__(self, in_channels: int, out_channels: int, features=(16, 48, 96, 192), embed_dim: int = 384,
                 depth: int = 4, num_heads: int = 6, mlp_ratio: float = 4.0, dropout: float = 0.0):
        super().__init__(in_channels, out_channels, features, dropout)
        if embed_dim % 6 or embed_dim % num_heads:
            raise UserError(f"hybrid network: embed_dim {embed_dim} must divide by 6 (3-D sin-cos positions) "
                            f"and by num_heads {num_heads}")
        self.embed = nn.Conv3d(self.bottleneck_channels, embed_dim, kernel_size=2, stride=2)
        self.blocks = nn.ModuleList(TransformerBlock(embed_dim, int(mlp_ratio * embed_dim), num_heads, dropout,
                                                     qkv_bias=True) for _ in range(depth))
        for block in self.blocks:  # MONAI builds this norm even without cross-attention; an unused
            block.norm_cross_attn = nn.Identity()  # parameter would leave DDP waiting for its gradient
        self.norm = nn.LayerNorm(embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(embed_dim))
        self.ups.insert(0, _Up(embed_dim, self.bottleneck_channels, dropout))
        self.bottleneck_stride *= 2
        self.bottleneck_channels = embed_dim
        self.token_size = self.bottleneck_stride
        self._position_tables: dict[tuple, torch.Tensor] = {}

    def encode(self, x: torch.Tensor, box: Box | None = None, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """``mask``: (B, gz, gy, gx) booleans over the token grid, True = hidden from the encoder."""
        visible = None if mask is None else (~mask.to(x.device))[:, None].to(x.dtype)

        def hide(feature: torch.Tensor) -> torch.Tensor:
            if visible is None:
                return feature
            return feature * F.interpolate(visible, size=feature.shape[2:], mode="nearest").to(feature.dtype)

        features = [hide(self.stem(hide(x)))]
        for down in self.downs:
            features.append(hide(down(features[-1])))
        tokens = self.embed(features[-1])
        grid = tokens.shape[2:]
        tokens = tokens.flatten(2).transpose(1, 2) + self._positions(grid, tokens)
        keys = None if mask is None else visible.flatten(1)
        for block in self.blocks:
            tokens = block(tokens, attn_mask=keys)
        tokens = self.norm(tokens)
        if mask is not None:  # hidden tokens: the mask token at their position, for the decoder to fill in
            hidden = mask.to(x.device).flatten(1)[..., None]
            tokens = torch.where(hidden, self.mask_token.to(tokens.dtype) + self._positions(grid, tokens), tokens)
        features.append(tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *grid))
        if box is not None:
            features[:-1] = [crop_to_box(f, box, x.shape[2:]) for f in features[:-1]]
        return features

    def bottleneck(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode(x)[-1]

    def _positions(self, grid, like: torch.Tensor) -> torch.Tensor:
        """(1, L, embed_dim) fixed sin-cos positions of a token grid (any size: windows and crops alike)."""
        key = tuple(grid)
        if key not in self._position_tables:
            with warnings.catch_warnings():  # MONAI's meshgrid call predates the indexing argument
                warnings.simplefilter("ignore", UserWarning)
                table = build_sincos_position_embedding(list(grid), self.bottleneck_channels, spatial_dims=3)
            self._position_tables[key] = table.data
        return self._position_tables[key].to(like.device, like.dtype)


ARCHITECTURES = {"unet": UNet, "swinunetr": SwinUNETRBackbone, "hybrid": HybridUNet}


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
    try:
        return cls(**spec)
    except (TypeError, ValueError) as exc:  # a value of the wrong kind: features "big", or ["32", "a"]
        raise UserError(f"network {name!r}: bad settings {json.dumps(spec, default=str)} ({exc})") from None
