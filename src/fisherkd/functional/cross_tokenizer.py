"""Distillation losses between models whose vocabularies differ, on aligned rows of logits.

Row r compares the student's logits ``student_logits[student_rows[r]]`` [V_s] with the teacher's
``teacher_logits[teacher_rows[r]]`` [V_t] (logits of any leading shape are viewed as [N, V]; without rows, row r
of each). :func:`fisherkd.hf.alignment.align_texts` gives rows where both models predict the continuation of
the same text. p = softmax(z/τ); no τ² factor (neither ULD nor GOLD uses one).

ULD (Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs",
arXiv 2402.12030). A Wasserstein-1 distance between the two distributions when the cost of moving mass between
any two different tokens is the same: with both probability vectors sorted in decreasing order and the shorter
one padded with zeros,

    ULD(p_s, p_t) = Σ_i |sort(p_s)_i − sort(p_t)_i|.

It needs no correspondence between the vocabularies and is 0 exactly when one vector is a permutation of the
other. The authors' code (Nicolas-BZRD/llm-recipes) weighs it by λ = 1.5 (``distil_factor``) beside the
cross-entropy (weight 1), uses temperature 1 for both models and sorts the full vocabularies (no top-k); it
pairs answer tokens by position and averages over each sequence, then over the batch. ``top_k`` here keeps the
k largest entries of each side (a cheaper partial sort) and drops the rest.

Span-aligned KL (GOLD's hybrid loss in TRL: ``GOLDTrainer`` with ``uld_use_hybrid_loss=True``, off by default;
tokens are paired by exact normalised strings, where MinED would also pair near-identical ones). Given ``K``
pairs (``student_ids[k]``, ``teacher_ids[k]``) of tokens with the same string
(:func:`fisherkd.hf.alignment.vocab_map`), each side's distribution is folded onto K + 1 outcomes: the shared
tokens and one *rest* bucket holding that side's mass on its unshared tokens,
q = (p[ids_1], …, p[ids_K], 1 − Σ_k p[ids_k]). Then

    span_kl = w_m·KL(q_t ‖ q_s) + w_u·ULD(p_s[unshared_s], p_t[unshared_t]),

the second term being the sorted L1 above on the unshared probabilities as they are (not renormalised). TRL's
defaults: the weights are adaptive, w_m = K / V_t (V_t the teacher's logit width) and w_u = 1 − w_m, unless
both are given (``uld_hybrid_matched_weight`` / ``uld_hybrid_unmatched_weight``, default None); the loss is
scaled by ``uld_distillation_weight`` = 1 with ``uld_crossentropy_weight`` = 0; temperatures 1; EOS skipped.
TRL compares the shared tokens with a generalized JSD (β = 0.5) on the restricted, unnormalised probabilities
and pairs tokens by identical strings; here it is the exact forward KL on the K + 1 outcomes (a distribution on
both sides) and strings are normalised first. With identical vocabularies (every id shared, nothing in the
rest buckets) span_kl is the ordinary KL(p_t ‖ p_s). A student with no unshared token while the teacher has
some would make the KL infinite (its rest bucket is empty): that is refused.

Memory and gradients. Rows are processed ``chunk_size`` at a time, as in :mod:`fisherkd.hf.token_losses`: each
chunk gathers its rows, computes the loss and its closed-form gradient with respect to the student logits,
adds that into one gradient buffer of the logits' shape and dtype, and is freed; backward only scales the
buffer. So [rows × V] tensors are never held for all rows at once. By default a chunk holds as many rows as
make 8 MiB fp32 [chunk × max(V_s, V_t)] work tensors. Write h = p_s ⊙ ∂ℓ/∂p_s; then ∂ℓ/∂z_s = (h − p_s·Σ_c h_c)/τ.
For the sorted L1, ∂ℓ/∂p_s is the sign of each sorted difference, put back at the entry's vocabulary index
(+1 on a tail entry compared with padding). For KL(q_t ‖ q_s), h = −q_t,k on the shared token k and
h = −q_t,rest·p_s,c/q_s,rest on an unshared token c.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = ["span_kl_loss", "uld_loss"]

# fp32 [chunk × V] work tensors of 8 MiB each by default (fisherkd.hf.token_losses.chunk_rows explains why bytes)
CHUNK_BYTES = 8 << 20
# log 0 raised to this so that an empty rest bucket contributes 0·finite = 0, not 0·(−inf) = NaN
LOG_FLOOR = -1e30

# (student rows [n, V_s], teacher rows [n, V_t], need gradient) → (per-row loss [n], ∂loss/∂student rows or None)
RowFn = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]


# ----------------------------------------------------------------------------------------------------------
# Per-row pieces


def _log_softmax(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ) in fp32 at least (bf16/fp16 lose the small probabilities)."""
    z = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    return torch.log_softmax(z / temperature if temperature != 1.0 else z, dim=-1)


