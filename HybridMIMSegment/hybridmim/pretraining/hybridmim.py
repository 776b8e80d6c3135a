"""HybridMIM (Xing et al., JBHI 2024): masked image modelling at three levels.

1. Pixel — partial region prediction: the encoder sees the whole masked crop;
   the decoder runs only on a block of 2×2×2 regions (64³ of a 96³ crop) with
   skip features cropped to it, and is scored (MSE of sigmoid outputs) on the
   masked voxels there.
2. Region — on each bottleneck region token: how many of its 8 patches are
   masked (9-way), which ones (8 bits), and a consistency term tying the
   count to the thresholded location prediction.
3. Sample — a second encoder pass differing only by dropout, projected and
   contrasted across the batch (NT-Xent, SimCSE-style).

Departures from the official code (ge-xing/HybridMIM), on purpose:
- region labels come from the 3-D patch grid (masking.region_labels);
- the consistency term keeps only its cross-entropy half: its MSE half
  compared two non-differentiable counts and carried no gradient;
- padding is neither scored by the pixel loss nor given region targets;
- the decoded block is drawn at random among the 8 possible positions (the
  official decodes the fixed corner [32:96]³ of each random crop);
- the contrastive feature is the mean of all 27 region tokens (the official
  projected the token at index 1 only). As in the official code, the second
  pass runs without gradient: the first view learns to match it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import ContrastiveLoss
from torch import nn

from ..errors import UserError
from ..masking import (check_mask_ratio, complete_regions, expand_patch_mask, patch_means, random_patch_mask,
                       region_labels)
from ..networks import crop_to_box

REGIONS_PER_AXIS = 3  # 27 region tokens per crop
LOSS_TERMS = ("pixel", "count", "location", "consistency", "contrast")
OFFICIAL_LOSS_WEIGHTS = {"pixel": 1.0, "count": 0.1, "location": 0.1, "consistency": 0.01, "contrast": 0.1}


class HybridMIM(nn.Module):
    """The pre-training model around a backbone from networks.build_network
    (output channels = input channels: the reconstruction head).

    ``decoder_regions``: regions per axis the decoder runs on; 2 is HybridMIM's
    partial region prediction, 3 a full-volume (SimMIM-style) decoder for comparison.
    """

    name = "hybridmim"

    def __init__(self, network: nn.Module, patch_size: int = 16, mask_ratio: float = 0.4, decoder_regions: int = 2,
                 projection_dim: int = 384, temperature: float = 0.5, loss_weights: dict | None = None):
        super().__init__()
        region_size = 2 * patch_size
        if region_size % network.bottleneck_stride:
            raise UserError(f"patch size {patch_size}: a region ({region_size} voxels) must be a whole number of "
                            f"bottleneck cells ({network.bottleneck_stride} voxels)")
        check_mask_ratio(mask_ratio, "mask_ratio")
        if decoder_regions not in (2, 3):
            raise UserError(f"decoder_regions must be 2 (partial) or 3 (full volume), got {decoder_regions}")
        unknown = set(loss_weights or {}) - set(LOSS_TERMS)
        if unknown:
            raise UserError(f"unknown HybridMIM loss terms {sorted(unknown)} (known: {', '.join(LOSS_TERMS)})")
        self.network = network
        self.patch_size = patch_size
        self.region_size = region_size
        self.crop_size = self.window_size = REGIONS_PER_AXIS * region_size
        self.mask_ratio = mask_ratio
        self.decoder_regions = decoder_regions
        self.loss_weights = {**OFFICIAL_LOSS_WEIGHTS, **(loss_weights or {})}
        self.token_pool = region_size // network.bottleneck_stride
        channels = network.bottleneck_channels
        self.count_head = nn.Linear(channels, 9)
        self.location_head = nn.Linear(channels, 8)
        self.projection = nn.Linear(channels, projection_dim)
        self.contrastive = ContrastiveLoss(temperature=temperature)

    def settings(self) -> dict:
        """What a checkpoint records about the pre-training (``reconstruct`` reads patch size and ratio)."""
        return {"method": self.name, "patch_size": self.patch_size, "mask_ratio": self.mask_ratio,
                "crop_size": self.crop_size, "decoder_regions": self.decoder_regions,
                "loss_weights": self.loss_weights}

    def sample(self, batch: int, generator: torch.Generator, progress: float = 1.0) -> dict:
        """One step's random choices: the patch mask and where the decoded block sits (the same at any ``progress``)."""
        grid = (2 * REGIONS_PER_AXIS,) * 3
        mask = random_patch_mask(batch, grid, self.mask_ratio, generator)
        positions = REGIONS_PER_AXIS - self.decoder_regions + 1
        offset = torch.randint(positions, (3,), generator=generator)
        return {"mask": mask, "block_start": tuple(int(o) * self.region_size for o in offset)}

    def region_tokens(self, bottleneck: torch.Tensor) -> torch.Tensor:
        """(B, C, ...) bottleneck → (B, 27, C): one token per region, row-major."""
        return patch_means(bottleneck, self.token_pool)

    def forward(self, image: torch.Tensor, valid: torch.Tensor, mask: torch.Tensor,
                block_start) -> tuple[torch.Tensor, dict]:
        """``image`` (B, C, 96, 96, 96) in (0, 1], zero where ``valid`` (B, 1, ...) is 0 (padding).

        Returns (weighted total loss, each unweighted term detached).
        """
        mask = mask.to(image.device)
        voxel_mask = expand_patch_mask(mask, self.patch_size).to(image.dtype)
        masked = image * (1 - voxel_mask)
        size = self.decoder_regions * self.region_size
        box = (tuple(block_start), (size,) * 3)
        features = self.network.encode(masked, box)
        bottleneck = features[-1]  # whole: the region heads need all 27 tokens
        features[-1] = crop_to_box(bottleneck, box, image.shape[2:])
        block = tuple(slice(s, s + size) for s in block_start)
        head = getattr(self.network, self.network.head_name)
        reconstruction = torch.sigmoid(head(self.network.decode(features)).float())

        scored = voxel_mask[(..., *block)] * valid[(..., *block)]
        squared = (reconstruction - image[(..., *block)].float()) ** 2 * scored
        terms = {"pixel": squared.sum() / (scored.sum() * image.shape[1]).clamp(min=1)}

        tokens = self.region_tokens(bottleneck).float()
        count_target, location_target = region_labels(mask)
        usable = complete_regions(valid, self.patch_size).to(image.device)
        count_logits = self.count_head(tokens)[usable]
        location_logits = self.location_head(tokens)[usable]
        if count_logits.shape[0]:
            count_target = count_target.to(image.device)[usable]
            location_target = location_target.to(image.device)[usable]
            implied_count = (location_logits.detach().sigmoid() > 0.5).sum(-1)
            terms["count"] = F.cross_entropy(count_logits, count_target)
            terms["location"] = F.binary_cross_entropy_with_logits(location_logits, location_target)
            terms["consistency"] = F.cross_entropy(count_logits, implied_count)
        else:  # every region touches padding: nothing to score at this level
            zero = tokens.sum() * 0
            terms.update(count=zero, location=zero, consistency=zero)

        with torch.no_grad():
            second_view = self.network.bottleneck(masked)
        first = self.projection(tokens.mean(1))
        second = self.projection(self.region_tokens(second_view).float().mean(1))
        terms["contrast"] = self.contrastive(first, second)

        total = sum(self.loss_weights[name] * value for name, value in terms.items())
        return total, {name: value.detach() for name, value in terms.items()}
