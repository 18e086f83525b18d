"""Token-level language-model distillation with bounded memory.

A causal LM emits logits B×T×V; distillation scores every *valid* token (label ≠ ``ignore_index``) with a
divergence between the student's and the teacher's next-token distributions p = softmax(z/τ):

    forward_kl       τ²·KL(p_t ‖ p_s)                                  (Hinton et al. 2015; GKD's "forward")
    reverse_kl       τ²·KL(p_s ‖ p_t)                                  (MiniLLM, Gu et al., ICLR 2024)
    jsd              β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M), M = β·p_t + (1−β)·p_s, 0 < β < 1
                                                                       (GKD, Agarwal et al., ICLR 2024; β as in TRL)
    tvd              ½·Σ_c |p_t,c − p_s,c|
    skew_kl          KL(p_t ‖ α·p_t + (1−α)·p_s)                       (DistiLLM, Ko et al., ICML 2024)
    skew_reverse_kl  KL(p_s ‖ α·p_s + (1−α)·p_t)                       (DistiLLM)

Each per-token value is exactly that of the same-named function in :mod:`fisherkd.functional.logits`
(``kd``, ``reverse_kl``, ``jsd``, ``tvd``, ``skew_kl``, ``skew_reverse_kl``), which also fix where τ² appears.

Memory. At V = 32k–250k and thousands of tokens, the fp32 [tokens × V] probabilities, and the several copies
that autograd saves for the backward pass, dwarf the model's activations. Here tokens are processed in chunks
(as the Liger kernel does): for each chunk the forward pass computes the loss *and* the closed-form gradient
with respect to the student logits, writes that gradient into one preallocated buffer in the logits' dtype,
and frees the chunk. The backward pass only scales the buffer by the incoming gradient. So the extra memory is
one gradient-sized buffer (which any implementation must produce) plus about five fp32 [chunk × V] work tensors,
against about six fp32 [tokens × V] tensors for autograd through the plain formulas. By default a chunk holds
``CHUNK_BYTES // (4·V)`` tokens, i.e. 8 MiB per fp32 work tensor whatever the vocabulary (see
:func:`chunk_rows` for why bytes, not tokens). Measured under the default allocator on the CPU
(benchmarks/token_loss_memory.py): see the README for the numbers.

Gradients. Write u = z_s/τ and, for any loss ℓ(p_s), h = p_s ⊙ ∂ℓ/∂p_s. The softmax Jacobian gives
∂ℓ/∂u = h − p_s·Σ_c h_c, and ∂ℓ/∂z_s = (∂ℓ/∂u)/τ, times τ² where the loss has it. (A constant added to
∂ℓ/∂p_s cancels, so the "+1" terms of d(p log p) are dropped.) With M the relevant mixture:
    forward_kl       h = −p_t                                  → ∂ℓ/∂z_s = τ·(p_s − p_t)
    reverse_kl       h = p_s·(log p_s − log p_t)
    jsd              h = (1−β)·p_s·(log p_s − log M)   (its ratio terms add up to −(1−β)·p_s, which cancels)
    tvd              h = ½·p_s·sign(p_s − p_t)
    skew_kl          h = −(1−α)·p_t·p_s/M
    skew_reverse_kl  h = p_s·(log p_s − log M) − α·p_s²/M
The ratios are evaluated as exp of sums of logs; each is bounded (M ≥ α·p_t, M ≥ α·p_s), and terms whose
coefficient is zero are skipped so that the end points α ∈ {0, 1} stay finite.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, get_args

import torch
from torch import Tensor

from fisherkd.core import nearest
from fisherkd.functional.logits import _check_jsd_beta, _kl, _log_mixture, _log_probs
from fisherkd.functional.saved_gradients import scaled_saved_gradients

__all__ = [
    "CHUNK_BYTES",
    "DIVERGENCES",
    "Divergence",
    "chunk_rows",
    "hidden_token_distillation_loss",
    "token_distillation_loss",
]

# The default chunk: fp32 [chunk × V] work tensors of 8 MiB each (see chunk_rows).
CHUNK_BYTES = 8 << 20

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "skew_kl", "skew_reverse_kl"]
DIVERGENCES: tuple[str, ...] = get_args(Divergence)

# Log-probabilities are floored here so that an empty class or bucket (log 0 = −inf, e.g. the tail bucket of
# a top-k cache with k = V, or a logit masked with −inf) contributes 0·finite = 0 instead of 0·(−inf) = NaN.
# exp(−1e30) is exactly 0 in float32, so a real log-probability is never changed.
LOG_FLOOR = -1e30

# (flat student logits [N, V], chunk rows, need gradient) → (per-row loss, per-row ∂loss/∂logits or None)
ChunkFn = Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]]


# ----------------------------------------------------------------------------------------------------------
# Per-token divergences and their gradients


def check_divergence(divergence: str, beta: float, alpha: float) -> None:
    """Raise a ValueError for an unknown divergence, a JSD β outside (0, 1) or a skew α outside [0, 1]."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; {nearest(divergence, DIVERGENCES)}")
    if divergence == "jsd":
        _check_jsd_beta(beta)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")


