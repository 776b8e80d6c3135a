"""MiM — Mask in Mask (Zhuang et al., TMI 2025): masked image modelling at three nested levels.

From a crop of twice the volume size (192³ for 96³ volumes):
1. coarse — the crop resized to 96³; 4 of its 8 octants (each a 3×3×3 cube
   of 16³ tokens) are hidden as groups;
2. middle — each hidden octant at native resolution (96³), 60% of its tokens hidden;
3. fine — from each middle volume, 4 of its hidden patches upsampled to 96³,
   half their tokens hidden.
One encoder-decoder rebuilds every volume (MAE loss, weights 1/1/1). Each finer
volume's mean decoder feature is aligned with its parent's decoder feature
pooled over the region the finer volume came from (BYOL-style: 2 − 2·cos of a
projected and predicted child against the projected, stop-gradient parent;
weight 0.1 per pair of adjacent levels).

Departures from the official code (JiaxinZhuang/MiM), on purpose:
- an octant is the 3×3×3 cube of tokens (masking.octant_token_mask); the
  official took 27 consecutive flattened token indices, so its middle volumes
  were not the regions hidden at the coarse level;
- the coarse level's feature enters the coarse↔middle alignment; the official
  computed it and never used it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..errors import UserError
from ..masking import (check_mask_ratio, masked_count, octant_token_mask, patch_cubes, patch_means, patchify,
                       random_patch_mask)
from .mae import check_token_network, complete_tokens, hidden_pass, masked_token_mean, mlp, token_losses

LEVELS = ("coarse", "middle", "fine")
ALIGNMENTS = ("align_coarse_middle", "align_middle_fine")
OFFICIAL_LOSS_WEIGHTS = {"coarse": 1.0, "middle": 1.0, "fine": 1.0, "align_coarse_middle": 0.1,
                         "align_middle_fine": 0.1}


def octant_volumes(volume: torch.Tensor, octants: torch.Tensor) -> torch.Tensor:
    """(B, C, 2S, 2S, 2S) and (B, 2, 2, 2) booleans → (N, C, S, S, S): the chosen octants at native
    resolution, crop by crop, each crop's in row-major octant order."""
    size = volume.shape[2] // 2
    return patch_cubes(patchify(volume, size)[octants.flatten(1)], size, volume.shape[1])


