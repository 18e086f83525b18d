"""Where training is, kept in one place for every front-end.

The :class:`~fisherkd.distiller.Distiller` owns a :class:`StepClock` and builds each batch's
:class:`~fisherkd.methods.MethodInputs` from it, so a method with a warm-up or a curriculum reads the same
fractional epoch whether the engine, the Hugging Face ``DistillationTrainer`` or a plain PyTorch loop drives it.
A front-end does two things: ``distiller.clock.configure(steps_per_epoch)`` before training and
``distiller.after_optimizer_step()`` after every optimizer step (which advances the clock and every
:class:`AfterStep` part: methods, Fisher weighters, an EMA teacher).
"""

from __future__ import annotations

import math
from typing import Protocol, runtime_checkable

import torch
from torch import Tensor, nn


@runtime_checkable
class AfterStep(Protocol):
    """A part of the distiller with state between optimizer steps (Fisher statistics, an EMA teacher, a bank)."""

    def after_optimizer_step(self) -> None: ...


class StepClock(nn.Module):
    """Optimizer steps taken, as a device tensor (read inside the step without a host sync, saved in checkpoints),
    and the length of an epoch in optimizer steps (set by the front-end)."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.steps_per_epoch: float | None = None

    def configure(self, steps_per_epoch: float, step: int | None = None) -> None:
        """Set the epoch length (optimizer steps per epoch) and, when resuming, the steps already taken."""
        if not steps_per_epoch > 0:
            raise ValueError(f"steps_per_epoch must be positive, got {steps_per_epoch}")
        self.steps_per_epoch = float(steps_per_epoch)
        if step is not None:
            self.step.fill_(step)

    def epoch(self) -> Tensor | float:
        """Fractional epoch (steps / steps per epoch) as a device scalar; ``inf`` when no epoch length was given,
        i.e. every warm-up counts as finished (the Distiller refuses that case in training mode)."""
        if self.steps_per_epoch is None:
            return math.inf
        return self.step / self.steps_per_epoch

    def after_optimizer_step(self) -> None:
        self.step.add_(1)

    def extra_repr(self) -> str:
        return f"steps_per_epoch={self.steps_per_epoch}"
