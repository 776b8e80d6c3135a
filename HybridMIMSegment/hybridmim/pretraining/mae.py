"""What MiM and SelfMedHPM share with MAE: the pass with hidden tokens and the per-token loss.

Targets are per-patch normalised (each patch minus its mean, over its standard
deviation: MAE's norm_pix_loss), so the loss scores structure, not brightness.
A token is scored only when its patch lies wholly inside the image: a patch of
padding has no structure to rebuild.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..masking import patchify, unpatchify

EPSILON = 1e-6  # MAE's: keeps flat patches (air) finite after normalisation


def check_token_network(network, patch_size: int, method: str) -> None:
    """Refuse a backbone that cannot hide tokens, or whose tokens are not the method's patches."""
    if getattr(network, "token_size", None) != patch_size:
        raise UserError(f"{method} pre-trains the 'hybrid' network with tokens of the patch size "
                        f"({patch_size}³ voxels); this network has {getattr(network, 'token_size', 'no')} tokens")


def _patch_statistics(patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + EPSILON).sqrt()


def token_losses(prediction: torch.Tensor, image: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L): each token's mean squared error against its normalised patch of ``image``."""
    target = patchify(image.float(), patch_size)
    mean, std = _patch_statistics(target)
    return ((patchify(prediction.float(), patch_size) - (target - mean) / std) ** 2).mean(-1)


def denormalise(prediction: torch.Tensor, truth: torch.Tensor, patch_size: int) -> torch.Tensor:
    """A prediction of normalised patches in image units, with each patch's mean and spread taken from
    ``truth`` (as MAE's own visualisations do: the model predicts structure, not level)."""
    mean, std = _patch_statistics(patchify(truth.float(), patch_size))
    grid = tuple(n // patch_size for n in truth.shape[2:])
    return unpatchify(patchify(prediction.float(), patch_size) * std + mean, patch_size, grid, truth.shape[1])


def complete_tokens(valid: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, L) booleans from the (B, 1, D, H, W) image mask: tokens without a voxel of padding."""
    return (F.avg_pool3d(valid.float(), patch_size) > 1 - EPSILON).flatten(1)


def masked_token_mean(losses: torch.Tensor, mask: torch.Tensor, usable: torch.Tensor) -> torch.Tensor:
    """Mean of ``losses`` over tokens both masked and usable ((B, L) each); 0, with a graph, when none is."""
    scored = (mask.flatten(1) & usable).to(losses.dtype)
    count = scored.sum()
    return (losses * scored).sum() / count if count > 0 else losses.sum() * 0


def hidden_pass(network, image: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The network on ``image`` with ``mask``'s tokens hidden: (output (B, C, ...), last decoder feature)."""
    decoded = network.decode(network.encode(image, mask=mask))
    return getattr(network, network.head_name)(decoded), decoded


def mlp(inputs: int, hidden: int, outputs: int) -> nn.Sequential:
    """The small heads of MiM and SelfMedHPM: linear, GELU, linear."""
    return nn.Sequential(nn.Linear(inputs, hidden), nn.GELU(), nn.Linear(hidden, outputs))


class TokenMaskedFill(nn.Module):
    """For ``hybridmim reconstruct``: a window function over (masked image, voxel mask, truth) channels.

    The network is told which tokens are hidden, as in its pre-training, and its
    normalised patches are put in image units with each patch's mean and spread
    taken from the truth (MAE's own display): the windows carry mask and truth
    as extra channels so that sliding-window inference cuts all three alike.
    """

    def __init__(self, network: nn.Module, patch_size: int):
        super().__init__()
        self.network = network
        self.patch_size = patch_size
        self.out_channels = network.out_channels

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        channels = self.out_channels
        image, voxel_mask = windows[:, :channels], windows[:, channels:channels + 1]
        hidden = F.max_pool3d(voxel_mask.float(), self.patch_size)[:, 0] > 0.5
        output, _ = hidden_pass(self.network, image, hidden)
        return denormalise(output, windows[:, channels + 1:], self.patch_size)