def _sorted(p: Tensor, k: int | None) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row in decreasing order, and their indices (all entries when k is None)."""
    if k is None or k >= p.shape[-1]:
        return torch.sort(p, dim=-1, descending=True)
    return torch.topk(p, k, dim=-1, sorted=True)


def sorted_l1(p_s: Tensor, p_t: Tensor, top_k: int | None, want_grad: bool) -> tuple[Tensor, Tensor | None]:
    """Σ_i |sort(p_s)_i − sort(p_t)_i| per row (the shorter side padded with zeros), and ∂/∂p_s [n, V_s]."""
    s_val, s_idx = _sorted(p_s, top_k)
    t_val, _ = _sorted(p_t, top_k)
    m = min(s_val.shape[-1], t_val.shape[-1])
    diff = s_val[:, :m] - t_val[:, :m]
    # against the zero padding |x| = x: probabilities are non-negative
    value = diff.abs().sum(-1) + s_val[:, m:].sum(-1) + t_val[:, m:].sum(-1)
    if not want_grad:
        return value, None
    sign = torch.cat([diff.sign(), s_val[:, m:].sign()], dim=-1)
    return value, torch.zeros_like(p_s).scatter_(-1, s_idx, sign)


def _softmax_backward(h: Tensor, p_s: Tensor, temperature: float) -> Tensor:
    """(h − p_s·Σ_c h_c)/τ in place in h: the gradient through softmax(z/τ) (module docstring)."""
    return h.addcmul_(p_s, h.sum(-1, keepdim=True), value=-1.0).div_(temperature)


# ----------------------------------------------------------------------------------------------------------
# Rows, chunks and the autograd function


class _ChunkedRows(torch.autograd.Function):
    """Σ_r w_r·ℓ_r over aligned rows, computed ``chunk`` rows at a time; the gradient with respect to the
    student logits is accumulated during the forward pass and handed over by the backward pass (once)."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        teacher: Tensor,
        s_rows: Tensor,
        t_rows: Tensor,
        weight: Tensor,
        row_fn: RowFn,
        chunk: int,
        want_grad: bool,
    ) -> Tensor:
        grad = torch.zeros_like(student) if want_grad else None
        total = torch.zeros((), dtype=weight.dtype, device=student.device)
        for start in range(0, s_rows.numel(), chunk):
            r_s, r_t, w = (x[start : start + chunk] for x in (s_rows, t_rows, weight))
            loss, g = row_fn(student[r_s], teacher[r_t], want_grad)
            total += (w * loss).sum()
            if grad is not None and g is not None:
                # index_add_, not assignment: one student row may be paired more than once
                grad.index_add_(0, r_s, g.mul_(w.unsqueeze(-1)).to(grad.dtype))
        ctx.grad = grad
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "the chunked cross-tokenizer loss computes its gradient once, in the forward pass; backward "
                "through it a second time (retain_graph=True) is not supported"
            )
        ctx.grad = None
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None, None


def _flat_rows(logits: Tensor, rows: Tensor | None, name: str) -> tuple[Tensor, Tensor | None]:
    if logits.dim() < 2:
        raise ValueError(f"{name} logits must be [..., V], got shape {tuple(logits.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    if rows is None:
        return flat, None
    if rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}_rows must be a 1-D integer tensor, got {rows.dtype} of shape {tuple(rows.shape)}")
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= flat.shape[0]):
        raise ValueError(
            f"{name}_rows must index the {flat.shape[0]} rows of the {name} logits viewed as [N, V]; "
            f"got values in [{int(rows.min())}, {int(rows.max())}]"
        )
    return flat, rows.to(device=logits.device, dtype=torch.long)


