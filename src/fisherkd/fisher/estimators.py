"""Fisher-information estimators of a frozen teacher: closed forms and one-backward sampled estimates.

All are detached. The teacher runs in its own dtype (a bf16 teacher stays bf16) with autocast off; the statistics
(log-likelihoods, squared scores, their sums and means) are accumulated in float32. Padding (``mask``: 1 = a valid
token) is left out everywhere: per-token log-likelihoods count valid tokens only, and the channel / head / token
reductions of a B×T×D or B×H×T×T tap sum or average over valid tokens only.

Notation: z logits, p = softmax(z/τ), h a tapped activation, g = ∂ log p(ŷ|x) / ∂h its score. The Fisher
information of the teacher's prediction is E_ŷ∼p[g gᵀ]; its diagonal along an axis says how much a perturbation
there changes the teacher's prediction.

- Logits, closed form: F = diag(p) − ppᵀ, per-class diagonal p_c(1 − p_c), per-sample trace 1 − ‖p‖².
- Input h of a linear head z = Wh + b: F_h = Wᵀ(diag p − ppᵀ)W, diagonal Σ_c p_c W_cj² − (Σ_c p_c W_cj)².
- Any tapped activation: one ``torch.autograd.grad`` of Σ_n log p(ŷ_n|x_n) back to the tapped tensors only (the
  teacher's parameters stay frozen, so no weight gradient is formed), ŷ drawn from the teacher's own prediction
  (the true Fisher) or the ground-truth labels (the empirical Fisher, Kunstner et al., NeurIPS 2019, explain why
  it is the weaker choice). Reductions: per channel, per position/token, per attention head (the Fisher of a
  multiplicative head gate, as in Michel et al., "Are Sixteen Heads Really Better than One?", NeurIPS 2019).
- Parameters: diagonal E[(∂ log p(ŷ|x)/∂θ)²] (as in EWC, Kirkpatrick et al., PNAS 2017) from one backward of the
  whole batch: with ŷ sampled from the model E_ŷ[g_n] = 0 and the samples are independent, so the cross terms of
  (Σ_n g_n)² vanish in expectation and (Σ_n g_n)²/N is unbiased for the per-sample Fisher, with no per-sample
  gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd.core import UNLABELLED, model_logits, nearest
from fisherkd.functional.features import _channel_axis
from fisherkd.taps import INPUT, parse_tap

Inputs = Tensor | Mapping[str, Tensor]


def probabilities(logits: Tensor, temperature: float = 1.0) -> Tensor:
    z = logits.detach().float()
    return F.softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def logit_fisher_diagonal(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Per-class diagonal of the logit Fisher diag(p) − ppᵀ: p_c(1 − p_c), shape [..., C]."""
    p = probabilities(logits, temperature)
    return p * (1.0 - p)


