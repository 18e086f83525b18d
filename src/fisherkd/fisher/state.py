"""Running Fisher statistics: a bias-corrected EMA, all-reduced across DDP ranks, saved in checkpoints."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn


def all_reduce_mean(total: Tensor, count: Tensor | float) -> Tensor:
    """Σ total / Σ count over all DDP ranks (just total / count in one process): one collective, no host sync.

    Reducing sums and counts rather than averaging the ranks' means keeps the result equal to the statistic of
    the whole global batch when ranks hold different numbers of samples.
    """
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        packed = torch.cat([total.flatten(), count.reshape(1)])
        dist.all_reduce(packed)
        total, count = packed[:-1].view_as(total), packed[-1]
    return total / count


class EMAStatistic(nn.Module):
    """m_k = β·m_{k−1} + (1 − β)·x_k from m_0 = 0, read bias-corrected: m̂_k = m_k / (1 − β^k).

    The correction (as in Adam, Kingma & Ba 2015) makes m̂ an average of the updates seen so far with weights
    ∝ β^(k−i) summing to 1: after one update m̂ = x_1, and early reads are not pulled towards 0. The running value
    ``value`` is a buffer, the update count is extra state: both are in the ``state_dict`` and so in every
    checkpoint. The buffer is sized at the first update (the statistic's shape is known only then) and resized
    when a checkpoint is loaded into a fresh module.
    """

    def __init__(self, beta: float) -> None:
        super().__init__()
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"EMA beta must lie in [0, 1), got {beta}")
        self.beta = beta
        self.updates = 0
        self.register_buffer("value", torch.zeros(0))

    def update(self, x: Tensor) -> None:
        x = x.detach().float()
        if self.updates == 0 or self.value.shape != x.shape:
            self.value = torch.zeros_like(x)
            self.updates = 0
        self.value.mul_(self.beta).add_(x, alpha=1.0 - self.beta)
        self.updates += 1

    def read(self) -> Tensor | None:
        """The bias-corrected average, or None before the first update."""
        if self.updates == 0:
            return None
        return self.value / (1.0 - self.beta**self.updates)

    def get_extra_state(self) -> dict[str, Any]:
        return {"updates": self.updates}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.updates = int(state["updates"])

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        saved = state_dict.get(prefix + "value")
        if saved is not None and saved.shape != self.value.shape:
            self.value = torch.empty_like(saved, device=self.value.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