def _aligned_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_rows: Tensor | None,
    teacher_rows: Tensor | None,
    sample_weight: Tensor | None,
    reduction: str,
    chunk_size: int | None,
    row_fn: RowFn,
) -> Tensor:
    """Σ_r w_r·ℓ_r (/ number of rows for ``mean``) with the chunked autograd function."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    student, s_rows = _flat_rows(student_logits, student_rows, "student")
    teacher, t_rows = _flat_rows(teacher_logits.detach(), teacher_rows, "teacher")
    if (s_rows is None) != (t_rows is None):
        raise ValueError("give both student_rows and teacher_rows, or neither (then row r of each is paired)")
    if s_rows is None or t_rows is None:
        if student.shape[0] != teacher.shape[0]:
            raise ValueError(
                f"without rows, student and teacher logits must have as many rows: {student.shape[0]} against "
                f"{teacher.shape[0]}; pass student_rows and teacher_rows (e.g. from align_texts) to pair them"
            )
        s_rows = t_rows = torch.arange(student.shape[0], device=student.device)
    if s_rows.numel() != t_rows.numel():
        raise ValueError(f"student_rows has {s_rows.numel()} entries but teacher_rows has {t_rows.numel()}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    n = s_rows.numel()
    if sample_weight is None:
        weight = torch.ones(n, dtype=dtype, device=student.device)
    else:
        if sample_weight.numel() != n:
            raise ValueError(f"sample_weight has {sample_weight.numel()} entries for {n} aligned rows")
        weight = sample_weight.detach().flatten().to(device=student.device, dtype=dtype)
    if reduction == "mean":
        weight = weight / max(n, 1)
    if chunk_size is None:
        chunk = max(1, CHUNK_BYTES // (4 * max(student.shape[1], teacher.shape[1])))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, or None for 8 MiB chunks; got {chunk_size!r}")
    else:
        chunk = chunk_size
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedRows.apply(student, teacher, s_rows, t_rows, weight, row_fn, chunk, want_grad)


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")


# ----------------------------------------------------------------------------------------------------------
# The losses


def uld_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    student_rows: Tensor | None = None,
    teacher_rows: Tensor | None = None,
    top_k: int | None = None,
    sample_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Universal Logit Distillation (Boizard et al. 2024): mean over aligned rows of
    Σ_i |sort(p_s)_i − sort(p_t)_i|, p = softmax(z/τ), sorted decreasingly, the shorter vector padded with zeros.

    Logits [..., V_s] and [..., V_t] (any float dtype; computed in fp32 at least), paired row by row or through
    ``student_rows`` / ``teacher_rows`` (indices into the logits viewed as [N, V], e.g. ``TextAlignment.*_rows``).
    ``top_k`` compares only the k largest probabilities of each side. ``sample_weight`` weighs the rows (mean
    1 keeps the scale); ``reduction="sum"`` drops the division by the number of rows. Values lie in [0, 2].
    The authors' defaults: τ = 1, no top-k, loss weight λ = 1.5 beside the cross-entropy (module docstring).
    """
    _check_temperature(temperature)
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None (full vocabularies), got {top_k!r}")

    def row_fn(z_s: Tensor, z_t: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        p_s = _log_softmax(z_s, temperature).exp_()
        p_t = _log_softmax(z_t, temperature).exp_().to(p_s.dtype)
        value, g = sorted_l1(p_s, p_t, top_k, want_grad)
        del p_t
        if g is None:
            return value, None
        return value, _softmax_backward(g.mul_(p_s), p_s, temperature)

    return _aligned_loss(
        student_logits, teacher_logits, student_rows, teacher_rows, sample_weight, reduction, chunk_size, row_fn
    )


def _check_ids(ids: Tensor, vocab: int, name: str) -> Tensor:
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} must lie in [0, {vocab}) (the logits' width); got [{int(ids.min())}, {int(ids.max())}]"
        )
    if ids.unique().numel() != ids.numel():
        raise ValueError(f"{name} has repeated ids; the shared support pairs tokens one to one (see vocab_map)")
    return ids.long()


