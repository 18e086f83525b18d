"""Learning-rate schedules as a multiplier of the base rate, per optimizer step."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisherkd.config import ScheduleConfig


def lr_factor(step: int, steps_per_epoch: int, total_steps: int, config: ScheduleConfig) -> float:
    """Linear warm-up over ``warmup_epochs``, then constant, step decay at ``milestones`` or cosine to zero."""
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    if config.name == "constant":
        return 1.0
    if config.name == "step":
        epoch = step // max(steps_per_epoch, 1)
        return config.gamma ** sum(epoch >= m for m in config.milestones)
    progress = (step - warmup) / max(total_steps - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def lr_factor_tensor(step: Tensor, steps_per_epoch: int, total_steps: int, config: ScheduleConfig) -> Tensor:
    """:func:`lr_factor` of a step counter held on the device, in tensor operations only (elementwise).

    The engine keeps the step and the learning rate as device tensors and updates both inside the training step,
    so the step has no host reads and a captured CUDA graph replays the schedule instead of freezing one rate.
    """
    step = step.float()  # float32 (every device has it): exact steps up to 2^24, rates to ~1e-7 relative
    warmup = int(config.warmup_epochs * steps_per_epoch)
    if config.name == "constant":
        after = torch.ones_like(step)
    elif config.name == "step":
        epoch = torch.div(step, max(steps_per_epoch, 1), rounding_mode="floor")
        decays = torch.zeros_like(step)
        for milestone in config.milestones:
            decays = decays + (epoch >= milestone).float()
        after = torch.pow(config.gamma, decays)
    else:
        progress = ((step - warmup) / max(total_steps - warmup, 1)).clamp(max=1.0)
        after = 0.5 * (1.0 + torch.cos(math.pi * progress))
    return torch.where(step < warmup, (step + 1) / max(warmup, 1), after)