def loss_scale(divergence: str, temperature: float) -> float:
    """τ² for the two KLs (as ``functional.kd`` and ``functional.reverse_kl``), 1 for the others."""
    return temperature**2 if divergence in ("forward_kl", "reverse_kl") else 1.0


def divergence_and_h(
    log_p_s: Tensor, log_p_t: Tensor, divergence: str, beta: float = 0.5, alpha: float = 0.1
) -> tuple[Tensor, Tensor]:
    """Per-row divergence between two distributions given as log-probabilities [n, K] (fp32), unscaled by τ²,
    and h = p_s ⊙ ∂ℓ/∂p_s [n, K] up to a per-row multiple of p_s (see the module docstring)."""
    if divergence == "forward_kl":
        return _kl(log_p_t, log_p_s), log_p_t.exp().neg_()
    p_s = log_p_s.exp()
    if divergence == "reverse_kl":
        return _kl(log_p_s, log_p_t), p_s * (log_p_s - log_p_t)
    if divergence == "tvd":
        diff = p_s - log_p_t.exp()
        return 0.5 * diff.abs().sum(-1), 0.5 * p_s * diff.sign()
    if divergence == "jsd":
        log_m = _log_mixture(log_p_t, log_p_s, beta)
        value = beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
        return value, (1.0 - beta) * p_s * (log_p_s - log_m)
    if divergence == "skew_kl":
        log_m = _log_mixture(log_p_t, log_p_s, alpha)
        return _kl(log_p_t, log_m), -(1.0 - alpha) * (log_p_t + log_p_s - log_m).exp()
    if divergence == "skew_reverse_kl":
        log_m = _log_mixture(log_p_s, log_p_t, alpha)
        h = p_s * (log_p_s - log_m)
        if alpha > 0.0:
            h -= alpha * (2.0 * log_p_s - log_m).exp()
        return _kl(log_p_s, log_m), h
    raise ValueError(f"unknown divergence {divergence!r}; choose one of {', '.join(DIVERGENCES)}")


def floored_log_probs(logits: Tensor, temperature: float) -> Tensor:
    """log softmax(z/τ) in fp32, with −inf raised to ``LOG_FLOOR``."""
    return _log_probs(logits, temperature).clamp_min_(LOG_FLOOR)


# ----------------------------------------------------------------------------------------------------------
# Token selection and the chunked autograd function


