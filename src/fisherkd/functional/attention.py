"""Attention / sequence distillation losses on transformer hidden states, attention maps and Q/K/V vectors.

Shapes: hidden states and Q/K/V vectors are B×T×D; attention maps are B×H×T×T (batch, heads, queries, keys).
``mask`` is B×T with 1 for a valid token and 0 for padding: padded queries are left out of every average and
padded keys get no weight (zero probability). Optional importance weights, each with mean 1 so the authors'
loss weights stay valid: ``head_weight`` [H] per head and ``token_weight`` B×T per token (per query for
attention maps). ``None`` means unweighted, and all-ones weights give exactly the unweighted value.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from fisherkd.functional.logits import _float32

__all__ = ["minilm_attention_kl", "minilm_relation_kl", "tinybert_attention", "tinybert_hidden"]

# TinyBERT's reference code zeroes attention scores ≤ −100: the additive padding mask (−10000, or dtype.min, or
# −inf) would otherwise dominate the MSE with entries that carry no information.
MASKED_SCORE = -1e2


_KINDS = {3: "hidden states B×T×D", 4: "attention maps B×H×T×T"}
_HINTS = {
    3: "project the student to the teacher's width first (the method's adapter does)",
    4: "attention maps need equal head counts and lengths; for different head counts use MiniLM relation heads "
    "(minilm_relation_kl on query/key/value vectors, method 'minilm' with 3-D pairs)",
}


def _check_pair(name: str, student: Tensor, teacher: Tensor, ndim: int) -> None:
    if student.dim() != ndim or teacher.dim() != ndim:
        raise ValueError(
            f"{name}: expected {_KINDS[ndim]}, got student {tuple(student.shape)} and teacher {tuple(teacher.shape)}"
        )
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student {tuple(student.shape)} and teacher {tuple(teacher.shape)} differ; {_HINTS[ndim]}"
        )


def _query_weights(
    name: str,
    shape: tuple[int, int, int],
    like: Tensor,
    mask: Tensor | None,
    head_weight: Tensor | None,
    token_weight: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Weights w[b,h,q] = mask[b,q]·token_weight[b,q]·head_weight[h] (B×H×T) and the valid-token mask (B×T)."""
    batch, heads, length = shape
    expected = {"mask": (mask, (batch, length)), "token_weight": (token_weight, (batch, length))}
    expected["head_weight"] = (head_weight, (heads,))
    for label, (value, size) in expected.items():
        if value is not None and tuple(value.shape) != size:
            raise ValueError(f"{name}: {label} has shape {tuple(value.shape)}, expected {size}")
    valid = like.new_ones(batch, length) if mask is None else mask.to(like.dtype)
    weight = valid if token_weight is None else valid * token_weight.to(like.dtype)
    weight = weight[:, None, :].expand(batch, heads, length)
    if head_weight is not None:
        weight = weight * head_weight.to(like.dtype)[None, :, None]
    return weight, valid


def _kl_per_query(
    name: str,
    log_p_student: Tensor,
    log_p_teacher: Tensor,
    mask: Tensor | None,
    head_weight: Tensor | None,
    token_weight: Tensor | None,
) -> Tensor:
    """Mean over valid (b, h, q) of w·KL(p_t[b,h,q,:] ‖ p_s[b,h,q,:]) from finite B×H×T×T log-probabilities."""
    # Callers keep the logs finite (clamped or masked with dtype.min, never −inf): 0·(−inf) would give NaN.
    kl = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)
    weight, valid = _query_weights(name, kl.shape, kl, mask, head_weight, token_weight)
    return (weight * kl).sum() / (kl.shape[1] * valid.sum()).clamp_min(1)


def tinybert_hidden(
    student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None, *, token_weight: Tensor | None = None
) -> Tensor:
    """Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding" (Findings of EMNLP 2020).

    Hidden-state (and embedding) loss MSE(H_s·W_h, H_t) on B×T×D tensors; the learned projection W_h is applied
    before this function (the method's adapter). Mean over valid tokens and the D features:
    Σ_{b,t} m_bt·w_bt·Σ_d (h_s − h_t)² / (D·Σ m). Without a mask this is ``F.mse_loss`` (the authors' loss).
    """
    _check_pair("tinybert_hidden", student_hidden, teacher_hidden, 3)
    s, t = _float32(student_hidden), _float32(teacher_hidden)
    batch, length, width = s.shape
    weight, valid = _query_weights("tinybert_hidden", (batch, 1, length), s, mask, None, token_weight)
    return (weight[:, 0] * (s - t).pow(2).sum(-1)).sum() / (width * valid.sum()).clamp_min(1)


