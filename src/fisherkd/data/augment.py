"""On-device augmentation, applied once per batch and fed to teacher and student alike.

Sharing the augmented input ("function matching", Beyer et al. CVPR 2022) is what lets KD beat a scratch
student on small data: the student is asked to match the teacher on inputs the labels never covered.
All randomness comes from torch's global generator, which checkpoints save and restore.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from fisherkd.data.hard import HardConfig


class AugmentConfig(BaseModel):
    """What to apply to each training batch (all off by default)."""

    model_config = ConfigDict(extra="forbid")

    crop_padding: int = Field(0, ge=0, description="random crop after zero padding by this many pixels/steps")
    flip: bool = Field(False, description="random horizontal flip (images)")
    noise: float = Field(0.0, ge=0.0, description="std of additive Gaussian noise")
    mixup_alpha: float = Field(0.0, ge=0.0, description="mixup Beta(α, α); 0 = off; the label is the larger part's")
    hard: HardConfig | None = Field(
        None, description="HARD: a learned augmenter that maximises the teacher-student KL, within bounds; applied "
        "last, by the engine's Trainer (see fisherkd.data.hard)"
    )


def random_crop(x: Tensor, padding: int) -> Tensor:
    """Zero-pad the last (1-D) or last two (2-D) axes by ``padding`` and crop back at a random offset per sample."""
    if padding == 0:
        return x
    batch = x.shape[0]
    if x.dim() <= 3:  # (B, L) or (B, C, L)
        length = x.shape[-1]
        padded = F.pad(x, (padding, padding))
        start = torch.randint(0, 2 * padding + 1, (batch,), device=x.device)
        cols = start[:, None] + torch.arange(length, device=x.device)
        if x.dim() == 2:
            return padded.gather(1, cols)
        return padded.gather(2, cols[:, None, :].expand(-1, x.shape[1], -1))
    height, width = x.shape[-2:]
    padded = F.pad(x, (padding, padding, padding, padding))
    top = torch.randint(0, 2 * padding + 1, (batch,), device=x.device)
    left = torch.randint(0, 2 * padding + 1, (batch,), device=x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    samples = torch.arange(batch, device=x.device)[:, None, None, None]
    channels = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[samples, channels, rows, cols]


def random_flip(x: Tensor) -> Tensor:
    flip = torch.rand(x.shape[0], device=x.device) < 0.5
    return torch.where(flip.view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)


def mixup(x: Tensor, y: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """Mix each sample with a random partner: λ·x + (1−λ)·x_perm, λ ~ Beta(α, α) per sample.

    The returned label is that of the larger part, so label losses stay hard-label; the teacher sees the same
    mixed input, so distillation losses get the exact soft target for it.
    """
    concentration = torch.tensor(float(alpha), device=x.device)  # sampled on the device: no host round trip
    # alpha > 0 is checked by the config; the distribution's own check would read a tensor on the host
    lam = torch.distributions.Beta(concentration, concentration, validate_args=False).sample((x.shape[0],))
    partner = torch.randperm(x.shape[0], device=x.device)
    shape = (-1, *([1] * (x.dim() - 1)))
    mixed = lam.view(shape) * x + (1 - lam.view(shape)) * x[partner]
    return mixed, torch.where(lam >= 0.5, y, y[partner])


def augment(x: Tensor, y: Tensor, config: AugmentConfig) -> tuple[Tensor, Tensor]:
    """Apply the configured augmentations in a fixed order: crop, flip, noise, mixup. (``hard`` comes after them,
    applied by the engine's Trainer, which owns and trains the augmenter.)"""
    if config.crop_padding:
        x = random_crop(x, config.crop_padding)
    if config.flip:
        x = random_flip(x)
    if config.noise:
        x = x + config.noise * torch.randn_like(x)
    if config.mixup_alpha:
        x, y = mixup(x, y, config.mixup_alpha)
    return x, y
