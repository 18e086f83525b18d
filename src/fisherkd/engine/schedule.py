"""Learning-rate schedules as a multiplier of the base rate, per optimizer step."""

from __future__ import annotations

import math

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
