"""Prune a teacher into a real, smaller student by the importance of its structures on a calibration set.

``prune(teacher, batches, width=0.5, layers=6, importance="fisher")`` scores every structure of the teacher (see
:mod:`fisherkd.prune.criteria` for the criteria and their papers), keeps the top fraction of each (the top
``layers`` blocks), and rebuilds a smaller model of the teacher's family with the kept weights: a zoo model via
``create_model`` with smaller widths (:mod:`fisherkd.prune.vision`), or a Llama-style Hugging Face causal LM of the
same class with a smaller config (:mod:`fisherkd.prune.hf`). Its outputs equal the teacher's with the pruned units'
gates at zero. The student then trains with any distillation method; from a run config:
``student: {from_teacher: {layers: 6, width: 0.5, importance: fisher, calibration: 512}}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from fisherkd.prune.criteria import (
    IMPORTANCES,
    LAYER_IMPORTANCES,
    Batch,
    Gate,
    Slice,
    Structure,
    check_importance,
    importance,
    masked,
    top_units,
)

__all__ = [
    "IMPORTANCES",
    "LAYER_IMPORTANCES",
    "Gate",
    "Pruned",
    "Slice",
    "Structure",
    "importance",
    "keep_units",
    "masked",
    "prune",
    "structures_of",
]


@dataclass
class Pruned:
    """The pruned model; for a zoo model also its zoo ``name`` and constructor ``kwargs`` (rebuild it with
    ``create_model(name, in_channels, num_classes, **kwargs)``); the kept unit indices and the scores."""

    model: nn.Module
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    keep: dict[str, Tensor] = field(default_factory=dict)
    scores: dict[str, Tensor] = field(default_factory=dict)


def _is_causal_lm(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(getattr(model, "model", None), "layers")


def structures_of(model: nn.Module) -> list[Structure]:
    """Every prunable structure of ``model`` (a zoo mlp, cnn1d or CIFAR ResNet, or a Llama-style causal LM)."""
    if _is_causal_lm(model):
        from fisherkd.prune.hf import causal_lm_structures

        return causal_lm_structures(model)
    from fisherkd.prune.vision import zoo_structures

    return zoo_structures(model)


def keep_units(
    structures: Iterable[Structure],
    scores: Mapping[str, Tensor],
    fractions: Mapping[str, float],
    layers: int | None = None,
) -> dict[str, Tensor]:
    """Kept unit indices per structure: the top round(fraction · size) (at least 1) by score, in their original
    order, ``fractions`` per kind (head, neuron, channel, hidden); the top ``layers`` removable blocks (all when
    None)."""
    keep = {}
    for s in structures:
        if s.kind == "layer":
            count = s.size if layers is None else layers
            if not 0 <= count <= s.size:
                raise ValueError(f"layers={layers}: the teacher has {s.size} removable blocks, keep 0 to {s.size}")
        else:
            count = max(1, round(fractions.get(s.kind, 1.0) * s.size))
        keep[s.name] = top_units(scores[s.name], count) if s.name in scores else top_units(-_order(s.size), count)
    return keep


def _order(size: int) -> Tensor:
    import torch

    return torch.arange(size, dtype=torch.float32)


def prune(
    teacher: nn.Module,
    batches: Iterable[Batch],
    *,
    width: float = 0.5,
    heads: float | None = None,
    neurons: float | None = None,
    hidden: float | None = None,
    layers: int | None = None,
    importance_method: str = "fisher",
    layer_importance: str = "block",
    seed: int = 0,
    name: str | None = None,
    kwargs: Mapping[str, Any] | None = None,
    in_channels: int | None = None,
    num_classes: int | None = None,
) -> Pruned:
    """Prune ``teacher`` to a smaller model of its family, ranked on the calibration ``batches``.

    ``width`` is the kept fraction of every width axis (heads, MLP neurons / conv channels, hidden channels), unless
    ``heads`` / ``neurons`` / ``hidden`` set their own; ``layers`` the number of blocks kept (a causal LM's decoder
    layers, a ResNet's blocks, of which those with a projection shortcut always stay; None keeps all).
    ``importance_method`` ranks widths (fisher, empirical, activation, weight, random), ``layer_importance`` ranks
    blocks (those, block, removal). A zoo teacher needs its zoo ``name`` (and the
    ``kwargs`` it was built with); the teacher itself is left as it was.
    """
    if not 0 < width <= 1:
        raise ValueError(f"width={width}: the kept fraction of each width must be in (0, 1]")
    check_importance(importance_method)
    check_importance(layer_importance, "layer")
    structures = structures_of(teacher)
    batches = list(batches)
    widths = [s for s in structures if s.kind != "layer"]
    scores = importance(teacher, widths, batches, importance_method, seed=seed)
    blocks = [s for s in structures if s.kind == "layer"]
    removable = None
    if layers is not None:
        if not blocks:
            raise ValueError(f"layers={layers}: {type(teacher).__name__} has no removable blocks; leave layers out")
        from fisherkd.prune.vision import fixed_blocks

        fixed, total = fixed_blocks(teacher), fixed_blocks(teacher) + blocks[0].size
        if not max(1, fixed) <= layers <= total:
            raise ValueError(
                f"layers={layers}: the teacher has {total} blocks, {fixed} of which change the shape and stay: "
                f"keep {max(1, fixed)} to {total}"
            )
        removable = layers - fixed
        scores |= importance(teacher, blocks, batches, layer_importance, seed=seed)
    neuron = width if neurons is None else neurons
    fractions = {"head": width if heads is None else heads, "neuron": neuron, "channel": neuron}
    fractions["hidden"] = width if hidden is None else hidden
    keep = keep_units(structures, scores, fractions, removable)
    if _is_causal_lm(teacher):
        from fisherkd.prune.hf import prune_causal_lm

        return Pruned(prune_causal_lm(teacher, keep), keep=keep, scores=scores)
    if name is None:
        raise ValueError("pruning a zoo model needs its zoo name (name='cnn1d', ...) to rebuild it smaller")
    from fisherkd.prune.vision import prune_zoo

    model, new_kwargs = prune_zoo(teacher, name, kwargs or {}, keep, in_channels, num_classes)
    return Pruned(model, name, new_kwargs, keep, scores)
