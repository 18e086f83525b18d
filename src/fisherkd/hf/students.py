"""Students built from a Llama-style teacher by keeping some of its decoder layers (DistilBERT-style
initialisation; the on-policy issue's 6-of-30-layer SmolLM2 student). For students that are also narrower, ranked
by importance, see :func:`fisherkd.prune.prune`."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from fisherkd.prune.hf import LAYERS, causal_lm_structures, prune_causal_lm

__all__ = ["layer_subset_student", "spread_layers"]

LayerChoice = Literal["even", "first"]


def spread_layers(total: int, count: int, choice: LayerChoice = "even") -> list[int]:
    """``count`` of ``total`` layer indices: ``"first"`` the first ones, ``"even"`` evenly spaced from the first to
    the last (round(i·(total − 1)/(count − 1)))."""
    if not 1 <= count <= total:
        raise ValueError(f"cannot keep {count} of {total} layers: keep 1 to {total}")
    if choice == "first":
        return list(range(count))
    if choice == "even":
        return [0] if count == 1 else [round(i * (total - 1) / (count - 1)) for i in range(count)]
    raise ValueError(f"layer choice {choice!r} is unknown: use 'even' or 'first', or pass the layer indices")


def layer_subset_student(teacher: nn.Module, layers: int | Sequence[int], choice: LayerChoice = "even") -> nn.Module:
    """A new model of the teacher's class with the chosen decoder layers (indices, or a count picked by
    ``choice``) and the teacher's embeddings, final norm and head, all copied: equal to the teacher with the other
    blocks skipped. Saves with ``save_pretrained`` like any model of its family."""
    structures = causal_lm_structures(teacher)
    total = next(s.size for s in structures if s.name == LAYERS)
    indices = spread_layers(total, layers, choice) if isinstance(layers, int) else sorted(set(layers))
    if not indices or indices[0] < 0 or indices[-1] >= total:
        raise ValueError(f"layer indices {list(layers)} must lie in 0..{total - 1} (the teacher has {total} layers)")
    keep = {s.name: torch.arange(s.size) for s in structures}
    keep[LAYERS] = torch.tensor(indices)
    return prune_causal_lm(teacher, keep)
