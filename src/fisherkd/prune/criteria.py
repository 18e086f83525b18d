"""Importance of a teacher's structures (channels, MLP neurons, attention heads, hidden channels, whole blocks) on a
calibration set, for structured pruning into a smaller student.

A *structure* is a set of ``size`` units that share one index set: the hidden units of one MLP layer, the channels
of one convolution, the KV groups of one attention layer, the hidden (embedding) channels of a whole Transformer, or
the blocks of a network. Each unit u has a multiplicative gate ξ_u on the tensors it produces (``Gate``: a module's
output or input along a channel axis, ``width`` channels per unit, or a residual block's update out − in); pruning
u is setting ξ_u = 0. The scores (higher = keep):

- ``fisher`` / ``empirical``: the Fisher of the gate, E_n[(∂ log p(ŷ_n|x_n)/∂ξ_u)²] at ξ = 1, with ŷ sampled from the
  teacher (true Fisher) or the labels (empirical Fisher). ∂ log p/∂ξ_u = Σ_gates Σ_positions ⟨h_u, ∂ log p/∂h_u⟩:
  Molchanov et al., "Importance Estimation for Neural Network Pruning" (CVPR 2019) for channels; Michel et al.,
  "Are Sixteen Heads Really Better than One?" (NeurIPS 2019) for heads; Kwon et al., "A Fast Post-Training Pruning
  Framework for Transformers" (NeurIPS 2022) for heads and neurons. Each sample gets its own gate (shape B×U), so
  one backward of Σ_n log p gives every per-sample score exactly (samples do not interact in eval mode).
- ``activation``: E_n mean_positions ‖h_u‖ (the L2 norm over the unit's channels, |h_c| for a single channel),
  the activation-based criterion of Minitron (Muralidharan et al., "Compact Language Models via Pruning and
  Knowledge Distillation", 2024; batch/sequence aggregated by means here).
- ``weight``: ‖W_u‖₂ over every parameter entry indexed by the unit (the rows that produce it and the columns that
  read it), as in Li et al., "Pruning Filters for Efficient ConvNets" (ICLR 2017).
- ``random``: uniform scores from a seeded generator (the baseline).

A block's gate scales its update (out = in + ξ·(block(in) − in)): its Fisher is E_n[⟨block(in) − in, g_out⟩²], its
activation the mean size of its update, its weight the norm of all its parameters. The per-channel sums equal
those of :func:`fisherkd.fisher.estimators.head_gate_fisher` on tapped (h, g) pairs; explicit per-sample gates
are used here because they also cover block gates and shared gates (one hidden channel gated at many places).

Blocks (``kind == "layer"``) also by ``block``: BI = 1 − E[cos(x_in, x_out)] over samples and positions (Men et al.,
"ShortGPT", 2024; Minitron's depth criterion), and ``removal``: the calibration loss with the block replaced by the
identity minus the full model's loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd.core import model_logits, nearest
from fisherkd.fisher.estimators import sample_labels, valid_rows

IMPORTANCES = ("fisher", "empirical", "activation", "weight", "random")
LAYER_IMPORTANCES = (*IMPORTANCES, "block", "removal")


@dataclass(frozen=True)
class Gate:
    """Where the gates of a structure multiply: ``module``'s output (``where="out"``), its input (``"in"``), or the
    update out − in of a residual block (``"delta"``, one gate for the whole block), along ``axis`` (1 for B×C×…
    maps and B×D vectors, -1 for B×T×D token sequences) with ``width`` contiguous channels per unit."""

    module: str
    axis: int = 1
    width: int = 1
    where: str = "out"


@dataclass(frozen=True)
class Slice:
    """A state-dict tensor indexed by the units along ``dim``, ``width`` contiguous entries per unit."""

    tensor: str
    dim: int
    width: int = 1


@dataclass(frozen=True)
class Structure:
    """``size`` prunable units (``kind``: channel, neuron, head, hidden or layer) with their gates and tensors."""

    name: str
    kind: str
    size: int
    gates: tuple[Gate, ...]
    slices: tuple[Slice, ...] = field(default_factory=tuple)


Batch = Any  # (x, y) of a vision loader or a Mapping with input_ids / attention_mask (/ labels) of a causal LM


def unpack(batch: Batch) -> tuple[Tensor | dict[str, Tensor], Tensor | None, Tensor | None]:
    """(inputs, target, mask) of a calibration batch. For a causal LM the target of position t is token t + 1
    (padding and the last position are -100), the labels of the empirical Fisher and of the removal loss."""
    if isinstance(batch, Mapping):
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
        mask = batch.get("attention_mask")
        labels = batch.get("labels", batch["input_ids"])
        target = torch.full_like(labels, -100)
        target[:, :-1] = labels[:, 1:]
        if mask is not None:
            target[:, :-1] = target[:, :-1].masked_fill(mask[:, 1:] == 0, -100)
        return inputs, target, mask
    x, y = batch[0], (batch[1] if len(batch) > 1 else None)
    return x, y, None


def _forward(model: nn.Module, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
    if isinstance(inputs, Mapping):
        return model_logits(model(**inputs)).float()
    return model_logits(model(inputs)).float()


def _per_sample_log_likelihood(logits: Tensor, labels: Tensor, valid: Tensor | None) -> Tensor:
    log_p = F.log_softmax(logits, dim=-1).gather(-1, labels.long().clamp_min(0).unsqueeze(-1)).squeeze(-1)
    log_p = log_p if valid is None else log_p * valid
    return log_p.reshape(log_p.shape[0], -1).sum(1)


def loss(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy over the labelled rows (target ≥ 0) of class or per-token logits."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1).long(), ignore_index=-100)


def _gated(tensor: Tensor, gate: Gate, xi: Tensor) -> Tensor:
    """``tensor`` with each sample's units multiplied by its row of ``xi`` (B×U)."""
    scale = xi.repeat_interleave(gate.width, dim=1) if gate.width > 1 else xi
    shape = [1] * tensor.dim()
    shape[0] = tensor.shape[0]
    if gate.where != "delta":  # a block's gate scales its whole update
        axis = gate.axis % tensor.dim()
        shape[axis] = tensor.shape[axis]
    return tensor * scale.to(device=tensor.device, dtype=tensor.dtype).reshape(shape)


