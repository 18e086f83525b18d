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

DSKD (Zhang et al. 2024, "Dual-Space Knowledge Distillation for Large Language Models", EMNLP; code
songmzhang/DSKD). KD between the two models' *spaces* rather than their vocabularies: each model's last hidden
state is projected into the other's space and scored by the other's (frozen) LM head. For a pair r with student
hidden state h_s, teacher hidden state h_t, the student's and teacher's logits z_s, z_t and the student's next
token y (its label), and trainable projectors P_st: d_s → d_t and P_ts: d_t → d_s,

    u = W_t·P_st(h_s)   (the student's state read by the teacher's head, [V_t])
    v = W_s·P_ts(h_t)   (the teacher's state read by the student's head, [V_s]; W_s without gradient)
    dskd = KL(p_t ‖ softmax(u/τ)) + m·KL(sg(softmax(v/τ)) ‖ p_s) + CE(softmax(v), y),

p = softmax(z/τ), sg stopping the gradient, m = 1[argmax v = y] (``correct_only``) or 1. The first term is KD
in the teacher's space (it trains P_st and, through h_s, the student); the second is KD in the student's space
towards the teacher's projected distribution (it trains the student's logits); the third, at temperature 1,
trains P_ts so that the projected teacher predicts the ground truth and is a sensible target. The authors'
defaults (code/criterions, scripts, configs/projector_config.json): forward KL for both KD terms, τ = 2 on
both sides of both KLs (``--kd-temperature 2.0`` in every script; no τ²), the three terms summed with weight 1
each, total = (1 − 0.5)·CE(student) + 0.5·dskd (``kd_rate`` 0.5), summed over tokens and divided by the number
of target tokens; projectors one ``nn.Linear`` each way (with bias), trained with their own learning rate
(1e-3) beside the student's; the teacher's and student's heads are used through their weights only. For
different vocabularies the authors pair tokens by cross-model attention (DSKD-CMA, a third trained projector
"query" over token embeddings), and ``m`` (score the student-space KD only where the projected teacher
predicts the label) comes from that code. Here tokens are paired by text instead: one (student position,
teacher position) pair per aligned span, as for ULD and span_kl — this is our reading, not the authors' CMA.
With identity projectors, one hidden size, one head W_s = W_t and logits z = W·h, u = z_s and v = z_t, so
dskd = 2·KL(p_t ‖ p_s) + CE(softmax(z_t), y) (m = 1).

Memory and gradients. Rows are processed ``chunk_size`` at a time, as in :mod:`fisherkd.hf.token_losses`: each
chunk gathers its rows, computes the loss and its closed-form gradient with respect to the student logits,
adds that into one gradient buffer of the logits' shape and dtype, and is freed; backward only scales the
buffer. So [rows × V] tensors are never held for all rows at once. By default a chunk holds as many rows as
make 8 MiB fp32 [chunk × max(V_s, V_t)] work tensors. Write h = p_s ⊙ ∂ℓ/∂p_s; then ∂ℓ/∂z_s = (h − p_s·Σ_c h_c)/τ.
For the sorted L1, ∂ℓ/∂p_s is the sign of each sorted difference, put back at the entry's vocabulary index
(+1 on a tail entry compared with padding). For KL(q_t ‖ q_s), h = −q_t,k on the shared token k and
h = −q_t,rest·p_s,c/q_s,rest on an unshared token c. :func:`dskd_loss` works the same way with three buffers:
∂/∂z_s (m·(p_s − q)/τ), and ∂/∂ of the projected hidden states [pairs × d] ((softmax(u/τ) − p_t)/τ and
softmax(v) − onehot(y), each multiplied by its head), which autograd carries into the projectors and, for
P_st(h_s), the student; the projected logits u and v exist one chunk at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

from fisherkd.functional.saved_gradients import scaled_saved_gradients

__all__ = ["dskd_loss", "span_kl_loss", "uld_loss"]

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
        ctx.grads = (grad,)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        (grad,) = scaled_saved_gradients(ctx, grad_output, "the chunked cross-tokenizer loss")
        return grad, None, None, None, None, None, None, None


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


