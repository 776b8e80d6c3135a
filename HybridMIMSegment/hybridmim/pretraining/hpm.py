"""SelfMedHPM: MAE with hard patches mining (Wang et al., HPM, CVPR 2023), self pre-trained on the target data.

The student is an MAE (75% of the 16³ tokens hidden, per-token loss against
normalised patches) with a loss predictor: a small head on its decoder feature
guessing each token's reconstruction loss, trained with a pairwise ranking loss
(binary cross-entropy of σ(p_j − p_i) against [t_j > t_i] over pairs of hidden
tokens, t the actual losses, detached). An EMA teacher (decay 0.999 → 0.9999
over the first half of training, HPM's first 100 of 200 epochs) sees the whole
volume and predicts every token's loss; the hidden set holds the predicted
hardest α·N tokens and random others, α = 0.5·(step + 1)/steps (easy to hard).

"Self pre-training" means the data: the target task's own training cases
(see docs/PRETRAINING.md). Mask selection is one vectorised top-k
(masking.hard_patch_mask); the official code looped per sample in numpy.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from ..masking import check_mask_ratio, hard_patch_mask, masked_count, patch_means
from .mae import check_token_network, complete_tokens, hidden_pass, masked_token_mean, mlp, token_losses


def ranking_loss(predicted: torch.Tensor, actual: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """Pairwise ranking loss over ordered pairs (i ≠ j) of ``scored`` tokens ((B, L) each):
    mean binary cross-entropy of σ(p_j − p_i) against [t_j > t_i]."""
    difference = predicted[:, None, :] - predicted[:, :, None]  # [b, i, j] = p_j − p_i
    target = (actual[:, None, :] > actual[:, :, None]).to(predicted.dtype)
    pairs = scored[:, :, None] & scored[:, None, :]
    pairs &= ~torch.eye(scored.shape[1], dtype=torch.bool, device=scored.device)
    losses = F.binary_cross_entropy_with_logits(difference, target, reduction="none")
    count = pairs.sum()
    return (losses * pairs).sum() / count if count > 0 else predicted.sum() * 0


class HPM(nn.Module):
    """The pre-training model around the hybrid network (networks.HybridUNet, tokens = patches)."""

    name = "hpm"

    def __init__(self, network: nn.Module, patch_size: int = 16, crop_size: int = 96, mask_ratio: float = 0.75,
                 hard_share: float = 0.5, ranking_weight: float = 1.0, ema_decay=(0.999, 0.9999),
                 ema_ramp: float = 0.5, predictor_hidden: int = 256):
        super().__init__()
        check_token_network(network, patch_size, "SelfMedHPM")
        if crop_size % patch_size:
            raise UserError(f"SelfMedHPM: crop_size {crop_size} must be a whole number of {patch_size}-voxel patches")
        check_mask_ratio(mask_ratio, "mask_ratio")
        if not 0.0 <= hard_share <= 1.0 or not 0.0 < ema_ramp <= 1.0:
            raise UserError(f"SelfMedHPM: hard_share must be in [0, 1] and ema_ramp in (0, 1], "
                            f"got {hard_share} and {ema_ramp}")
        self.network = network
        self.patch_size = patch_size
        self.crop_size = self.window_size = crop_size
        self.grid = crop_size // patch_size
        self.mask_ratio = mask_ratio
        self.masked = masked_count(self.grid ** 3, mask_ratio)
        self.hard_share = hard_share
        self.ranking_weight = ranking_weight
        self.ema_decay = tuple(float(d) for d in ema_decay)
        if len(self.ema_decay) != 2 or not all(0.0 <= d < 1.0 for d in self.ema_decay):
            raise UserError(f"SelfMedHPM: ema_decay must be [start, end], each in [0, 1), got {list(ema_decay)}")
        self.ema_ramp = ema_ramp
        channels = getattr(network, network.head_name).in_channels
        self.loss_predictor = mlp(channels, predictor_hidden, 1)
        self.teacher = copy.deepcopy(nn.ModuleDict({"network": network, "loss_predictor": self.loss_predictor}))
        self.teacher.requires_grad_(False)

    def settings(self) -> dict:
        """What a checkpoint records (``reconstruct`` reads patch size, mask ratio and masking)."""
        return {"method": self.name, "patch_size": self.patch_size, "mask_ratio": self.mask_ratio,
                "masking": "tokens", "target": "normalised patches", "crop_size": self.crop_size,
                "hard_share": self.hard_share, "ranking_weight": self.ranking_weight,
                "ema_decay": list(self.ema_decay), "ema_ramp": self.ema_ramp}

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher.eval()  # the teacher only ever predicts
        return self

    def sample(self, batch: int, generator: torch.Generator, progress: float = 1.0) -> dict:
        """One step's random choices; ``progress`` = (step + 1) / steps sets the share of hardest tokens."""
        hard = int(self.hard_share * min(progress, 1.0) * self.masked)
        return {"noise": torch.rand(batch, self.grid ** 3, generator=generator), "hard": hard}

    def _expected_losses(self, predictor: nn.Module, decoded: torch.Tensor) -> torch.Tensor:
        """(B, L) per-token losses a loss predictor expects from a last decoder feature."""
        return predictor(patch_means(decoded.float(), self.patch_size))[..., 0]

    def forward(self, image: torch.Tensor, valid: torch.Tensor, noise: torch.Tensor, hard: int):
        """``image`` (B, C, S, S, S), zero where ``valid`` (B, 1, ...) is 0. Returns (total loss, terms detached)."""
        with torch.no_grad():
            _, seen_whole = hidden_pass(self.teacher["network"], image, None)
            expected = self._expected_losses(self.teacher["loss_predictor"], seen_whole)
        mask = hard_patch_mask(expected, noise.to(image.device), self.masked, int(hard))
        output, decoded = hidden_pass(self.network, image, mask.view(-1, *(self.grid,) * 3))
        actual = token_losses(output, image, self.patch_size)
        predicted = self._expected_losses(self.loss_predictor, decoded)
        usable = complete_tokens(valid, self.patch_size)
        scored = mask & usable
        terms = {"reconstruction": masked_token_mean(actual, mask, usable),
                 "ranking": ranking_loss(predicted, actual.detach(), scored)}
        total = terms["reconstruction"] + self.ranking_weight * terms["ranking"]
        terms["hard_share"] = torch.tensor(int(hard) / self.masked)
        return total, {name: value.detach() for name, value in terms.items()}

    def ema_decay_at(self, step: int, steps: int) -> float:
        """The teacher's decay after ``step`` of ``steps``: linear from the first value to the second over the ramp."""
        start, end = self.ema_decay
        ramp = max(1, round(self.ema_ramp * steps))
        return start + (end - start) * min(step / ramp, 1.0)

    @torch.no_grad()
    def after_step(self, step: int, steps: int) -> None:
        """Move the teacher towards the student (called after each optimiser step)."""
        decay = self.ema_decay_at(step, steps)
        student = [*self.network.parameters(), *self.loss_predictor.parameters()]
        for teacher_value, student_value in zip(self.teacher.parameters(), student, strict=True):
            teacher_value.lerp_(student_value, 1 - decay)