def _first(value: Any) -> Tensor:
    return value[0] if isinstance(value, (tuple, list)) else value


def _replace_first(value: Any, tensor: Tensor) -> Any:
    return type(value)([tensor, *value[1:]]) if isinstance(value, (tuple, list)) else tensor


@contextlib.contextmanager
def gates(
    model: nn.Module,
    structures: Sequence[Structure],
    values: Callable[[Structure, int], Tensor],
    record: Callable[[Structure, Gate, Tensor, Tensor, Tensor | None], None] | None = None,
) -> Iterator[None]:
    """Multiply every structure's gated tensors by ``values(structure, batch_size)`` (B×size) while inside.

    ``record(structure, gate, h, xi, inp)`` sees each gated tensor h and its gates; for a block h is its update
    out − in and ``inp`` its input (else None).
    """
    modules = dict(model.named_modules())
    handles = []

    def hook_for(structure: Structure, gate: Gate, column: int | None) -> Any:
        def values_of(batch: int) -> Tensor:  # a block structure has one gate per block: block i takes column i
            xi = values(structure, batch)
            return xi if column is None else xi[:, column : column + 1]

        def on_input(_module: nn.Module, args: tuple, kwargs: dict) -> tuple:
            h = args[0]
            xi = values_of(h.shape[0])
            if record:
                record(structure, gate, h, xi, None)
            return (_gated(h, gate, xi), *args[1:]), kwargs

        def on_output(_module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            out = _first(output)
            xi = values_of(out.shape[0])
            if gate.where == "delta":
                inp = args[0] if args else kwargs["hidden_states"]
                delta = out - inp
                if record:
                    record(structure, gate, delta, xi, inp)
                return _replace_first(output, inp + _gated(delta, gate, xi))
            if record:
                record(structure, gate, out, xi, None)
            return _replace_first(output, _gated(out, gate, xi))

        return on_input, on_output

    try:
        for structure in structures:
            for i, gate in enumerate(structure.gates):
                if gate.module not in modules:
                    raise KeyError(f"model has no module {gate.module!r}; {nearest(gate.module, list(modules))}")
                on_input, on_output = hook_for(structure, gate, i if structure.kind == "layer" else None)
                module = modules[gate.module]
                if gate.where == "in":
                    handles.append(module.register_forward_pre_hook(on_input, with_kwargs=True))
                else:
                    handles.append(module.register_forward_hook(on_output, with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def masked(model: nn.Module, structures: Sequence[Structure], keep: Mapping[str, Tensor]) -> Iterator[None]:
    """The model with every unit not in ``keep[structure.name]`` gated to zero: what pruning removes."""
    masks = {}
    for s in structures:
        m = torch.zeros(s.size)
        m[keep[s.name]] = 1.0
        masks[s.name] = m

    def values(structure: Structure, batch: int) -> Tensor:
        return masks[structure.name].expand(batch, -1)

    with gates(model, structures, values):
        yield


def weight_importance(model: nn.Module, structure: Structure) -> Tensor:
    """‖W_u‖₂ over every parameter entry the unit indexes (or, for a block, every parameter under its name)."""
    params = dict(model.named_parameters())
    if structure.kind == "layer":
        return torch.stack(
            [
                torch.sqrt(sum(p.detach().float().pow(2).sum() for n, p in params.items() if n.startswith(f"{g}.")))
                for g in _layer_modules(structure)
            ]
        )
    total = torch.zeros(structure.size)
    for s in structure.slices:
        if s.tensor not in params:  # buffers (BatchNorm statistics) are not weights
            continue
        w = params[s.tensor].detach().float().movedim(s.dim, 0)
        per_entry = w.reshape(w.shape[0], -1).pow(2).sum(1)
        total += per_entry.reshape(structure.size, s.width).sum(1).cpu()
    return total.sqrt()


def _layer_modules(structure: Structure) -> list[str]:
    return [g.module for g in structure.gates]


def check_importance(method: str, kind: str = "width") -> None:
    allowed = LAYER_IMPORTANCES if kind == "layer" else IMPORTANCES
    if method not in allowed:
        raise ValueError(f"unknown importance {method!r} for {kind}; {nearest(method, allowed)}")


def importance(
    model: nn.Module,
    structures: Sequence[Structure],
    batches: Iterable[Batch],
    method: str = "fisher",
    *,
    temperature: float = 1.0,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Scores of every unit of every structure (name → float32 tensor of its size, on the CPU; higher = keep).

    A layer structure (``kind == "layer"``) has one unit per block, each gated by its own block's update (one gate
    per block, so its ``gates`` list the blocks in order). ``batches`` are calibration batches (see :func:`unpack`).
    """
    for s in structures:
        check_importance(method, "layer" if s.kind == "layer" else "width")
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return {s.name: torch.rand(s.size, generator=generator) for s in structures}
    if method == "weight":
        return {s.name: weight_importance(model, s) for s in structures}
    if method == "removal":
        return removal_importance(model, structures, batches)
    gated = [_per_block(s) for s in structures]
    flat = [g for group in gated for g in group]
    sums = {s.name: torch.zeros(s.size) for s in flat}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs, target, mask = unpack(batch)
            count += _batch_size(inputs)
            if method in ("fisher", "empirical"):
                _accumulate_fisher(model, flat, inputs, target, mask, method, temperature, generator, sums)
            else:
                _accumulate_activation(model, flat, inputs, mask, method, sums)
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("importance needs at least one calibration batch")
    out = {}
    for s, group in zip(structures, gated):
        out[s.name] = torch.cat([sums[g.name] for g in group]) / count
    return out


def _per_block(structure: Structure) -> list[Structure]:
    """A layer structure as one single-unit structure per block (each block has its own gate)."""
    if structure.kind != "layer":
        return [structure]
    return [Structure(f"{structure.name}/{i}", "layer", 1, (g,)) for i, g in enumerate(structure.gates)]


def _batch_size(inputs: Tensor | Mapping[str, Tensor]) -> int:
    return next(iter(inputs.values())).shape[0] if isinstance(inputs, Mapping) else inputs.shape[0]


def _accumulate_fisher(
    model: nn.Module,
    structures: Sequence[Structure],
    inputs: Tensor | Mapping[str, Tensor],
    target: Tensor | None,
    mask: Tensor | None,
    method: str,
    temperature: float,
    generator: torch.Generator,
    sums: dict[str, Tensor],
) -> None:
    batch = _batch_size(inputs)
    device = next(model.parameters()).device
    xis = {s.name: torch.ones(batch, s.size, device=device, requires_grad=True) for s in structures}
    with torch.enable_grad(), gates(model, structures, lambda s, _b: xis[s.name]):
        logits = _forward(model, inputs)
        if method == "empirical":
            if target is None:
                raise ValueError("the empirical Fisher needs labels: give (x, y) calibration batches, or use fisher")
            labels = target
        else:
            labels = sample_labels(logits, temperature, generator=None if device.type != "cpu" else generator)
        valid = valid_rows(logits, mask, target if method == "empirical" else None)
        log_likelihood = _per_sample_log_likelihood(logits / temperature, labels, valid)
        grads = torch.autograd.grad(log_likelihood.sum(), list(xis.values()), allow_unused=True)
    for s, grad in zip(structures, grads):
        if grad is not None:
            sums[s.name] += grad.detach().float().pow(2).sum(0).cpu()


@torch.no_grad()
def _accumulate_activation(
    model: nn.Module,
    structures: Sequence[Structure],
    inputs: Tensor | Mapping[str, Tensor],
    mask: Tensor | None,
    method: str,
    sums: dict[str, Tensor],
) -> None:
    def record(structure: Structure, gate: Gate, h: Tensor, _xi: Tensor, _inp: Tensor | None) -> None:
        h = h.detach().float()
        axis = gate.axis % h.dim()
        h = h.movedim(axis, -1)
        batch, width = h.shape[0], h.shape[-1]
        units = width // gate.width if gate.where != "delta" else 1
        norms = h.reshape(batch, -1, units, width // units).norm(dim=-1)  # B × positions × units
        sums[structure.name] += _position_mean(norms, mask).sum(0).cpu()

    def block(structure: Structure, gate: Gate, delta: Tensor, _xi: Tensor, inp: Tensor | None) -> None:
        if inp is None:
            raise ValueError(f"block importance ranks blocks, not the {structure.kind} units of {structure.name!r}")
        axis = gate.axis % delta.dim()
        cos = F.cosine_similarity(inp.float(), (inp + delta).float(), dim=axis)  # B × positions
        sums[structure.name] += (1.0 - _position_mean(cos.reshape(cos.shape[0], -1, 1), mask)).sum(0).cpu()

    ones = lambda s, b: torch.ones(b, s.size)  # noqa: E731
    with gates(model, structures, ones, record=block if method == "block" else record):
        _forward(model, inputs)


def _position_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """B × positions × U → B × U, the mean over positions (valid tokens only when ``mask`` fits)."""
    if mask is not None and mask.dim() == 2 and values.shape[1] == mask.shape[1]:
        m = mask.to(values.device, torch.float32)[:, :, None]
        return (values * m).sum(1) / m.sum(1).clamp_min(1.0)
    return values.mean(1)


@torch.no_grad()
def removal_importance(
    model: nn.Module, structures: Sequence[Structure], batches: Iterable[Batch]
) -> dict[str, Tensor]:
    """Per block: calibration loss with the block replaced by the identity minus the full model's loss."""
    batches = list(batches)
    was_training = model.training
    model.eval()

    def total_loss() -> Tensor:
        losses = []
        for batch in batches:
            inputs, target, _ = unpack(batch)
            if target is None:
                raise ValueError("removal importance needs labels: give (x, y) calibration batches")
            losses.append(loss(_forward(model, inputs), target).cpu())
        return torch.stack(losses).mean()

    try:
        base = total_loss()
        out = {}
        for s in structures:
            if s.kind != "layer":
                raise ValueError(f"removal importance ranks blocks, not {s.kind} units of {s.name!r}")
            scores = []
            for block in _per_block(s):
                with gates(model, [block], lambda _s, b: torch.zeros(b, 1)):
                    scores.append(total_loss() - base)
            out[s.name] = torch.stack(scores)
    finally:
        model.train(was_training)
    return out


def top_units(scores: Tensor, keep: int) -> Tensor:
    """Indices of the ``keep`` highest scores, in their original order (pruning keeps the layout)."""
    keep = max(0, min(int(keep), scores.numel()))
    return torch.topk(scores, keep).indices.sort().values


def slice_state(
    state: Mapping[str, Tensor], structures: Sequence[Structure], keep: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """The state dict with only the kept units of every structure (each tensor indexed along every dim it has)."""
    out = dict(state)
    for s in structures:
        for sl in s.slices:
            units = keep[s.name].to(out[sl.tensor].device)
            index = (units[:, None] * sl.width + torch.arange(sl.width, device=units.device)).reshape(-1)
            out[sl.tensor] = out[sl.tensor].index_select(sl.dim, index).clone()
    return out