def select_tokens(
    labels: Tensor,
    shift: bool,
    ignore_index: int,
    token_weight: Tensor | None,
    reduction: str,
    num_items: int | float | Tensor | None,
    dtype: torch.dtype,
) -> tuple[Tensor, Tensor]:
    """Flat indices of the scored logit rows, and each row's weight including the normalizer, in ``dtype``.

    With ``shift`` the logits at position t are scored against the label at t + 1 (as Hugging Face's causal
    LM loss): the last position of every sequence is never scored. ``token_weight`` is aligned with the
    logits (position t weighs the prediction made at t).
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if shift:
        valid = torch.zeros_like(labels, dtype=torch.bool)
        valid[..., :-1] = labels[..., 1:] != ignore_index
    else:
        valid = labels != ignore_index
    rows = valid.flatten().nonzero().squeeze(1)
    if token_weight is None:
        weight = torch.ones(rows.numel(), dtype=dtype, device=labels.device)
    else:
        if token_weight.shape != labels.shape:
            raise ValueError(
                f"token_weight has shape {tuple(token_weight.shape)} but labels have shape {tuple(labels.shape)}"
            )
        weight = token_weight.detach().flatten().index_select(0, rows).to(dtype)
    if reduction == "mean":
        # num_items: the valid-token count over all gradient-accumulation micro-batches, so that their summed
        # losses equal the mean over the whole batch. Without it, the count of this call's tokens.
        divisor = float(num_items) if num_items is not None else float(rows.numel())
        weight = weight / max(divisor, 1.0)
    return rows, weight


class _ChunkedTokenLoss(torch.autograd.Function):
    """Σ_rows w_r·ℓ_r over ``rows`` of the flat student logits [N, V], computed ``chunk_size`` rows at a time.

    The gradient with respect to the logits is produced in the forward pass (by ``chunk_fn``) into a buffer of
    the logits' shape and dtype; the backward pass scales it in place and hands it over, so it can run once.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx, student: Tensor, rows: Tensor, weight: Tensor, chunk_fn: ChunkFn, chunk_size: int, want_grad: bool
    ) -> Tensor:
        grad = torch.zeros_like(student) if want_grad else None
        total = torch.zeros((), dtype=weight.dtype, device=student.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start : start + chunk_size]
            w = weight[start : start + chunk_size]
            loss, g = chunk_fn(student, r, want_grad)
            total += (w * loss).sum()
            if grad is not None and g is not None:
                # a truncated vocabulary gives a narrower g: the remaining columns keep their zero gradient
                grad[r, : g.shape[-1]] = g.mul_(w.unsqueeze(-1)).to(grad.dtype)
        ctx.grads = (grad,)
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        return *scaled_saved_gradients(ctx, grad_output, "the chunked token loss"), None, None, None, None, None


def chunk_rows(chunk_size: int | None, vocab: int) -> int:
    """Tokens per chunk: ``chunk_size``, or by default as many as fit fp32 [chunk × V] work tensors of
    ``CHUNK_BYTES`` (8 MiB).

    Why bytes: under glibc's default allocator a freed block smaller than its mmap threshold, which adapts up to
    32 MiB, stays on the heap, resident, and the heap grows with fragmentation. A fixed token count makes the blocks
    grow with the vocabulary (256 tokens × 32k = 31.25 MiB, just under 32 MiB); measured on the CPU at 2,048 tokens
    (benchmarks/token_loss_memory.py), 256-token chunks peaked at 0.34–0.54× a naive loss's resident memory and
    varied from step to step, 8 MiB chunks at 0.15–0.21×.
    """
    if chunk_size is None:
        return max(1, CHUNK_BYTES // (4 * vocab))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of tokens, or None for 8 MiB chunks; got {chunk_size!r}"
        )
    return chunk_size


def chunked_token_loss(
    student_logits: Tensor, rows: Tensor, weight: Tensor, chunk_fn: ChunkFn, chunk_size: int | None
) -> Tensor:
    """Apply the chunked autograd function to logits [..., V] (viewed as [N, V] without a copy when contiguous)."""
    chunk_size = chunk_rows(chunk_size, student_logits.shape[-1])
    flat = student_logits.reshape(-1, student_logits.shape[-1])
    # no gradient buffer, and no gradient work, under torch.no_grad() or for logits that need none
    want_grad = torch.is_grad_enabled() and student_logits.requires_grad
    return _ChunkedTokenLoss.apply(flat, rows, weight, chunk_fn, chunk_size, want_grad)