def patch_volumes(volumes: torch.Tensor, tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(N, C, S, S, S) and (N, k) token indices → (N·k, C, S, S, S): those patches upsampled to the volume size."""
    patches = patchify(volumes, patch_size)
    picked = patches.gather(1, tokens[..., None].expand(-1, -1, patches.shape[-1])).flatten(0, 1)
    cubes = patch_cubes(picked, patch_size, volumes.shape[1])
    return F.interpolate(cubes, size=volumes.shape[2:], mode="trilinear", align_corners=False)


class MiM(nn.Module):
    """The pre-training model around the hybrid network (networks.HybridUNet, tokens = patches)."""

    name = "mim"

    def __init__(self, network: nn.Module, patch_size: int = 16, volume_size: int = 96, octant_ratio: float = 0.5,
                 middle_ratio: float = 0.6, fine_ratio: float = 0.5, fine_per_volume: int = 4,
                 projection_dim: int = 256, hidden_dim: int = 1024, loss_weights: dict | None = None,
                 recompute: int = 0):
        super().__init__()
        check_token_network(network, patch_size, "MiM")
        if volume_size % (2 * patch_size):
            raise UserError(f"MiM: volume_size {volume_size} must be an even number of {patch_size}-voxel patches "
                            "(octants are whole tokens)")
        unknown = set(loss_weights or {}) - set(OFFICIAL_LOSS_WEIGHTS)
        if unknown:
            raise UserError(f"unknown MiM loss terms {sorted(unknown)} (known: {', '.join(OFFICIAL_LOSS_WEIGHTS)})")
        for name, ratio in (("octant_ratio", octant_ratio), ("middle_ratio", middle_ratio), ("fine_ratio", fine_ratio)):
            check_mask_ratio(ratio, name)
        self.grid = volume_size // patch_size
        if not 1 <= fine_per_volume <= masked_count(self.grid ** 3, middle_ratio):
            raise UserError(f"MiM: fine_per_volume must be between 1 and the middle level's hidden tokens "
                            f"({masked_count(self.grid ** 3, middle_ratio)}), got {fine_per_volume}")
        if masked_count(8, octant_ratio) < 1:
            raise UserError(f"MiM: octant_ratio {octant_ratio} hides no octant")
        if recompute < 0:
            raise UserError(f"MiM: recompute must be 0 (off) or a number of volumes, got {recompute}")
        self.network = network
        self.patch_size = patch_size
        self.volume_size = volume_size
        self.window_size = volume_size  # what the network sees at every level, and so at inference
        self.crop_size = 2 * volume_size
        self.octant_ratio, self.middle_ratio, self.fine_ratio = octant_ratio, middle_ratio, fine_ratio
        self.fine_per_volume = fine_per_volume
        # A crop makes 1 + 4 + 16 volumes for one graph: with ``recompute`` = n, the network's
        # activations are kept for n volumes at a time and recomputed in the backward pass
        # (one more forward pass of each volume for a fraction of the memory).
        self.recompute = recompute
        self.loss_weights = {**OFFICIAL_LOSS_WEIGHTS, **(loss_weights or {})}
        channels = getattr(network, network.head_name).in_channels
        self.projector = mlp(channels, hidden_dim, projection_dim)
        self.predictor = mlp(projection_dim, hidden_dim, projection_dim)

    def settings(self) -> dict:
        """What a checkpoint records (``reconstruct`` reads patch size, mask ratio and masking)."""
        return {"method": self.name, "patch_size": self.patch_size, "mask_ratio": self.middle_ratio,
                "masking": "tokens", "target": "normalised patches", "crop_size": self.crop_size,
                "volume_size": self.volume_size, "octant_ratio": self.octant_ratio,
                "middle_ratio": self.middle_ratio, "fine_ratio": self.fine_ratio,
                "fine_per_volume": self.fine_per_volume, "loss_weights": self.loss_weights}

    def sample(self, batch: int, generator: torch.Generator, progress: float = 1.0) -> dict:
        """One step's random choices at every level (MiM's masks do not change over training: ``progress`` unused)."""
        grid = (self.grid,) * 3
        octants = random_patch_mask(batch, (2, 2, 2), self.octant_ratio, generator)
        middle = random_patch_mask(batch * masked_count(8, self.octant_ratio), grid, self.middle_ratio, generator)
        noise = torch.rand(middle.shape[0], self.grid ** 3, generator=generator).masked_fill(~middle.flatten(1), -1.0)
        fine_tokens = noise.topk(self.fine_per_volume, dim=1).indices  # hidden tokens of each middle volume
        fine = random_patch_mask(fine_tokens.numel(), grid, self.fine_ratio, generator)
        return {"octants": octants, "middle": middle, "fine_tokens": fine_tokens, "fine": fine}

    def levels(self, image: torch.Tensor, valid: torch.Tensor, octants, middle, fine_tokens, fine) -> dict:
        """{level: (volumes, their image masks, their token masks)}; each level's volumes cut from the
        region hidden at the level above."""
        device = image.device
        octants, fine_tokens = octants.to(device), fine_tokens.to(device)
        valid = valid.to(image.dtype)
        middle_image, middle_valid = octant_volumes(image, octants), octant_volumes(valid, octants)
        return {
            "coarse": (F.avg_pool3d(image, 2), F.avg_pool3d(valid, 2), octant_token_mask(octants, self.grid)),
            "middle": (middle_image, middle_valid, middle.to(device)),
            "fine": (patch_volumes(middle_image, fine_tokens, self.patch_size),
                     patch_volumes(middle_valid, fine_tokens, self.patch_size), fine.to(device)),
        }

    def alignment(self, decoded: dict, octants: torch.Tensor, fine_tokens: torch.Tensor) -> dict:
        """The two cross-level terms from each level's last decoder feature (B·, C, S, S, S)."""
        coarse_octants = patch_means(decoded["coarse"].float(), self.volume_size // 2)
        middle_parents = coarse_octants[octants.to(coarse_octants.device).flatten(1)]
        middle_tokens = patch_means(decoded["middle"].float(), self.patch_size)
        index = fine_tokens.to(middle_tokens.device)[..., None].expand(-1, -1, middle_tokens.shape[-1])
        fine_parents = middle_tokens.gather(1, index).flatten(0, 1)
        return {"align_coarse_middle": self._byol(decoded["middle"], middle_parents),
                "align_middle_fine": self._byol(decoded["fine"], fine_parents)}

    def _pass(self, volumes: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.recompute or not torch.is_grad_enabled():
            return hidden_pass(self.network, volumes, mask)
        parts = [checkpoint(hidden_pass, self.network, chunk, chunk_mask, use_reentrant=False)
                 for chunk, chunk_mask in zip(volumes.split(self.recompute), mask.split(self.recompute))]
        return torch.cat([output for output, _ in parts]), torch.cat([decoded for _, decoded in parts])

    def _byol(self, child_feature: torch.Tensor, parent: torch.Tensor) -> torch.Tensor:
        online = self.predictor(self.projector(child_feature.float().mean((2, 3, 4))))
        target = self.projector(parent).detach()  # stop-gradient: the parent is the reference, not a learner here
        return (2 - 2 * F.cosine_similarity(online, target, dim=-1)).mean()

    def forward(self, image: torch.Tensor, valid: torch.Tensor, octants, middle, fine_tokens, fine):
        """``image`` (B, C, 2S, 2S, 2S), zero where ``valid`` (B, 1, ...) is 0 (padding).

        Returns (weighted total loss, each unweighted term detached).
        """
        terms, decoded = {}, {}
        levels = self.levels(image, valid, octants, middle, fine_tokens, fine)
        for name, (volumes, volume_valid, mask) in levels.items():
            output, decoded[name] = self._pass(volumes, mask)
            losses = token_losses(output, volumes, self.patch_size)
            terms[name] = masked_token_mean(losses, mask, complete_tokens(volume_valid, self.patch_size))
        terms.update(self.alignment(decoded, octants, fine_tokens))
        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