def tinybert_attention(
    student_attention: Tensor,
    teacher_attention: Tensor,
    mask: Tensor | None = None,
    *,
    head_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """Jiao et al., "TinyBERT" (Findings of EMNLP 2020): attention loss (1/h) Σ_h MSE(A_s,h, A_t,h).

    ``student_attention`` and ``teacher_attention`` are B×H×T×T maps of the same kind: either the pre-softmax
    scores QKᵀ/√d (+ additive mask) the authors use, or the post-softmax probabilities that Transformers returns.
    As in the reference code, entries ≤ −100 (masked or −inf scores) are set to 0 first; with ``mask``, padded
    queries and keys are left out too. The result is the mean over valid (b, h, q, k) entries,
    Σ w_h·w_bq·(a_s − a_t)² / (H·Σ_b n_b²) with n_b valid tokens, i.e. ``F.mse_loss`` without a mask.
    Head counts must match; for different head counts use MiniLM's relation heads (``minilm_relation_kl``).
    """
    _check_pair("tinybert_attention", student_attention, teacher_attention, 4)
    s, t = _float32(student_attention), _float32(teacher_attention)
    s = torch.where(s <= MASKED_SCORE, 0.0, s)
    t = torch.where(t <= MASKED_SCORE, 0.0, t)
    batch, heads, length = s.shape[:3]
    squared = (s - t).pow(2)
    if mask is not None:
        squared = squared * mask.to(squared.dtype)[:, None, None, :]  # padded keys
    weight, valid = _query_weights("tinybert_attention", (batch, heads, length), s, mask, head_weight, token_weight)
    return (weight * squared.sum(-1)).sum() / (heads * valid.sum(-1).pow(2).sum()).clamp_min(1)


def minilm_attention_kl(
    student_attention: Tensor,
    teacher_attention: Tensor,
    mask: Tensor | None = None,
    *,
    head_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """Wang et al., "MiniLM: Deep Self-Attention Distillation" (NeurIPS 2020): self-attention distribution loss.

    Inputs are attention *probabilities* B×H×T×T (rows sum to 1; Transformers' eager attention returns them).
    Loss: mean over valid (b, h, q) of w_h·w_bq·KL(A_t[b,h,q,:] ‖ A_s[b,h,q,:]). With ``mask``, padded keys are
    zeroed and every row renormalized, so they have exactly zero probability. Head counts must match (MiniLM
    v1); with different head counts use ``minilm_relation_kl`` (MiniLMv2 relation heads).
    """
    _check_pair("minilm_attention_kl", student_attention, teacher_attention, 4)
    s, t = _float32(student_attention), _float32(teacher_attention)
    tiny = torch.finfo(s.dtype).tiny
    if mask is not None:
        keys = mask.to(s.dtype)[:, None, None, :]
        # The clamp keeps fully padded rows (excluded from the mean anyway) from producing 0/0.
        s = s * keys / (s * keys).sum(-1, keepdim=True).clamp_min(tiny)
        t = t * keys / (t * keys).sum(-1, keepdim=True).clamp_min(tiny)
    # Clamping before the log keeps it finite: a student probability that underflowed to 0 gives a large KL, not inf.
    log_s, log_t = s.clamp_min(tiny).log(), t.clamp_min(tiny).log()
    return _kl_per_query("minilm_attention_kl", log_s, log_t, mask, head_weight, token_weight)


def _relation_log_probs(vectors: Tensor, num_heads: int, mask: Tensor | None) -> Tensor:
    """log softmax(A_r A_rᵀ / √d_r) per relation head r: B×T×D → B×R×T×T."""
    batch, length, width = vectors.shape
    head_size = width // num_heads
    heads = vectors.reshape(batch, length, num_heads, head_size).transpose(1, 2)
    scores = heads @ heads.transpose(-1, -2) / math.sqrt(head_size)
    if mask is not None:
        # dtype.min rather than −inf: padded keys still get exactly zero probability, fully padded rows
        # (excluded later) stay finite, and the KL never sees 0·(−inf).
        scores = scores.masked_fill(~mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
    return torch.log_softmax(scores, dim=-1)


def minilm_relation_kl(
    student_vectors: Tensor,
    teacher_vectors: Tensor,
    num_relation_heads: int,
    mask: Tensor | None = None,
    *,
    head_weight: Tensor | None = None,
    token_weight: Tensor | None = None,
) -> Tensor:
    """Self-attention relation loss of MiniLM (value relation, NeurIPS 2020) and MiniLMv2 (Wang et al., "MiniLMv2:
    Multi-Head Self-Attention Relation Distillation", Findings of ACL 2021).

    Both B×T×D vectors (queries, keys or values; D may differ between student and teacher) are split into R
    relation heads of size d_r = D/R regardless of the models' own head counts, and per head
    R = softmax(A_r A_rᵀ / √d_r) (each model with its own d_r). Loss: mean over valid (b, r, q) of
    w_r·w_bq·KL(R_t[b,r,q,:] ‖ R_s[b,r,q,:]); padded keys get zero probability. ``head_weight`` has shape [R].
    """
    name = "minilm_relation_kl"
    if (
        student_vectors.dim() != 3
        or teacher_vectors.dim() != 3
        or student_vectors.shape[:2] != teacher_vectors.shape[:2]
    ):
        raise ValueError(
            f"{name}: expected B×T×D vectors with equal B and T (D may differ), got student "
            f"{tuple(student_vectors.shape)} and teacher {tuple(teacher_vectors.shape)}"
        )
    for role, width in (("student", student_vectors.shape[-1]), ("teacher", teacher_vectors.shape[-1])):
        if num_relation_heads < 1 or width % num_relation_heads:
            raise ValueError(
                f"{name}: {role} width {width} is not divisible by num_relation_heads="
                f"{num_relation_heads}; pick a common divisor of both widths"
            )
    log_s = _relation_log_probs(_float32(student_vectors), num_relation_heads, mask)
    log_t = _relation_log_probs(_float32(teacher_vectors), num_relation_heads, mask)
    return _kl_per_query(name, log_s, log_t, mask, head_weight, token_weight)