def accumulation_dtype(logits: Tensor) -> torch.dtype:
    """Weights and sums in fp32 at least (fp64 for fp64 logits, which the tests use for exact comparisons)."""
    return torch.promote_types(logits.dtype, torch.float32)


def softmax_backward(h: Tensor, p_s: Tensor, scale: float) -> Tensor:
    """scale·(h − p_s·Σ_c h_c), in place in h: the gradient through the softmax (see the module docstring)."""
    return h.addcmul_(p_s, h.sum(-1, keepdim=True), value=-1.0).mul_(scale)


def logit_chunk_loss(
    student: Tensor, teacher: Tensor, divergence: str, temperature: float, beta: float, alpha: float, want_grad: bool
) -> tuple[Tensor, Tensor | None]:
    """Per-row loss (τ²-scaled where the divergence has it) of student and teacher logit rows [c, V], and its
    gradient with respect to the student rows (fp32) when ``want_grad``."""
    scale = loss_scale(divergence, temperature)
    log_p_s = floored_log_probs(student, temperature)
    log_p_t = floored_log_probs(teacher, temperature).to(log_p_s.dtype)
    value, h = divergence_and_h(log_p_s, log_p_t, divergence, beta, alpha)
    del log_p_t
    grad = softmax_backward(h, log_p_s.exp_(), scale / temperature) if want_grad else None
    return value * scale, grad


def _check_token_pair(student: Tensor, teacher: Tensor, labels: Tensor, what: str, last: str) -> None:
    """Student and teacher tensors [B, T, ·] that agree in every dimension but the last, and labels [B, T]."""
    if teacher.shape[:-1] != student.shape[:-1]:
        raise ValueError(
            f"student {what} {tuple(student.shape)} and teacher {what} {tuple(teacher.shape)} must agree in every "
            f"dimension but the last ({last})"
        )
    if labels.shape != student.shape[:-1]:
        raise ValueError(f"labels have shape {tuple(labels.shape)}, expected {tuple(student.shape[:-1])}")


def _scored_vocabulary(v_s: int, v_t: int, vocab_truncation: bool) -> int:
    """The vocabulary both distributions are scored on: the shared one, or with ``vocab_truncation`` the first
    min(V_s, V_t) entries (one embedding matrix merely padded over the same tokenizer)."""
    if v_s != v_t and not vocab_truncation:
        raise ValueError(
            f"student vocabulary size {v_s} differs from teacher vocabulary size {v_t}; if both use the same "
            "tokenizer and one embedding matrix is only padded, set vocab_truncation=True to score the first "
            f"{min(v_s, v_t)} entries"
        )
    return min(v_s, v_t)


# ----------------------------------------------------------------------------------------------------------
# The public loss