def _pair_rows(
    student_logits: Tensor, teacher_logits: Tensor, student_rows: Tensor | None, teacher_rows: Tensor | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The logits viewed as [N, V] (the teacher's detached) and the paired row indices (row r of each without)."""
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
    return student, teacher, s_rows, t_rows


def _row_weights(sample_weight: Tensor | None, n: int, reduction: str, student: Tensor) -> Tensor:
    """Each row's weight in the sum (fp32 at least): ``sample_weight`` or 1, divided by n for ``mean``."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    dtype = torch.promote_types(student.dtype, torch.float32)
    if sample_weight is None:
        weight = torch.ones(n, dtype=dtype, device=student.device)
    else:
        if sample_weight.numel() != n:
            raise ValueError(f"sample_weight has {sample_weight.numel()} entries for {n} aligned rows")
        weight = sample_weight.detach().flatten().to(device=student.device, dtype=dtype)
    return weight / max(n, 1) if reduction == "mean" else weight


def _chunk_rows(chunk_size: int | None, widest: int) -> int:
    if chunk_size is None:
        return max(1, CHUNK_BYTES // (4 * widest))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of rows, or None for 8 MiB chunks; got {chunk_size!r}")
    return chunk_size


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
    student, teacher, s_rows, t_rows = _pair_rows(student_logits, teacher_logits, student_rows, teacher_rows)
    weight = _row_weights(sample_weight, s_rows.numel(), reduction, student)
    chunk = _chunk_rows(chunk_size, max(student.shape[1], teacher.shape[1]))
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


def _check_ids(ids: Tensor, vocab: int, name: str, unique: bool = True) -> Tensor:
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name} must be a 1-D integer tensor, got {ids.dtype} of shape {tuple(ids.shape)}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise ValueError(
            f"{name} must lie in [0, {vocab}) (the logits' width); got [{int(ids.min())}, {int(ids.max())}]"
        )
    if unique and ids.unique().numel() != ids.numel():
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


# ----------------------------------------------------------------------------------------------------------
# DSKD: KD in each model's space through projected hidden states


def _read(hidden: Tensor, head: Tensor, dtype: torch.dtype) -> Tensor:
    """Logits ``hidden @ head.T`` [c, V], the product in the head's dtype (no fp32 copy of a [V × d] matrix)."""
    return (hidden.to(head.dtype) @ head.T).to(dtype)


def _back(grad: Tensor, head: Tensor, like: Tensor) -> Tensor:
    """∂/∂hidden [c, d] of ``hidden @ head.T`` given ∂/∂logits [c, V]."""
    return (grad.to(head.dtype) @ head).to(like.dtype)


class _DualSpaceRows(torch.autograd.Function):
    """Σ_r w_r·dskd_r over the pairs, ``chunk`` pairs at a time (module docstring). The gradients with respect to
    the student logits [N, V_s] and the projected hidden states [P, d_t] and [P, d_s] are computed in closed form
    during the forward pass, so that no [pairs × V] tensor outlives its chunk; autograd carries the last two into
    the projectors and the student."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        student: Tensor,
        teacher: Tensor,
        to_teacher: Tensor,
        to_student: Tensor,
        student_head: Tensor,
        teacher_head: Tensor,
        s_rows: Tensor,
        t_rows: Tensor,
        targets: Tensor,
        weight: Tensor,
        temperature: float,
        correct_only: bool,
        chunk: int,
        want: tuple[bool, bool, bool],
    ) -> Tensor:
        dtype = weight.dtype
        g_student = torch.zeros_like(student) if want[0] else None
        g_teacher_space = torch.zeros_like(to_teacher) if want[1] else None
        g_student_space = torch.zeros_like(to_student) if want[2] else None
        total = torch.zeros((), dtype=dtype, device=student.device)
        for start in range(0, s_rows.numel(), chunk):
            rows = slice(start, start + chunk)
            r_s, r_t, y, w = s_rows[rows], t_rows[rows], targets[rows], weight[rows]
            # teacher's space: KL(p_t ‖ softmax(u/τ)); ∂/∂u = (softmax(u/τ) − p_t)/τ
            log_p_u = _log_softmax(_read(to_teacher[rows], teacher_head, dtype), temperature)
            log_p_t = _log_softmax(teacher[r_t], temperature).to(dtype).clamp_min_(LOG_FLOOR)
            p_t = log_p_t.exp()
            value = (p_t * (log_p_t - log_p_u)).sum(-1)
            if g_teacher_space is not None:
                g = log_p_u.exp_().sub_(p_t).mul_((w / temperature).unsqueeze(-1))
                g_teacher_space[rows] = _back(g, teacher_head, to_teacher)
            del log_p_u, log_p_t, p_t
            # student's space: m·KL(sg(q) ‖ p_s), q = softmax(v/τ); ∂/∂z_s = m·(p_s − q)/τ
            v = _read(to_student[rows], student_head, dtype)
            log_q = _log_softmax(v, temperature).clamp_min_(LOG_FLOOR)
            log_p_s = _log_softmax(student[r_s], temperature).to(dtype)
            q = log_q.exp()
            mask = (v.argmax(-1) == y).to(dtype) if correct_only else torch.ones_like(w)
            value += mask * (q * (log_q - log_p_s)).sum(-1)
            if g_student is not None:
                g = log_p_s.exp_().sub_(q).mul_((mask * w / temperature).unsqueeze(-1))
                # index_add_, not assignment: one student row may be paired more than once
                g_student.index_add_(0, r_s, g.to(g_student.dtype))
            del log_q, log_p_s, q
            # the projected teacher predicts the label: CE(softmax(v), y) at τ = 1; ∂/∂v = softmax(v) − onehot(y)
            log_v = _log_softmax(v, 1.0).to(dtype)
            value -= log_v.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            if g_student_space is not None:
                g = log_v.exp_()
                g[torch.arange(len(y), device=g.device), y] -= 1.0
                g_student_space[rows] = _back(g.mul_(w.unsqueeze(-1)), student_head, to_student)
            del v, log_v
            total += (w * value).sum()
        ctx.grads = (g_student, g_teacher_space, g_student_space)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        g_student, g_teacher_space, g_student_space = scaled_saved_gradients(ctx, grad_output, "dskd_loss")
        return (g_student, None, g_teacher_space, g_student_space) + (None,) * 10


def _check_hidden(hidden: Tensor, n: int, name: str) -> None:
    if hidden.dim() != 2 or hidden.shape[0] != n:
        raise ValueError(
            f"{name} must hold one hidden state per aligned pair, [{n}, hidden size]; got shape {tuple(hidden.shape)}"
        )


def _check_head(head: Tensor, vocab: int, name: str) -> None:
    if head.dim() != 2 or head.shape[0] != vocab:
        raise ValueError(
            f"{name} must be the LM head's weight [{vocab} (the logits' width), hidden size]; got shape "
            f"{tuple(head.shape)}"
        )


def dskd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    student_hidden: Tensor,
    teacher_hidden: Tensor,
    student_head: Tensor,
    teacher_head: Tensor,
    student_to_teacher: Callable[[Tensor], Tensor],
    teacher_to_student: Callable[[Tensor], Tensor],
    targets: Tensor,
    temperature: float = 2.0,
    *,
    correct_only: bool = True,
    student_rows: Tensor | None = None,
    teacher_rows: Tensor | None = None,
    sample_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    chunk_size: int | None = None,
) -> Tensor:
    """Dual-space KD (Zhang et al. 2024): mean over aligned pairs of
    KL(p_t ‖ softmax(W_t·P_st(h_s)/τ)) + m·KL(sg(softmax(W_s·P_ts(h_t)/τ)) ‖ p_s) + CE(softmax(W_s·P_ts(h_t)), y)
    (module docstring; pairs from text alignment, our reading in place of the authors' cross-model attention).

    Logits [..., V_s] / [..., V_t] are paired through ``student_rows`` / ``teacher_rows`` as in :func:`uld_loss`;
    ``student_hidden`` [P, d_s] and ``teacher_hidden`` [P, d_t] are the two models' last hidden states at the P
    pairs (row r ↔ pair r), ``targets`` [P] the student's next token there. ``student_head`` [V_s, d_s] and
    ``teacher_head`` [V_t, d_t] are the LM heads' weights (used without gradient, biases and logit scaling
    left out as the authors do); ``student_to_teacher`` and ``teacher_to_student`` are the trainable projectors
    (e.g. ``nn.Linear(d_s, d_t)`` and ``nn.Linear(d_t, d_s)``, the authors' shape). Gradients reach the student
    logits, ``student_hidden`` and both projectors; never the teacher's tensors. ``correct_only`` scores the
    student-space KD only where the projected teacher predicts ``targets`` (DSKD-CMA's mask). Authors' defaults:
    τ = 2, weight 0.5 beside the student's cross-entropy at 0.5.
    """
    _check_temperature(temperature)
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    student, teacher, s_rows, t_rows = _pair_rows(student_logits, teacher_logits, student_rows, teacher_rows)
    n = s_rows.numel()
    _check_hidden(student_hidden, n, "student_hidden")
    _check_hidden(teacher_hidden, n, "teacher_hidden")
    _check_head(student_head, student.shape[1], "student_head")
    _check_head(teacher_head, teacher.shape[1], "teacher_head")
    y = _check_ids(targets.to(student.device).reshape(-1), student.shape[1], "targets", unique=False)
    if y.numel() != n:
        raise ValueError(f"targets has {y.numel()} entries for {n} aligned pairs (one label per pair)")
    to_teacher = student_to_teacher(student_hidden)
    to_student = teacher_to_student(teacher_hidden.detach())
    for name, projected, head in (
        ("student_to_teacher", to_teacher, teacher_head),
        ("teacher_to_student", to_student, student_head),
    ):
        if tuple(projected.shape) != (n, head.shape[1]):
            raise ValueError(
                f"{name} must map the hidden states to the other model's hidden size: [{n}, {head.shape[1]}] "
                f"expected, got {tuple(projected.shape)}"
            )
    weight = _row_weights(sample_weight, n, reduction, student)
    chunk = _chunk_rows(chunk_size, max(student.shape[1], teacher.shape[1]))
    grad = torch.is_grad_enabled()
    want = (grad and student.requires_grad, grad and to_teacher.requires_grad, grad and to_student.requires_grad)
    return _DualSpaceRows.apply(
        student,
        teacher,
        to_teacher,
        to_student,
        student_head.detach(),
        teacher_head.detach(),
        s_rows,
        t_rows,
        y,
        weight,
        temperature,
        correct_only,
        chunk,
        want,
    )