def logit_fisher_trace(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Trace of the logit Fisher: 1 − ‖p‖², one value per row of logits, shape [...]."""
    return 1.0 - probabilities(logits, temperature).pow(2).sum(-1)


def non_target(logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """The teacher's relative non-target probabilities p̂_c = p_c/(1 − p_y) for c ≠ y, and 0 at the label y,
    shape [..., C] (each row sums to 1): what DKD's non-target term distils (Zhao et al., CVPR 2022).

    As class importances (``fisher: {axis: class, estimator: non_target}``) their batch mean
    importance_c = (1/N) Σ_n [c ≠ y_n] p_{n,c}/(1 − p_{n,y_n}) emphasises the classes the teacher ranks as the
    likeliest alternatives — the dark knowledge — where p_c(1 − p_c) favours the classes the teacher is unsure of
    and suppresses the small non-target probabilities. Ignored labels (< 0) give a row of zeros; a row with
    p_y = 1 (in float) gives zeros too.
    """
    p = probabilities(logits, temperature)
    label = target.long().clamp_min(0).unsqueeze(-1)
    valid = (target >= 0).unsqueeze(-1)
    rest = (1.0 - p.gather(-1, label)).clamp_min(torch.finfo(p.dtype).tiny)
    return torch.where(valid, p.scatter(-1, label, 0.0) / rest, 0.0)


def wsl_weight(student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """WSL's per-sample weight 1 − exp(−CE_s/CE_t), CE the cross-entropy of the (detached) student's and the
    teacher's softmax at ``temperature`` against the label, one value per row, in [0, 1).

    Zhou et al., "Rethinking Soft Labels for Knowledge Distillation: A Bias-Variance Tradeoff Perspective", ICLR
    2021: a sample the student already fits better than the teacher (CE_s ≪ CE_t) carries a soft label whose bias
    would only pull it back, and gets a small weight; one the student gets wrong gets a weight near 1. (As in the
    authors' code, the ratio's denominator is CE_t + 1e-7.) Unlike the Fisher statistics it reads the student.
    A row without a label (-100: a transfer input) is scored against the teacher's top class, its only label.
    """
    s = F.log_softmax(student_logits.detach().float() / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    label = torch.where(target == UNLABELLED, t.argmax(-1), target.long()).unsqueeze(-1)
    ce_s, ce_t = -s.gather(-1, label).squeeze(-1), -t.gather(-1, label).squeeze(-1)
    return 1.0 - torch.exp(-ce_s / (ce_t + 1e-7))


def influence_weight(
    student_logits: Tensor, teacher_logits: Tensor, target: Tensor, temperature: float = 1.0, damping: float = 0.01
) -> Tensor:
    """KD-AIF's per-sample weight σ(h_n / rms(h)) from the influence h_n = g_nᵀ (F̄ + δ·(tr F̄/C)·I)⁻¹ ḡ_{−n} of
    sample n on the loss of the rest of the batch, with the teacher's Fisher as the curvature; in (0, 1).

    Wu, Luo, Liu, Deng, "Knowledge Distillation with Adapted Weight" (KD-AIF), Statistics, arXiv:2501.02705 (2025):
    training samples are weighted by their influence function (Koh & Liang, ICML 2017) on a validation loss, passed
    through a sigmoid. Our reading, in the parameters the teacher and the student share in meaning, the bias b of
    the last layer (a shift of the logits):

    - g_n = ∂CE(z_s,n, y_n)/∂b = softmax(z_s,n) − e_{y_n}, the student's per-sample gradient (detached; a row
      without a label, -100, is scored against the teacher's top class, as in :func:`wsl_weight`);
    - F̄ = mean_n (diag p_t,n − p_t,n p_t,nᵀ), p_t at ``temperature``: the teacher's Fisher of that bias, damped by
      ``damping`` times its mean eigenvalue (scale-free; F̄ is singular along the all-ones vector, which no g sees);
    - ḡ_{−n} = mean_{m≠n} g_m: the validation gradient, here the rest of the batch (the Distiller sees training
      batches only; leaving n out drops the self-influence g_nᵀF⁻¹g_n, which would favour large-gradient samples);
    - h_n = −I_up,loss(n) > 0 when up-weighting sample n lowers that loss; σ(h_n/rms(h)), the batch RMS making the
      sigmoid's slope scale-free (the paper's sigmoid has no stated scale; this is our choice). h ≡ 0 gives 1/2.
    """
    z_s = student_logits.detach().float()
    p_t = probabilities(teacher_logits, temperature)
    n, classes = p_t.shape
    label = torch.where(target == UNLABELLED, p_t.argmax(-1), target.long())
    g = z_s.softmax(-1) - F.one_hot(label, classes).float()
    fisher = torch.diag(p_t.mean(0)) - p_t.T @ p_t / n
    scale = (fisher.diagonal().sum() / classes).clamp_min(1e-12)
    fisher = fisher + (damping * scale) * torch.eye(classes, device=p_t.device)
    reference = (g.sum(0, keepdim=True) - g) / max(n - 1, 1)
    solved = torch.linalg.solve_ex(fisher, reference.T)[0].T  # solve_ex: no host sync for an error check
    h = (g * solved).sum(-1)
    return torch.sigmoid(h / h.pow(2).mean().sqrt().clamp_min(torch.finfo(h.dtype).tiny))


def linear_head_fisher(logits: Tensor, weight: Tensor, temperature: float = 1.0) -> Tensor:
    """Diagonal Fisher at the input h of a linear head z = Wh + b: Σ_c p_c W_cj² − (Σ_c p_c W_cj)², shape [..., D].

    It is the variance of W_ŷj under ŷ ∼ p: the closed form of E[g_j²] with g = ∂ log p(ŷ)/∂h = W_ŷ − pᵀW, and
    diag(Wᵀ(diag p − ppᵀ)W). With a temperature the score carries a factor 1/τ, a constant that the normalization
    removes.
    """
    p = probabilities(logits, temperature)
    w = weight.detach().float()
    return p @ w.pow(2) - (p @ w).pow(2)


def sample_labels(logits: Tensor, temperature: float = 1.0, generator: torch.Generator | None = None) -> Tensor:
    """ŷ ∼ softmax(z/τ), one label per row of logits."""
    p = probabilities(logits, temperature)
    return torch.multinomial(p.reshape(-1, p.shape[-1]), 1, generator=generator).view(p.shape[:-1])


def valid_rows(logits: Tensor, mask: Tensor | None = None, target: Tensor | None = None) -> Tensor | None:
    """1.0 for the rows of ``logits`` that count in a log-likelihood, 0.0 for padding (``mask`` B×T of per-token
    logits B×T×C) and ignored labels (``target`` < 0, the -100 of Transformers); None when every row counts. A
    mask that does not match the rows (B×T tokens, B×C logits of a pooled classifier) does not apply to them."""
    valid = None
    if mask is not None and mask.shape == logits.shape[:-1]:
        valid = mask.to(device=logits.device, dtype=torch.float32)
    if target is not None and target.shape == logits.shape[:-1]:
        labelled = (target >= 0).float()
        valid = labelled if valid is None else valid * labelled
    return valid


def _log_likelihood(logits: Tensor, labels: Tensor, temperature: float, valid: Tensor | None) -> Tensor:
    """Σ over the valid rows of log softmax(z/τ)[label], in float32."""
    log_p = F.log_softmax(logits.float() / temperature, dim=-1)
    picked = log_p.gather(-1, labels.long().clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return picked.sum() if valid is None else (picked * valid).sum()


def _labels(logits: Tensor, target: Tensor | None, temperature: float, generator: torch.Generator | None) -> Tensor:
    return target if target is not None else sample_labels(logits, temperature, generator)


def _call(model: nn.Module, inputs: Inputs, parameters: dict[str, Tensor] | None = None) -> Tensor:
    args, kwargs = ((), dict(inputs)) if isinstance(inputs, Mapping) else ((inputs,), {})
    if parameters is None:
        return model_logits(model(*args, **kwargs))
    return model_logits(torch.func.functional_call(model, parameters, args, kwargs))


def _device_type(model: nn.Module) -> str:
    return next(model.parameters()).device.type


def _fresh_leaf(x: Tensor, tap: str, leaves: dict[str, Tensor]) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"tap {tap!r}: the Fisher needs a floating-point tensor there, got {type(x).__name__}")
    leaf = x.detach().requires_grad_()  # in the teacher's dtype: the layers after the tap take it as it was
    leaves[tap] = leaf
    return leaf.clone()  # a non-leaf copy flows on, so in-place layers downstream (ReLU(inplace)) stay legal


def _swap_hook(tap: str, index: int | None, leaves: dict[str, Tensor]) -> Callable[..., Any]:
    """A forward (pre-)hook that replaces the tapped tensor by a fresh leaf that requires grad."""
    if index == INPUT:
        return lambda _module, args: (_fresh_leaf(args[0], tap, leaves), *args[1:])

    def hook(_module: nn.Module, _args: tuple, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            k = 0 if index is None else index
            return type(output)([*output[:k], _fresh_leaf(output[k], tap, leaves), *output[k + 1 :]])
        return _fresh_leaf(output, tap, leaves)

    return hook


def tapped_gradients(
    model: nn.Module,
    inputs: Inputs,
    taps: Sequence[str],
    *,
    target: Tensor | None = None,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[tuple[Tensor, Tensor]]:
    """(h, g) in float32 for each tapped activation h of ``model``: g = ∂ Σ_n log p(ŷ_n|x_n) / ∂h, from one
    autograd.grad.

    ŷ is drawn from the model's own prediction at temperature τ (true Fisher), or is ``target`` (empirical
    Fisher). With per-token logits the sum runs over valid tokens only (``mask``, and labels ≥ 0), so padding
    sends no score into the valid tokens through attention. Forward hooks make each tapped tensor a fresh leaf, so
    the graph starts there: nothing before the first tap is recorded and, with frozen parameters, no weight
    gradient is computed. Tap names are module names with the ``:k`` / ``:in`` suffixes of :mod:`fisherkd.taps`.
    """
    modules = dict(model.named_modules())
    leaves: dict[str, Tensor] = {}
    handles = []
    try:
        for tap in taps:
            name, index = parse_tap(tap)
            if name not in modules:
                raise KeyError(f"teacher has no module {name!r}; {nearest(name, [n for n in modules if n])}")
            module, hook = modules[name], _swap_hook(tap, index, leaves)
            register = module.register_forward_pre_hook if index == INPUT else module.register_forward_hook
            handles.append(register(hook))
        with torch.enable_grad(), torch.autocast(_device_type(model), enabled=False):
            logits = _call(model, inputs).float()
            missing = [tap for tap in taps if tap not in leaves]
            if missing:
                raise RuntimeError(f"tap {missing[0]!r}: its module did not run in the teacher's forward pass")
            labels = _labels(logits, target, temperature, generator)
            log_likelihood = _log_likelihood(logits, labels, temperature, valid_rows(logits, mask, target))
            if log_likelihood.requires_grad:
                grads = torch.autograd.grad(log_likelihood, [leaves[t] for t in taps], allow_unused=True)
            else:  # no tap is on the path to the logits
                grads = (None,) * len(taps)
    finally:
        for handle in handles:
            handle.remove()
    for tap, grad in zip(taps, grads):
        if grad is None:
            raise ValueError(
                f"tap {tap!r} is not on the path to the teacher's logits (e.g. an attention map a module only "
                "returns for inspection): tap a tensor the prediction is computed from, such as the attention "
                "probabilities inside the attention (the zoo ViT's 'blocks.3.attn.probs') or a context output"
            )
    return [(leaves[tap].detach().float(), grad.float()) for tap, grad in zip(taps, grads)]


def token_mask(like: Tensor, mask: Tensor | None) -> Tensor | None:
    """The padding mask B×T (1 = valid) as float32 broadcasting over ``like``: B×T×1 for B×T×D token sequences,
    B×1×T×T (valid query and key) for B×H×T×T attention maps. None without a mask or when ``like`` has no token
    axis of the mask's length (an image map, a pooled B×D vector)."""
    if mask is None or mask.dim() != 2 or like.shape[0] != mask.shape[0]:
        return None
    m = mask.to(device=like.device, dtype=torch.float32)
    length = mask.shape[1]
    if like.dim() == 3 and like.shape[1] == length:
        return m[:, :, None]
    if like.dim() == 4 and like.shape[2] == like.shape[3] == length:
        return m[:, None, :, None] * m[:, None, None, :]
    return None