def token_distillation_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    token_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    num_items: int | float | Tensor | None = None,
    vocab_truncation: bool = False,
) -> Tensor:
    """Token-level distillation loss between a student's and a teacher's LM logits [B, T, V] (any float dtype;
    computed in fp32).

    loss = Σ_{valid t} w_t·ℓ(p_s,t, p_t,t) / N, with ℓ the ``divergence`` (module docstring; ``beta`` is the
    JSD interpolation, ``alpha`` the skew), p = softmax(z/τ), valid tokens those whose label is not
    ``ignore_index`` (so padding and masked prompts count for nothing), w the optional ``token_weight`` [B, T]
    aligned with the logits (e.g. Fisher per-token weights, mean 1 over the valid tokens), and N the number of
    valid tokens, or ``num_items`` when given (Hugging Face's ``num_items_in_batch``: the count over all
    gradient-accumulation micro-batches, which makes accumulation exact). ``reduction="sum"`` drops N.

    ``shift=True`` (causal LM) scores the logits at t against the label at t + 1, as Hugging Face does.
    Tokens are processed ``chunk_size`` at a time (by default as many as make 8 MiB fp32 [chunk × V] tensors),
    forward and backward, so only O(chunk_size × V) fp32 work space is held besides the gradient. The teacher
    gets no gradient. Backward may run once per call.

    Teacher and student must share the vocabulary. ``vocab_truncation=True`` scores only the first min(V_s, V_t)
    entries of both (each renormalized there): right when one model's embedding matrix is merely padded (e.g.
    to a multiple of 64) over the same tokenizer, meaningless if the tokenizers differ.
    """
    check_divergence(divergence, beta, alpha)
    _check_token_pair(student_logits, teacher_logits, labels, "logits", "vocabulary")
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    vocab = _scored_vocabulary(v_s, v_t, vocab_truncation)
    teacher = teacher_logits.detach().reshape(-1, v_t)

    def chunk_fn(student: Tensor, r: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        # x[r], not index_select: for bf16 rows on the CPU the latter is about ten times slower
        return logit_chunk_loss(student[r, :vocab], teacher[r, :vocab], divergence, temperature, beta, alpha, want_grad)

    rows, weight = select_tokens(
        labels, shift, ignore_index, token_weight, reduction, num_items, accumulation_dtype(student_logits)
    )
    return chunked_token_loss(student_logits, rows, weight, chunk_fn, chunk_size)


class _ChunkedHeadLoss(torch.autograd.Function):
    """Σ_rows w_r·ℓ_r with the student's logits of each chunk made from its hidden states, z = h·Wᵀ + b, and
    dropped after use: no [tokens × V] tensor at all, neither the logits nor their gradient.

    The gradients are produced in the forward pass, chunk by chunk: ∂/∂h[r] = g·W and ∂/∂W += gᵀ·h[r] (g the
    weighted ∂ℓ/∂z of the chunk), into buffers of the inputs' shapes that the backward pass scales in place and hands
    over. The head's gradient is a fresh contiguous tensor, so autograd adds a tied embedding's gradient into it in
    place; a plain ``nn.Linear`` head gives a transposed view, and the sum of the two [V × H] gradients is then a third
    [V × H] tensor (108 MiB for SmolLM2's 49k × 576 embedding).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        head: Tensor,
        bias: Tensor | None,
        rows: Tensor,
        weight: Tensor,
        teacher_logits: Callable[[Tensor], Tensor],
        loss_fn: Callable[[Tensor, Tensor, bool], tuple[Tensor, Tensor | None]],
        chunk_size: int,
        wants: tuple[bool, bool, bool],
    ) -> Tensor:
        want_h, want_w, want_b = wants
        want = want_h or want_w or want_b
        grad_h = torch.zeros_like(hidden) if want_h else None
        # the first chunk writes the head's gradient, later ones add to it (no zero fill and no read of a [V × H]
        # buffer that is still zero); no chunk at all leaves it zero
        grad_w = torch.empty_like(head) if want_w else None
        grad_b = torch.zeros_like(bias) if want_b else None
        written = False
        total = torch.zeros((), dtype=weight.dtype, device=hidden.device)
        for start in range(0, rows.numel(), chunk_size):
            r = rows[start : start + chunk_size]
            w = weight[start : start + chunk_size]
            x = hidden[r]
            loss, g = loss_fn(nn_linear(x, head, bias), teacher_logits(r), want)
            total += (w * loss).sum()
            if g is None:
                continue
            # a truncated vocabulary gives a narrower g: the remaining rows of W keep their zero gradient
            g = g.mul_(w.unsqueeze(-1)).to(head.dtype)
            v = g.shape[-1]
            if grad_h is not None:
                grad_h[r] = (g @ head[:v]).to(grad_h.dtype)
            if grad_w is not None and written:
                grad_w[:v].addmm_(g.t(), x.to(head.dtype))
            elif grad_w is not None:
                torch.mm(g.t(), x.to(head.dtype), out=grad_w[:v])
                grad_w[v:].zero_()  # rows beyond a truncated vocabulary
                written = True
            if grad_b is not None:
                grad_b[:v] += g.sum(0).to(grad_b.dtype)
        if grad_w is not None and not written:
            grad_w.zero_()
        ctx.grads = (grad_h, grad_w, grad_b) if want else None
        return total

    @staticmethod
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        scaled = scaled_saved_gradients(ctx, grad_output, "the chunked token loss")
        return *scaled, None, None, None, None, None, None


def nn_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """x·Wᵀ + b in the weight's dtype (an LM head's logits)."""
    return torch.nn.functional.linear(x.to(weight.dtype), weight, bias)


def hidden_token_distillation_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    labels: Tensor,
    divergence: Divergence = "forward_kl",
    temperature: float = 1.0,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    beta: float = 0.5,
    alpha: float = 0.1,
    chunk_size: int | None = None,
    shift: bool = True,
    ignore_index: int = -100,
    token_weight: Tensor | None = None,
    reduction: Literal["mean", "sum"] = "mean",
    num_items: int | float | Tensor | None = None,
    vocab_truncation: bool = False,
) -> Tensor:
    """:func:`token_distillation_loss` of the logits z = h·Wᵀ + b of two LM heads, from the models' last hidden
    states [B, T, H] and head weights [V, H] (and biases [V]), without ever holding a [tokens × V] tensor: each chunk's
    logits of both models are made, scored and dropped, and the student's gradients with respect to its hidden states,
    head weight and bias are accumulated chunk by chunk (see :class:`_ChunkedHeadLoss`). Same value and gradients as
    ``token_distillation_loss(linear(h_s, W_s, b_s), linear(h_t, W_t, b_t), labels, ...)``; use it for heads that
    are a plain linear map (no logit scaling or soft-capping after it)."""
    check_divergence(divergence, beta, alpha)
    _check_token_pair(student_hidden, teacher_hidden, labels, "hidden states", "width")
    for name, hidden, head in (("student", student_hidden, student_head), ("teacher", teacher_hidden, teacher_head)):
        if head.dim() != 2 or head.shape[1] != hidden.shape[-1]:
            raise ValueError(
                f"the {name} head weight has shape {tuple(head.shape)}, expected [vocabulary, {hidden.shape[-1]}] "
                "(the LM head's weight, whose rows are the tokens)"
            )
    v_s, v_t = student_head.shape[0], teacher_head.shape[0]
    vocab = _scored_vocabulary(v_s, v_t, vocab_truncation)
    flat = student_hidden.reshape(-1, student_hidden.shape[-1])
    teacher_flat = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
    t_head, t_bias = teacher_head.detach()[:vocab], None if teacher_bias is None else teacher_bias.detach()[:vocab]

    def teacher_logits(r: Tensor) -> Tensor:
        return nn_linear(teacher_flat[r], t_head, t_bias)

    def loss_fn(student: Tensor, teacher: Tensor, want_grad: bool) -> tuple[Tensor, Tensor | None]:
        return logit_chunk_loss(student[:, :vocab], teacher, divergence, temperature, beta, alpha, want_grad)

    rows, weight = select_tokens(
        labels, shift, ignore_index, token_weight, reduction, num_items, accumulation_dtype(student_head)
    )
    grad = torch.is_grad_enabled()
    wants = (
        grad and student_hidden.requires_grad,
        grad and student_head.requires_grad,
        grad and student_bias is not None and student_bias.requires_grad,
    )
    chunk_size = chunk_rows(chunk_size, v_s)
    return _ChunkedHeadLoss.apply(
        flat, student_head, student_bias, rows, weight, teacher_logits, loss_fn, chunk_size, wants
    )