def _rest(ids: Tensor, vocab: int) -> Tensor:
    """The ids of a vocabulary of width ``vocab`` that are not in ``ids``."""
    unshared = torch.ones(vocab, dtype=torch.bool, device=ids.device)
    unshared[ids] = False
    return unshared.nonzero().squeeze(1)


def span_kl_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_ids: Tensor,
    teacher_ids: Tensor,
    temperature: float = 1.0,
    *,
    matched_weight: float | None = None,
    unmatched_weight: float | None = None,
    student_rows: Tensor | None = None,
    teacher_rows: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Span-aligned KL (GOLD's hybrid loss): mean over aligned rows of
    w_m·KL(q_t ‖ q_s) + w_u·ULD(p_s[unshared], p_t[unshared]) (module docstring).

    ``student_ids[k]`` ↔ ``teacher_ids[k]`` are the shared tokens (``VocabMap.student_ids`` / ``teacher_ids``);
    q folds each side's distribution onto those K tokens plus one rest bucket for its other tokens. The weights
    default to TRL's adaptive ones, w_m = K / V_t and w_u = 1 − w_m; give both or neither. Rows, ``sample_weight``,
    ``reduction`` and ``chunk_size`` as in :func:`uld_loss`.
    """
    _check_temperature(temperature)
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    device = student_logits.device
    s_ids = _check_ids(student_ids.to(device), v_s, "student_ids")
    t_ids = _check_ids(teacher_ids.to(device), v_t, "teacher_ids")
    if s_ids.numel() != t_ids.numel():
        raise ValueError(f"student_ids has {s_ids.numel()} entries but teacher_ids has {t_ids.numel()}; they pair up")
    if (matched_weight is None) != (unmatched_weight is None):
        raise ValueError("give both matched_weight and unmatched_weight, or neither for the adaptive K/V_t, 1 − K/V_t")
    if matched_weight is None or unmatched_weight is None:
        matched_weight = s_ids.numel() / v_t
        unmatched_weight = 1.0 - matched_weight
    s_rest, t_rest = _rest(s_ids, v_s), _rest(t_ids, v_t)
    if s_rest.numel() == 0 and t_rest.numel() > 0:
        raise ValueError(
            f"every student token is shared but {t_rest.numel()} teacher tokens are not: the student cannot put "
            "mass on the teacher's rest bucket, so KL(q_t ‖ q_s) is infinite; use uld_loss, or pass logits that "
            "include the student's unshared tokens"
        )
    k = s_ids.numel()
    w_m, w_u = float(matched_weight), float(unmatched_weight)

    def row_fn(z_s: Tensor, z_t: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        log_p_s = _log_softmax(z_s, temperature)
        log_p_t = _log_softmax(z_t, temperature).to(log_p_s.dtype)
        # log q: the shared tokens, then the rest bucket as a log-sum-exp (exact where 1 − Σ would cancel)
        log_q_s = torch.cat([log_p_s[:, s_ids], log_p_s[:, s_rest].logsumexp(-1, keepdim=True)], -1)
        log_q_t = torch.cat([log_p_t[:, t_ids], log_p_t[:, t_rest].logsumexp(-1, keepdim=True)], -1)
        log_q_s.clamp_min_(LOG_FLOOR)
        log_q_t.clamp_min_(LOG_FLOOR)
        q_t = log_q_t.exp()
        kl = (q_t * (log_q_t - log_q_s)).sum(-1)
        p_s = log_p_s.exp()
        p_s_rest = p_s[:, s_rest]
        uld, g = sorted_l1(p_s_rest, log_p_t[:, t_rest].exp_(), None, want_grad)
        value = w_m * kl + w_u * uld
        if g is None:
            return value, None
        h = torch.zeros_like(p_s)
        h[:, s_ids] = -w_m * q_t[:, :k]
        # p_s,c/q_s,rest on the unshared tokens, as exp(log p_s,c − log q_s,rest) (bounded by 1)
        ratio = (log_p_s[:, s_rest] - log_q_s[:, k:]).exp_()
        h[:, s_rest] = ratio.mul_(q_t[:, k:]).mul_(-w_m).add_(g.mul_(p_s_rest).mul_(w_u))
        return value, _softmax_backward(h, p_s, temperature)

    return _aligned_loss(
        student_logits, teacher_logits, student_rows, teacher_rows, sample_weight, reduction, chunk_size, row_fn
    )
