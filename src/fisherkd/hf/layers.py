"""Layer maps and tap names for intermediate-layer transfer between Hugging Face transformer models.

A student with M blocks learns from a teacher with N blocks through pairs of layers. :func:`layer_map` says which
blocks pair up; :func:`hidden_pairs`, :func:`attention_pairs` and :func:`qkv_pairs` turn those pairs into the tap
names that a method spec's ``pairs`` takes (see :mod:`fisherkd.taps`), for BERT-like models (blocks in
``encoder.layer``), GPT-2-like models (``h``) and other models whose blocks sit in one ``nn.ModuleList``::

    pairs = hidden_pairs(student, teacher, "uniform", embeddings=True) + attention_pairs(student, teacher)
    methods = [{"name": "tinybert", "pairs": pairs}]

Names come from ``model.named_modules()`` of the very objects passed in, so build the pairs on the models you
distil (a PEFT-wrapped student gives ``base_model.model.…`` names).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from torch import nn

__all__ = [
    "Strategy",
    "attention_pairs",
    "check_vocabularies",
    "find_layers",
    "hidden_pairs",
    "layer_map",
    "qkv_pairs",
    "vocab_size",
]

Strategy = Literal["uniform", "last"]
LayerPairs = Sequence[tuple[int, int]]

# Names of the block lists of common architectures, most specific first: BERT/RoBERTa/DeBERTa/ELECTRA
# (encoder.layer), GPT-2/GPT-J/Falcon (h), Llama/Mistral/Qwen/OPT (layers), DistilBERT (transformer.layer),
# ViT/BLOOM-style (layer, blocks, block).
KNOWN_LAYER_LISTS = ("encoder.layer", "transformer.layer", "h", "layers", "layer", "blocks", "block")

# Self-attention modules inside one block, relative to the block, with the output index of their attention
# probabilities: BERT (attention.self returns (context, probabilities)), GPT-2 (attn), Llama/OPT/BART
# (self_attn), DistilBERT (attention).
KNOWN_ATTENTION = ("attention.self", "attn", "self_attn", "attention", "self_attention")

# Query/key/value projections inside a self-attention module: BERT (query, key, value), Llama/OPT (q_proj, ...).
KNOWN_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"))


def layer_map(
    num_student_layers: int, num_teacher_layers: int, strategy: Strategy | LayerPairs = "uniform"
) -> list[tuple[int, int]]:
    """Pairs (student block, teacher block) of 0-based indices.

    - ``"uniform"``: TinyBERT's map (Jiao et al., Findings of EMNLP 2020), student layer m ↔ teacher layer m·N/M
      in the paper's 1-based numbering, so every student block learns from the end of an equal share of the
      teacher (M=3, N=6: (0, 1), (1, 3), (2, 5)). When N is not a multiple of M the share is rounded down.
    - ``"last"``: only the last blocks, as MiniLM v1 (Wang et al., NeurIPS 2020) does: [(M−1, N−1)].
    - a list of pairs: used as given after a range check; negative indices count from the end.
    """
    if num_student_layers < 1 or num_teacher_layers < 1:
        raise ValueError(
            f"layer counts must be positive, got student {num_student_layers}, teacher {num_teacher_layers}"
        )
    if strategy == "uniform":
        if num_student_layers > num_teacher_layers:
            raise ValueError(
                f"a uniform map needs no more student layers ({num_student_layers}) than teacher layers "
                f"({num_teacher_layers}); pass explicit pairs instead"
            )
        return [(m, (m + 1) * num_teacher_layers // num_student_layers - 1) for m in range(num_student_layers)]
    if strategy == "last":
        return [(num_student_layers - 1, num_teacher_layers - 1)]
    if isinstance(strategy, str):
        raise ValueError(f"unknown layer-map strategy {strategy!r}; use 'uniform', 'last' or a list of index pairs")
    pairs = []
    for pair in strategy:
        if len(pair) != 2:
            raise ValueError(f"a layer pair is (student index, teacher index), got {pair!r}")
        s, t = (_index(i, n, role, pair) for i, n, role in zip(pair, (num_student_layers, num_teacher_layers), "st"))
        pairs.append((s, t))
    return pairs


def _index(index: int, count: int, role: str, pair: object) -> int:
    if not -count <= index < count:
        who = "student" if role == "s" else "teacher"
        raise ValueError(f"layer pair {pair!r}: {who} index {index} is out of range for {count} layers")
    return index % count


def find_layers(model: nn.Module, layers: str | None = None) -> tuple[str, nn.ModuleList]:
    """The name and ``nn.ModuleList`` of a model's transformer blocks.

    ``layers`` names the list explicitly. Otherwise the list is found among the model's ModuleLists whose
    children all have one class: the only one, else the only one named like a known block list
    (``KNOWN_LAYER_LISTS``); anything else is an error that lists the candidates.
    """
    modules = dict(model.named_modules())
    if layers is not None:
        found = modules.get(layers)
        if not isinstance(found, nn.ModuleList):
            lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
            raise ValueError(f"{type(model).__name__} has no ModuleList {layers!r}; its ModuleLists: {lists}")
        return layers, found
    candidates = {
        name: module
        for name, module in modules.items()
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(c) for c in module}) == 1
    }
    if len(candidates) == 1:
        return next(iter(candidates.items()))
    for known in KNOWN_LAYER_LISTS:
        named = [n for n in candidates if n == known or n.endswith(f".{known}")]
        if len(named) == 1:
            return named[0], candidates[named[0]]
        if len(named) > 1:
            candidates = {n: candidates[n] for n in named}
            break
    shown = [f"{n} ({len(m)} × {type(m[0]).__name__})" for n, m in candidates.items()]
    raise ValueError(
        f"cannot tell which ModuleList holds the transformer blocks of {type(model).__name__}; "
        f"candidates: {shown or 'none'}. Name it with layers='…' (student_layers= / teacher_layers=)"
    )


def _block_pairs(
    student: nn.Module,
    teacher: nn.Module,
    mapping: Strategy | LayerPairs,
    student_layers: str | None,
    teacher_layers: str | None,
) -> list[tuple[str, str]]:
    """(student block name, teacher block name) for every pair of the layer map."""
    s_name, s_list = find_layers(student, student_layers)
    t_name, t_list = find_layers(teacher, teacher_layers)
    return [(f"{s_name}.{s}", f"{t_name}.{t}") for s, t in layer_map(len(s_list), len(t_list), mapping)]


def hidden_pairs(
    student: nn.Module,
    teacher: nn.Module,
    mapping: Strategy | LayerPairs = "uniform",
    *,
    embeddings: bool = False,
    student_layers: str | None = None,
    teacher_layers: str | None = None,
) -> list[tuple[str, str]]:
    """Tap pairs of block outputs (B×T×D hidden states) for the layer map ``mapping`` (see :func:`layer_map`).

    ``embeddings=True`` prepends the pair of embedding outputs (TinyBERT's embedding loss), tapped as the input of
    the first block (``<blocks>.0:in``): token + position embeddings for BERT and GPT-2 alike. For TinyBERT's
    ``tinybert`` method or a FitNets-style hint.
    """
    pairs = _block_pairs(student, teacher, mapping, student_layers, teacher_layers)
    if embeddings:
        # Transformers passes the hidden states to every block positionally (gradient checkpointing needs it),
        # so the first block's input is the embedding output in every architecture.
        s_blocks, t_blocks = find_layers(student, student_layers)[0], find_layers(teacher, teacher_layers)[0]
        pairs.insert(0, (f"{s_blocks}.0:in", f"{t_blocks}.0:in"))
    return pairs


def _submodule(model: nn.Module, block: str, known: Sequence[str], what: str) -> str:
    modules = dict(model.named_modules())
    for relative in known:
        if f"{block}.{relative}" in modules:
            return f"{block}.{relative}"
    children = [n for n, _ in modules[block].named_children()]
    raise ValueError(
        f"cannot find the {what} module in block {block!r} of {type(model).__name__} (looked for {list(known)}; "
        f"its children: {children}); pass explicit tap names in the method's pairs instead"
    )


def _require_eager(model: nn.Module, role: str) -> None:
    # Fused attention kernels (sdpa, flash) never form the B×H×T×T probabilities, so the tap would get None.
    implementation = getattr(getattr(model, "config", None), "_attn_implementation", None)
    if implementation not in (None, "eager"):
        raise ValueError(
            f"the {role} uses attn_implementation={implementation!r}, which does not return attention maps; build "
            "it with attn_implementation='eager' (from_pretrained(..., attn_implementation='eager'), or "
            "model.set_attn_implementation('eager'))"
        )


def attention_pairs(
    student: nn.Module,
    teacher: nn.Module,
    mapping: Strategy | LayerPairs = "uniform",
    *,
    student_layers: str | None = None,
    teacher_layers: str | None = None,
) -> list[tuple[str, str]]:
    """Tap pairs of B×H×T×T attention probabilities (``<block>.attention.self:1`` for BERT, ``<block>.attn:1``
    for GPT-2) for the layer map ``mapping``. Both models must use ``attn_implementation="eager"``.

    For ``tinybert`` (attention MSE) and ``minilm`` (attention KL), whose attention maps need equal head counts;
    with different head counts use :func:`qkv_pairs` and MiniLM's relation heads.
    """
    _require_eager(student, "student")
    _require_eager(teacher, "teacher")
    return [
        (
            f"{_submodule(student, s, KNOWN_ATTENTION, 'attention')}:1",
            f"{_submodule(teacher, t, KNOWN_ATTENTION, 'attention')}:1",
        )
        for s, t in _block_pairs(student, teacher, mapping, student_layers, teacher_layers)
    ]


def qkv_pairs(
    student: nn.Module,
    teacher: nn.Module,
    mapping: Strategy | LayerPairs = "last",
    *,
    kinds: Sequence[Literal["query", "key", "value"]] = ("query", "key", "value"),
    student_layers: str | None = None,
    teacher_layers: str | None = None,
) -> list[tuple[str, str]]:
    """Tap pairs of B×T×D query/key/value vectors for MiniLM's self-attention relation loss (``minilm`` with
    3-D pairs): MiniLM v1 uses the values of the last layers, MiniLMv2 (Wang et al., Findings of ACL 2021) the
    queries, keys and values, where widths and head counts may differ. Needs separate projections (BERT's
    ``query``/``key``/``value``, Llama's ``q_proj``/…); GPT-2's fused ``c_attn`` has none.
    """
    position = {"query": 0, "key": 1, "value": 2}
    pairs = []
    for s_block, t_block in _block_pairs(student, teacher, mapping, student_layers, teacher_layers):
        names = []
        for model, block in ((student, s_block), (teacher, t_block)):
            attention = _submodule(model, block, KNOWN_ATTENTION, "attention")
            modules = dict(model.named_modules())
            for triple in KNOWN_QKV:
                if all(f"{attention}.{n}" in modules for n in triple):
                    names.append([f"{attention}.{triple[position[k]]}" for k in kinds])
                    break
            else:
                raise ValueError(
                    f"{type(model).__name__}: attention module {attention!r} has no separate query/key/value "
                    f"projections (looked for {KNOWN_QKV}); tap them by name in the method's pairs instead"
                )
        pairs.extend(zip(*names))
    return pairs


def vocab_size(model: nn.Module) -> int:
    """Rows of the model's output embedding (the real logit width, which may exceed ``config.vocab_size``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)


def check_vocabularies(student: nn.Module, teacher: nn.Module, vocab_truncation: bool = False) -> None:
    """Raise a ValueError when a causal-LM student and teacher have different vocabulary sizes.

    Token-level distillation compares distributions over the same tokens. ``vocab_truncation=True`` allows
    different sizes when they share a tokenizer and one embedding matrix is only padded (the token loss then
    scores the first min(V_s, V_t) entries); with different tokenizers the comparison is meaningless.
    """
    v_s, v_t = vocab_size(student), vocab_size(teacher)
    if v_s != v_t and not vocab_truncation:
        raise ValueError(
            f"student vocabulary size {v_s} differs from teacher vocabulary size {v_t}; token-level distillation "
            "needs one tokenizer. If they share it and one embedding matrix is only padded, set "
            "token_loss vocab_truncation=True to compare the first min(V_s, V_t) entries"
        )
