"""Structured pruning of a Llama-style Hugging Face causal LM into a smaller model of the same class.

Minitron (Muralidharan et al., "Compact Language Models via Pruning and Knowledge Distillation", 2024; Sreenivas et
al., "LLM Pruning and Distillation in Practice: The Minitron Approach", 2024) prunes four axes, all here:

- attention heads, by KV group: a group is one key/value head with the ``n_rep`` query heads that share it, so a
  pruned model keeps grouped-query attention consistent (for multi-head attention every head is its own group).
  Kept: q_proj rows and o_proj columns of the group's query heads, k_proj / v_proj rows of its KV head. Gate: the
  o_proj input, ``n_rep · head_dim`` channels per group. Every layer keeps the same number of groups.
- MLP neurons: gate_proj / up_proj rows and down_proj columns; gate: the down_proj input. Same count per layer.
- hidden (embedding) channels, one index set for the whole model: embedding columns, every projection's input
  columns or output rows, every RMSNorm weight, lm_head columns. Gate: the residual stream (the embedding output
  and every o_proj / down_proj output), so a gated channel is zero throughout (its activation importance is then
  the summed size of every write to the channel, where Minitron reads the LayerNorm outputs). RMSNorm averages
  over the channels, so a model with D' of D channels equals the gated one only with its norms rescaled:
  weight · √(D/D') and eps · D/D' (then x/√(Σx²/D' + eps·D/D') · w√(D/D') = x/√(Σx²/D + eps) · w exactly).
- layers (decoder blocks), gated on their update out − in; a removed block is the identity.

The result is ``type(model)(new_config)`` (num_attention_heads, num_key_value_heads, head_dim, intermediate_size,
hidden_size, num_hidden_layers, rms_norm_eps), loaded strictly with the kept weights: ``save_pretrained`` /
``from_pretrained`` work as for any model of its family. Q/K-normed families (Qwen3) are not supported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor, nn

from fisherkd.prune.criteria import Gate, Slice, Structure, slice_state

HIDDEN = "hidden"
LAYERS = "model.layers"


def _attr(config: Any, name: str, default: Any = None) -> Any:
    value = getattr(config, name, None)
    return default if value is None else value


def _check(model: nn.Module) -> None:
    config = getattr(model, "config", None)
    layers = getattr(getattr(model, "model", None), "layers", None)
    if config is None or layers is None or not hasattr(layers[0], "self_attn") or not hasattr(layers[0], "mlp"):
        raise TypeError(
            f"{type(model).__name__} is not a Llama-style causal LM (model.layers[i].self_attn / .mlp): structured "
            "pruning supports Llama, Mistral and Qwen2 style models"
        )
    if hasattr(layers[0].self_attn, "q_norm"):
        raise TypeError(f"{type(model).__name__} normalizes queries/keys per head (q_norm): not supported by pruning")


def head_dim(config: Any) -> int:
    return _attr(config, "head_dim", config.hidden_size // config.num_attention_heads)


def causal_lm_structures(model: nn.Module) -> list[Structure]:
    """Heads (per layer, by KV group), MLP neurons (per layer), hidden channels and layers of a Llama-style LM."""
    _check(model)
    config = model.config
    state = model.state_dict()
    d = head_dim(config)
    kv = _attr(config, "num_key_value_heads", config.num_attention_heads)
    rep = config.num_attention_heads // kv
    out: list[Structure] = []
    hidden_gates = [Gate("model.embed_tokens", -1)]
    hidden_slices = [Slice("model.embed_tokens.weight", 1), Slice("model.norm.weight", 0)]
    if "lm_head.weight" in state:
        hidden_slices.append(Slice("lm_head.weight", 1))

    def present(*slices: Slice) -> tuple[Slice, ...]:
        return tuple(s for s in slices if s.tensor in state)

    for i in range(config.num_hidden_layers):
        attn, mlp = f"model.layers.{i}.self_attn", f"model.layers.{i}.mlp"
        out.append(
            Structure(
                attn,
                "head",
                kv,
                (Gate(f"{attn}.o_proj", -1, rep * d, "in"),),
                present(
                    *(Slice(f"{attn}.q_proj.{p}", 0, rep * d) for p in ("weight", "bias")),
                    *(Slice(f"{attn}.{m}_proj.{p}", 0, d) for m in "kv" for p in ("weight", "bias")),
                    Slice(f"{attn}.o_proj.weight", 1, rep * d),
                ),
            )
        )
        out.append(
            Structure(
                mlp,
                "neuron",
                config.intermediate_size,
                (Gate(f"{mlp}.down_proj", -1, 1, "in"),),
                present(
                    *(Slice(f"{mlp}.{m}_proj.{p}", 0) for m in ("gate", "up") for p in ("weight", "bias")),
                    Slice(f"{mlp}.down_proj.weight", 1),
                ),
            )
        )
        hidden_gates += [Gate(f"{attn}.o_proj", -1), Gate(f"{mlp}.down_proj", -1)]
        hidden_slices += present(
            *(Slice(f"{attn}.{m}_proj.weight", 1) for m in "qkv"),
            *(Slice(f"{mlp}.{m}_proj.weight", 1) for m in ("gate", "up")),
            *(Slice(f"{name}.{p}", 0) for name in (f"{attn}.o_proj", f"{mlp}.down_proj") for p in ("weight", "bias")),
            *(Slice(f"model.layers.{i}.{n}.weight", 0) for n in ("input_layernorm", "post_attention_layernorm")),
        )
    out.append(Structure(HIDDEN, "hidden", config.hidden_size, tuple(hidden_gates), tuple(hidden_slices)))
    out.append(
        Structure(
            LAYERS,
            "layer",
            config.num_hidden_layers,
            tuple(Gate(f"model.layers.{i}", -1, 1, "delta") for i in range(config.num_hidden_layers)),
        )
    )
    return out


def _uniform(structures: list[Structure], keep: Mapping[str, Tensor], kind: str) -> int:
    counts = {len(keep[s.name]) for s in structures if s.kind == kind}
    if len(counts) != 1:
        raise ValueError(f"every layer of a Llama-style model has one {kind} count, got kept counts {sorted(counts)}")
    return counts.pop()


def prune_causal_lm(model: nn.Module, keep: Mapping[str, Tensor]) -> nn.Module:
    """A new model of ``type(model)`` with the kept units of every structure of :func:`causal_lm_structures`
    (``keep``: structure name → kept unit indices; heads are KV groups; ``"model.layers"`` the kept blocks)."""
    structures = causal_lm_structures(model)
    config = model.config
    kv = _attr(config, "num_key_value_heads", config.num_attention_heads)
    rep = config.num_attention_heads // kv
    groups = _uniform(structures, keep, "head")
    width = len(keep[HIDDEN])
    layers = keep[LAYERS].tolist()
    state = slice_state(model.state_dict(), structures, keep)
    ratio = config.hidden_size / width
    for name in list(state):
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            state[name] = state[name] * math.sqrt(ratio)
    renamed = {}
    for name, tensor in state.items():
        if name.startswith(f"{LAYERS}."):
            index, rest = name[len(LAYERS) + 1 :].split(".", 1)
            if int(index) not in layers:
                continue
            name = f"{LAYERS}.{layers.index(int(index))}.{rest}"
        renamed[name] = tensor
    new_config = type(config).from_dict(config.to_dict())
    new_config.num_key_value_heads = groups
    new_config.num_attention_heads = groups * rep
    new_config.head_dim = head_dim(config)
    new_config.intermediate_size = _uniform(structures, keep, "neuron")
    new_config.hidden_size = width
    new_config.num_hidden_layers = len(layers)
    new_config.rms_norm_eps = config.rms_norm_eps * ratio
    if getattr(new_config, "layer_types", None) is not None:
        new_config.layer_types = [config.layer_types[i] for i in layers]
    param = next(model.parameters())
    pruned = type(model)(new_config).to(dtype=param.dtype)
    missing, unexpected = pruned.load_state_dict(renamed, strict=False)
    tied = {"lm_head.weight"} if getattr(new_config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(f"pruned state does not fit the pruned model: missing {missing}, unexpected {unexpected}")
    return pruned.to(param.device).train(model.training)