def channel_fisher(diagonal: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample, per-channel Fisher: the mean over positions of an elementwise diagonal Fisher, shape [B, C].

    ``diagonal`` is g² of one sampled score (so the result is mean over positions of g_c²) or a closed form laid
    out like the feature. Channels are on axis 1 of B×C×… maps and B×D vectors and last in B×T×D token sequences
    (one per hidden unit), as in :mod:`fisherkd.functional.features`. With a padding ``mask`` the mean runs over
    each sample's valid tokens only.
    """
    axis = _channel_axis(diagonal) % diagonal.dim()
    spatial = [d for d in range(1, diagonal.dim()) if d != axis]
    if not spatial:
        return diagonal.float()
    valid = token_mask(diagonal, mask)
    if valid is None:
        return diagonal.float().mean(spatial)
    count = valid.expand_as(diagonal).sum(spatial).clamp_min(1.0)
    return (diagonal.float() * valid).sum(spatial) / count


def position_fisher(diagonal: Tensor) -> Tensor:
    """Per-sample map Σ_c of an elementwise diagonal Fisher (g² or a closed form) over the positions of a B×C×H×W
    map (shape B×H×W) or the tokens of a B×T×D sequence (shape B×T)."""
    if diagonal.dim() < 3:
        raise ValueError(f"a per-position Fisher needs a map or a token sequence, got shape {tuple(diagonal.shape)}")
    return diagonal.float().sum(_channel_axis(diagonal))


def token_fisher(diagonal: Tensor, mask: Tensor | None = None) -> Tensor:
    """Per-sample, per-token Fisher (shape B×T) from an elementwise diagonal Fisher of B×T×D hidden states (Σ over
    the hidden units) or of B×H×T×T attention maps (Σ over heads and valid keys: per query token)."""
    if diagonal.dim() == 3:
        return diagonal.float().sum(-1)
    if diagonal.dim() == 4:
        valid = token_mask(diagonal, mask)
        return (diagonal.float() if valid is None else diagonal.float() * valid).sum((1, 3))
    raise ValueError(f"a per-token Fisher needs B×T×D or B×H×T×T, got shape {tuple(diagonal.shape)}")


def head_gate_fisher(value: Tensor, grad: Tensor, num_heads: int | None = None, mask: Tensor | None = None) -> Tensor:
    """Per-sample Fisher of a multiplicative gate ξ_h on each attention head, (∂ log p/∂ξ_h)², shape [B, H].

    At ξ = 1, ∂ log p/∂ξ_h = Σ_tokens ⟨o_h, ∂ log p/∂o_h⟩ for the head's output o_h. From a B×T×D context
    (heads concatenated on D, ``num_heads`` given) that is the sum over tokens and the head's slice of h·g; from
    B×H×T×T attention probabilities A (which reach the output only through o_h = A_h V_h) the same number is
    Σ_{q,k} A·∂ log p/∂A, because o_h is linear in A_h. With a padding ``mask`` the sums run over valid tokens.
    """
    product = value.float() * grad.float()
    valid = token_mask(product, mask)
    product = product if valid is None else product * valid
    if product.dim() == 4:
        return product.sum((2, 3)).pow(2)
    if product.dim() == 3 and num_heads:
        batch, length, width = product.shape
        if width % num_heads:
            raise ValueError(f"head Fisher: width {width} is not divisible by num_heads={num_heads}")
        return product.reshape(batch, length, num_heads, width // num_heads).sum((1, 3)).pow(2)
    raise ValueError(
        f"head Fisher: tap B×H×T×T attention probabilities or a B×T×D context with num_heads set, got shape "
        f"{tuple(value.shape)}"
    )


def parameter_fisher(
    model: nn.Module,
    inputs: Inputs,
    names: Sequence[str],
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """Diagonal parameter Fisher E[(∂ log p(ŷ|x)/∂θ_i)²] of the named parameters, ŷ sampled from the model, in
    float32.

    One backward of Σ_n log p(ŷ_n|x_n) through ``torch.func.functional_call`` with detached copies of the named
    parameters (the model's own stay frozen, the copies keep their dtype); (Σ_n g_n)²/N is unbiased for the
    per-sample Fisher (see the module docstring). With per-token logits n runs over the valid tokens of ``mask``.
    Sampled labels only: with ground-truth labels E[g_n] ≠ 0 and the cross terms would not vanish.
    """
    own = dict(model.named_parameters())
    leaves = {name: own[name].detach().requires_grad_() for name in names}
    with torch.enable_grad(), torch.autocast(_device_type(model), enabled=False):
        logits = _call(model, inputs, leaves).float()
        labels = sample_labels(logits, temperature, generator)
        valid = valid_rows(logits, mask)
        log_likelihood = _log_likelihood(logits, labels, temperature, valid)
        grads = torch.autograd.grad(log_likelihood, list(leaves.values()), allow_unused=True)
    rows = labels.numel() if valid is None else valid.sum().clamp_min(1.0)
    return [
        torch.zeros_like(leaf, dtype=torch.float32) if g is None else g.float().pow(2) / rows
        for leaf, g in zip(leaves.values(), grads)
    ]


def head_input_layout(per_unit: Tensor, feature_shape: Sequence[int]) -> Tensor:
    """Lay the per-unit closed form of :func:`linear_head_fisher` ([N, D]) out like the tapped feature [N, ...].

    The head sees the feature either flattened (D = its size per sample: the units are its elements) or pooled over
    positions (D = its channel count: every position of channel c gets F_c, which is, up to the constant 1/P²
    that the normalization removes, the Fisher of each element of a mean-pooled map).
    """
    shape = tuple(feature_shape[1:])
    rows, width = per_unit.shape
    if width == math.prod(shape):
        return per_unit.reshape(rows, *shape)
    axis = _channel_axis(torch.empty(0, *shape, device="meta")) % (len(shape) + 1)
    if len(shape) >= 2 and shape[axis - 1] == width:
        view = [rows] + [1] * len(shape)
        view[axis] = width
        return per_unit.reshape(view).expand(rows, *shape)
    raise ValueError(
        f"linear_head Fisher: the head takes {width} inputs, but the tapped teacher feature has shape "
        f"{[rows, *shape]}: tap the head's input (e.g. 'head:in'), a map it sees flattened, or a map it sees "
        "average-pooled (as many channels as inputs)"
    )


def _channels_last(x: Tensor) -> Tensor:
    """A feature laid out as B×P×C (P positions or tokens, 1 for a B×C vector), channels as in
    :mod:`fisherkd.functional.features`."""
    if x.dim() == 3:  # B×T×D tokens: channels already last
        return x
    return x.reshape(x.shape[0], x.shape[1], -1).transpose(1, 2)


def _position_weights(x: Tensor, mask: Tensor | None) -> Tensor:
    """B×P weights that average over each sample's positions (its valid tokens under a B×T padding ``mask``)."""
    valid = token_mask(x, mask) if x.dim() == 3 else None
    rows, positions = x.shape[0], _channels_last(x).shape[1]
    if valid is None:
        return x.new_full((rows, positions), 1.0 / positions, dtype=torch.float32)
    valid = valid[..., 0]
    return valid / valid.sum(1, keepdim=True).clamp_min(1.0)


def direction_fisher(grad: Tensor, mask: Tensor | None = None) -> Tensor:
    """The channel × channel Fisher at a tapped activation: mean over samples of the mean over positions of g gᵀ,
    shape C×C, float32.

    With ŷ sampled from the teacher, E_ŷ[g gᵀ] = J_lᵀ F_p J_l (DESIGN.md §4b): the metric whose quadratic form is the
    second-order change of the teacher's prediction when the activation moves. Channels are on axis 1 of maps and
    vectors, last in B×T×D tokens; with a padding ``mask`` each sample averages over its valid tokens only.
    """
    g = _channels_last(grad.float())
    weights = _position_weights(grad, mask)
    flat = g.reshape(-1, g.shape[-1])
    with torch.autocast(flat.device.type, enabled=False):  # a float32 statistic, also inside a bf16 step
        return (flat * weights.reshape(-1, 1)).T @ flat / g.shape[0]


def linear_head_direction_fisher(
    logits: Tensor, weight: Tensor, temperature: float = 1.0, mask: Tensor | None = None
) -> Tensor:
    """The closed form of :func:`direction_fisher` at the input h of a linear head z = Wh + b: the mean over
    samples of Wᵀ(diag p − ppᵀ)W, shape D×D (up to the factor 1/τ² that the metric's trace normalization removes).

    Per-token logits B×T×C average over each sample's valid tokens first (``mask``), as the sampled form does.
    """
    p = probabilities(logits, temperature)
    rows = p.shape[0]
    if p.dim() == 3:
        weights = _position_weights(p, mask).reshape(-1) / rows
        p = p.reshape(-1, p.shape[-1])
    else:
        weights = p.new_full((rows,), 1.0 / rows)
    w = weight.detach().float()
    with torch.autocast(w.device.type, enabled=False):  # a float32 statistic, also inside a bf16 step
        covariance = torch.diag(weights @ p) - (p * weights[:, None]).T @ p  # Σ_n w_n (diag p_n − p_n p_nᵀ)
        return w.T @ covariance @ w
