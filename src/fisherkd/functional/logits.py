"""Logit-based distillation losses. Notation: z logits, p = softmax(z/τ), t teacher, s student, y label.

Every function computes in float32 when given bf16/fp16 logits and reduces to a scalar. The losses that are a
mean over samples accept a keyword-only ``sample_weight`` (one weight per sample, mean 1): their batch mean
mean_n ℓ_n becomes mean_n w_n·ℓ_n, which is how importance (Fisher) weights plug in. Logits may have any
leading shape [..., C]; "sample" then means one row of C logits, and ``sample_weight`` has the leading shape.
Logits must be finite: mask classes out with a large negative number, not −inf (0·log 0 terms would be NaN).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fisherkd.core import UNLABELLED

__all__ = [
    "cmi",
    "cross_entropy",
    "dist",
    "dkd",
    "fisher_logit",
    "jsd",
    "kd",
    "mlkd",
    "nkd",
    "ofa",
    "ofa_branches",
    "reverse_kl",
    "sinkhorn",
    "skew_kl",
    "skew_reverse_kl",
    "standardize_logits",
    "tvd",
    "uskd",
]


# ----------------------------------------------------------------------------------------------------------
# Shared pieces


def _float32(x: Tensor) -> Tensor:
    # Softmax and logs in bf16/fp16 lose the small probabilities that KL depends on.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _log_probs(logits: Tensor, temperature: float | Tensor = 1.0) -> Tensor:
    """log softmax(z/τ) over the last axis, in float32 at least."""
    z = _float32(logits)
    if isinstance(temperature, Tensor) or temperature != 1.0:  # skip a full-size copy at τ = 1
        z = z / temperature
    return F.log_softmax(z, dim=-1)


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p ‖ q) = Σ_c p_c (log p_c − log q_c) over the last axis, one value per row."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def _log_mixture(log_p: Tensor, log_q: Tensor, weight: float) -> Tensor:
    """log(w·p + (1−w)·q) from log-probabilities, without leaving log space.

    At w = 0 and w = 1 the mixture *is* q or p, so those ends are returned as they are (log 0 is not a float).
    """
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"a mixture weight must lie in [0, 1], got {weight}")
    if weight == 0.0:
        return log_q
    if weight == 1.0:
        return log_p
    return torch.logaddexp(log_p + math.log(weight), log_q + math.log1p(-weight))


def _batch_mean(per_sample: Tensor, sample_weight: Tensor | None) -> Tensor:
    """mean_n ℓ_n, or mean_n w_n·ℓ_n with importance weights (mean 1, so the unweighted scale is kept)."""
    if sample_weight is None:
        return per_sample.mean()
    if sample_weight.shape != per_sample.shape:
        raise ValueError(
            f"sample_weight has shape {tuple(sample_weight.shape)} but the loss has one value per sample, "
            f"shape {tuple(per_sample.shape)}"
        )
    return (sample_weight.to(per_sample.dtype) * per_sample).mean()


def _at_target(x: Tensor, target: Tensor) -> Tensor:
    """x[..., y]: the entry of the label's class in each row."""
    return x.gather(-1, target.long().unsqueeze(-1)).squeeze(-1)


def _non_target(logits: Tensor, target: Tensor) -> Tensor:
    """The C−1 logits of the classes other than the label, in their original order: [..., C] → [..., C−1].

    The target column is removed, not pushed down by a large constant, so it cannot leak into a softmax over
    the non-target classes however large it is. (A gather, not boolean indexing: no host-device sync.)
    """
    j = torch.arange(logits.shape[-1] - 1, device=logits.device)
    return logits.gather(-1, j + (j >= target.long().unsqueeze(-1)))  # skip column y: j ↦ j for j < y, else j + 1


def _rows(probs: Tensor) -> Tensor:
    """[..., C] → [N, C]: the batch-level losses (DIST, Sinkhorn, MLKD) relate all rows to one another."""
    return probs.reshape(-1, probs.shape[-1])


# ----------------------------------------------------------------------------------------------------------
# Label loss and logit standardization


def cross_entropy(student_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with hard labels: −mean_n log softmax(z_s)[y_n] over the labelled rows. Rows labelled
    ``UNLABELLED`` (-100: transfer inputs that only the teacher labels) are left out; a batch without a labelled
    row gives 0, not 0/0."""
    losses = F.cross_entropy(_float32(student_logits), target, label_smoothing=label_smoothing, reduction="none")
    return losses.sum() / (target != UNLABELLED).sum().clamp_min(1)


def standardize_logits(logits: Tensor, eps: float = 1e-7) -> Tensor:
    """Sun et al., "Logit Standardization in Knowledge Distillation" (CVPR 2024).

    z ↦ (z − mean_c z) / (std_c z + eps) per sample, with the unbiased (Bessel-corrected) std as in the
    authors' code. Teacher and student then match the *shape* of their logits, not their scale and shift.
    """
    z = _float32(logits)
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + eps)


# ----------------------------------------------------------------------------------------------------------
# Divergences between the two softmax distributions


def kd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float | Tensor = 4.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    τ² · mean_n KL(p_t ‖ p_s) with p = softmax(z/τ). The τ² keeps gradient magnitudes comparable across τ.
    ``temperature`` may be a 0-d tensor that requires grad: that is CTKD's loss (Li et al., AAAI 2023), where
    the τ² factor and the softmaxes are differentiated with respect to the learned temperature.
    """
    per_sample = _kl(_log_probs(teacher_logits, temperature), _log_probs(student_logits, temperature))
    return _batch_mean(per_sample, sample_weight) * temperature**2


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Reverse KL, mode-seeking (as in MiniLLM, Gu et al., ICLR 2024): τ² · mean_n KL(p_s ‖ p_t)."""
    per_sample = _kl(_log_probs(student_logits, temperature), _log_probs(teacher_logits, temperature))
    return _batch_mean(per_sample, sample_weight) * temperature**2


def fisher_logit(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
    class_weight: Tensor | None = None,
) -> Tensor:
    """The Fisher quadratic form of the logit difference: ½·mean_n Σ_c w_c·p_t,c·(d_c − d̄)².

    d = z_s − z_t, d̄ = Σ_c p_t,c·d_c, p_t = softmax(z_t/τ). Σ_c p_c (d_c − d̄)² = dᵀ(diag p − ppᵀ)d = dᵀF d, with F
    the Fisher information of the teacher's softmax at temperature τ. It is the second-order Taylor expansion of
    Hinton KD's τ²·KL(p_t ‖ p_s) in d at d = 0 (the τ² cancels the 1/τ² of the softened logits), so the two agree
    for a student close to the teacher. It is invariant to adding a constant to either model's logits, and its
    gradient with respect to z_s is F·d per sample (divided by the batch size): a Gauss-Newton step on KD.
    ``class_weight`` [C] (or one row per sample) weights the classes; the minimum stays at d = const, i.e.
    p_s = p_t, for any positive class weights (weighting the terms of a KL would move it to p_s ∝ w·p_t).
    """
    s, t = _float32(student_logits), _float32(teacher_logits)
    p_t = F.softmax(t / temperature, dim=-1)
    d = s - t
    centered = d - (p_t * d).sum(-1, keepdim=True)
    terms = p_t * centered.pow(2)
    if class_weight is not None:
        terms = terms * class_weight.to(terms.dtype)
    return _batch_mean(0.5 * terms.sum(-1), sample_weight)


def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 0.5,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al., ICLR 2024, Eq. 1), β as in GKD/TRL.

    M = β·p_t + (1−β)·p_s;  JSD(β) = β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M), batch mean, for 0 < β < 1.

    The same value as TRL's ``GKDTrainer.generalized_jsd_loss`` (and Liger's generalized JSD) for every such β,
    so a GKD/TRL ``beta`` carries over unchanged; β = ½ is the usual JSD. Near the ends JSD(β) ≈ β·KL(p_t ‖ p_s)
    (forward-KL-like) and ≈ (1−β)·KL(p_s ‖ p_t) (reverse-KL-like): the value tends to 0, so β ∈ {0, 1} is refused
    rather than replaced by the full KLs as TRL does, which would make the loss jump there. Use ``kd`` (forward
    KL) or ``reverse_kl`` for those.
    """
    _check_jsd_beta(beta)
    log_p_s = _log_probs(student_logits, temperature)
    log_p_t = _log_probs(teacher_logits, temperature)
    log_m = _log_mixture(log_p_t, log_p_s, beta)
    per_sample = beta * _kl(log_p_t, log_m) + (1.0 - beta) * _kl(log_p_s, log_m)
    return _batch_mean(per_sample, sample_weight)


def _check_jsd_beta(beta: float) -> None:
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"jsd needs 0 < beta < 1 (beta as in GKD/TRL), got {beta}; for beta=0 use forward KL ('kd', "
            "divergence 'forward_kl'), for beta=1 reverse KL ('reverse_kl')"
        )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Total variation distance (as in Wen et al., ACL 2023, f-divergence KD): mean_n ½·Σ_c |p_t,c − p_s,c|."""
    p_s = _log_probs(student_logits, temperature).exp()
    p_t = _log_probs(teacher_logits, temperature).exp()
    return _batch_mean(0.5 * (p_t - p_s).abs().sum(-1), sample_weight)


def skew_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Skew forward KL (DistiLLM, Ko et al., ICML 2024): mean_n KL(p_t ‖ α·p_t + (1−α)·p_s).

    Mixing some teacher into the student's side bounds the divergence (by log 1/α) and its gradients.
    α = 0 is forward KL.
    """
    log_p_s = _log_probs(student_logits, temperature)
    log_p_t = _log_probs(teacher_logits, temperature)
    return _batch_mean(_kl(log_p_t, _log_mixture(log_p_t, log_p_s, alpha)), sample_weight)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    alpha: float = 0.1,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Skew reverse KL (DistiLLM, Ko et al., ICML 2024): mean_n KL(p_s ‖ α·p_s + (1−α)·p_t).

    α = 0 is reverse KL.
    """
    log_p_s = _log_probs(student_logits, temperature)
    log_p_t = _log_probs(teacher_logits, temperature)
    return _batch_mean(_kl(log_p_s, _log_mixture(log_p_s, log_p_t, alpha)), sample_weight)


# ----------------------------------------------------------------------------------------------------------
# Losses that use the label


def _binary_and_non_target(logits: Tensor, target: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    """DKD's two views of softmax(z/τ): log [p_y, 1 − p_y] ([..., 2]) and the log-softmax over the non-target
    classes alone ([..., C−1])."""
    z = _float32(logits) / temperature
    z_others = _non_target(z, target)
    log_total = z.logsumexp(-1)
    # log(1 − p_y) as a log-sum-exp over the other classes: no cancellation when p_y is close to 1.
    log_binary = torch.stack([_at_target(z, target) - log_total, z_others.logsumexp(-1) - log_total], dim=-1)
    return log_binary, z_others.log_softmax(-1)


def dkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    alpha: float = 1.0,
    beta: float = 8.0,
    temperature: float = 4.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Zhao et al., "Decoupled Knowledge Distillation" (CVPR 2022), without the warm-up (the method adds it).

    τ² · mean_n [α·TCKD + β·NCKD] with
      TCKD = KL(b_t ‖ b_s), b = [p_y, 1 − p_y] (target vs. all the rest),
      NCKD = KL(p̂_t ‖ p̂_s), p̂ = softmax over the non-target logits only (target removed).
    The paper's decomposition: KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD; DKD drops the (1 − p_t,y) coupling.
    """
    binary_s, others_s = _binary_and_non_target(student_logits, target, temperature)
    binary_t, others_t = _binary_and_non_target(teacher_logits, target, temperature)
    per_sample = alpha * _kl(binary_t, binary_s) + beta * _kl(others_t, others_s)
    return _batch_mean(per_sample, sample_weight) * temperature**2


def nkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    temperature: float = 1.0,
    gamma: float = 1.5,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels" (NKD, ICCV 2023).

    mean_n [ −p_t,y · log p_s,y  +  γ·λ² · Σ_{i≠y} −p̂_t,i · log p̂_s,i ]
    with p at temperature 1 in the target term and p̂ = softmax(z_{≠y}/λ) over the non-target logits, λ the
    temperature. The target logit is removed before that softmax, so it never enters the non-target term
    (a bug in one reference implementation let it in).
    """
    target_term = -_at_target(_log_probs(teacher_logits).exp(), target) * _at_target(_log_probs(student_logits), target)
    log_q_s = _log_probs(_non_target(student_logits, target), temperature)
    q_t = _log_probs(_non_target(teacher_logits, target), temperature).exp()
    non_target = -(q_t * log_q_s).sum(-1)
    per_sample = target_term + gamma * temperature**2 * non_target
    return _batch_mean(per_sample, sample_weight)


def ofa(
    student_logits: Tensor,
    teacher_logits: Tensor,
    target: Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation"
    (OFA, NeurIPS 2023), the logit loss.

    mean_n −Σ_c [(p_t,c + 1[c=y])^ε − 1[c=y]] · log p_s,c. With ε = 1 it is the soft-target cross-entropy
    −Σ p_t·log p_s = KL(p_t ‖ p_s) + H(p_t); ε > 1 raises the weight of the target class, more so the more
    confident the teacher is in it.
    """
    log_p_s = _log_probs(student_logits, temperature)
    p_t = _log_probs(teacher_logits, temperature).exp()
    one_hot = F.one_hot(target.long(), p_t.shape[-1]).to(p_t.dtype)
    weight = (p_t + one_hot) ** eps - one_hot
    return _batch_mean(-(weight * log_p_s).sum(-1), sample_weight)


def ofa_branches(
    branch_logits: Sequence[Tensor],
    teacher_logits: Tensor,
    target: Tensor,
    eps: float = 1.0,
    temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """OFA-KD's stage loss (Hao et al., NeurIPS 2023): Σ_k OFA(z_k, z_t, y) over the logits z_k that branch
    heads project from intermediate student stages, each against the teacher's final logits with the adaptive
    target [(p_t,c + 1[c=y])^ε − 1[c=y]] of :func:`ofa`.
    """
    if not branch_logits:
        raise ValueError("ofa_branches: no branch logits; give the student stages as the method's pairs")
    terms = [ofa(z, teacher_logits, target, eps, temperature, sample_weight=sample_weight) for z in branch_logits]
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------------------------------------
# Batch-level losses


def _pearson(a: Tensor, b: Tensor, dim: int, eps: float = 1e-8) -> Tensor:
    """Pearson correlation along ``dim``; eps in the denominator as in the DIST reference code."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    return (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + eps)


def dist(
    student_logits: Tensor,
    teacher_logits: Tensor,
    beta: float = 1.0,
    gamma: float = 1.0,
    temperature: float = 4.0,
) -> Tensor:
    """Huang et al., "Knowledge Distillation from A Stronger Teacher" (DIST, NeurIPS 2022).

    τ² · [β·(1 − mean_n ρ(p_s[n,:], p_t[n,:])) + γ·(1 − mean_c ρ(p_s[:,c], p_t[:,c]))], ρ the Pearson
    correlation: inter-class relations per sample, intra-class relations per class across the batch.
    Matching correlations, not values, tolerates the scale and shift gap to a much stronger teacher.
    """
    p_s = _rows(_log_probs(student_logits, temperature).exp())
    p_t = _rows(_log_probs(teacher_logits, temperature).exp())
    inter = 1.0 - _pearson(p_s, p_t, dim=1).mean()
    intra = 1.0 - _pearson(p_s, p_t, dim=0).mean()
    return temperature**2 * (beta * inter + gamma * intra)


def sinkhorn(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iterations: int = 20,
) -> Tensor:
    """Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation" (2024).

    Batch-level entropic optimal transport between the student's and the teacher's predictions:
    cost M[i,j] = ‖p_s,i − p_t,j‖₁ over the B×B pairs, kernel K = exp(−M/ε), then ``iterations`` rounds of
    Sinkhorn scaling (normalize rows, then columns) give the plan P; the loss is Σ_ij P_ij·M_ij / B.

    The scaling runs in log space (log K = −M/ε) so small ε cannot underflow the kernel; it is the same
    alternating normalization as the reference, and gradients flow through every iteration as there.
    After the last (column) step each teacher sample's column of P sums to one, so dividing by B makes the
    value the mean transport cost per sample; the reference returns the sum and scales it by 1e-3.
    """
    p_s = _rows(_log_probs(student_logits, temperature).exp())
    p_t = _rows(_log_probs(teacher_logits, temperature).exp())
    cost = torch.cdist(p_s, p_t, p=1)
    log_plan = -cost / epsilon
    for _ in range(iterations):
        log_plan = log_plan - log_plan.logsumexp(dim=1, keepdim=True)
        log_plan = log_plan - log_plan.logsumexp(dim=0, keepdim=True)
    return (log_plan.exp() * cost).sum() / cost.shape[1]


def mlkd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperatures: Sequence[float] = (2.0, 3.0, 4.0, 5.0, 6.0),
) -> Tensor:
    """Jin, Wang, Lin, "Multi-Level Logit Distillation" (MLKD, CVPR 2023), one augmented view.

    Σ_τ [ τ²·mean_n KL(p_t ‖ p_s)                      (instance level)
        + ‖P_t P_tᵀ − P_s P_sᵀ‖²_F / B                 (batch level: B×B sample-similarity Gram matrices)
        + ‖P_tᵀ P_t − P_sᵀ P_s‖²_F / C ]               (class level: C×C class-correlation matrices)
    with P = softmax(Z/τ) the B×C probability matrix, as in the authors' code (τ² on the instance term only).
    The authors' confidence masks and weak/strong augmentation pair are not part of this loss.
    """
    terms = []
    for tau in temperatures:
        p_s = _rows(_log_probs(student_logits, tau).exp())
        p_t = _rows(_log_probs(teacher_logits, tau).exp())
        instance = kd(student_logits, teacher_logits, tau)
        batch = (p_t @ p_t.T - p_s @ p_s.T).square().sum() / p_s.shape[0]
        classes = (p_t.T @ p_t - p_s.T @ p_s).square().sum() / p_s.shape[1]
        terms += [instance, batch, classes]
    return torch.stack(terms).sum()


# ----------------------------------------------------------------------------------------------------------
# Teacher-free


def uskd(
    student_logits: Tensor,
    target: Tensor,
    weak_logits: Tensor | None = None,
    alpha: float = 0.1,
    beta: float = 0.1,
    mu: float = 0.1,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels" (USKD, ICCV 2023): self-distillation with no teacher.

    mean_n [ α·(−t̃_n·log p_y)  +  β·Σ_{i≠y} −q_i·log p̂_i  +  μ·Σ_c −ỹ_c·log softmax(w)_c ] with
      p = softmax(z) the student's prediction, p̂ = softmax(z_{≠y}) over the non-target logits (target removed);
      t̃ = p_y² + 1 − mean_batch(p_y²), the soft target label: the squared (smoothed) target probability, shifted so
          that its batch mean is 1;
      q = Zipf soft labels: every class ranked by the score r_i = w_i/(1 − w_y + ε) + log p_i/(1 − log p_y), the class
          at rank k (1 = highest) given 1/k, the target dropped and the rest normalised to sum 1;
      w = softmax of ``weak_logits``, a linear head on an intermediate feature, trained by the third term with the
          label smoothed as ỹ = 0.9·onehot(y) + 0.1/C.
    t̃ and q are constants (no gradient). The score r is the authors' code's (cls_KD, ``USKDLoss``, ε = 10⁻⁶): its
    final-logit part uses log-probabilities; within one sample that part alone ranks the classes as p does. Without
    ``weak_logits`` the ranks come from the final logits alone and the μ term is left out.
    """
    log_p = _log_probs(student_logits)
    log_p_y = _at_target(log_p, target)
    squared = log_p_y.detach().mul(2.0).exp()  # p_y², a constant label
    soft_target = squared + 1.0 - squared.mean()
    target_term = -soft_target * log_p_y

    score = log_p.detach() / (1.0 - log_p_y.detach().unsqueeze(-1))
    weak_term = None
    if weak_logits is not None:
        log_w = _log_probs(weak_logits)
        w = log_w.detach().exp()
        score = score + w / (1.0 - _at_target(w, target).unsqueeze(-1) + 1e-6)  # the authors' 1e-6: w_y may round to 1
        smoothed = F.one_hot(target.long(), log_w.shape[-1]).to(log_w.dtype) * 0.9 + 0.1 / log_w.shape[-1]
        weak_term = -(smoothed * log_w).sum(-1)
    rank = score.argsort(-1, descending=True).argsort(-1)  # 0 for the highest-scoring class
    zipf = _non_target(1.0 / (rank + 1).to(log_p.dtype), target)
    zipf = zipf / zipf.sum(-1, keepdim=True)
    non_target = -(zipf * _log_probs(_non_target(student_logits, target))).sum(-1)

    per_sample = alpha * target_term + beta * non_target
    if weak_term is not None:
        per_sample = per_sample + mu * weak_term
    return _batch_mean(per_sample, sample_weight)


def cmi(logits: Tensor, target: Tensor, temperature: float = 1.0) -> Tensor:
    """Conditional mutual information I(X; Ŷ | Y) of a classifier's outputs, estimated on one batch.

    Ye, Mohajer Hamidi, Tan & Yang, "Bayes Conditional Distribution Estimation for Knowledge Distillation Based on
    Conditional Mutual Information" (MCMI), ICLR 2024, arXiv:2401.08732; code github.com/iclr2024mcmi/ICLRMCMI.

        CMI = E_y E_{x|y} KL(p(x) ‖ p̄_y) = (1/N) Σ_n KL(p_n ‖ p̄_{y_n}),   p̄_y = mean of p_n over the rows labelled y,

    with p = softmax(z/τ): how far each output lies from its class's mean output. A maximum-CMI teacher minimises
    CE − λ·CMI, which spreads the outputs within each class (more "dark knowledge" per sample). Rows labelled
    ``UNLABELLED`` (-100) are left out; a class seen once in the batch adds 0. The class means keep their gradient,
    which changes nothing: p̄_y minimises Σ_n KL(p_n ‖ q) over q, so d CMI / d p̄_y is 0 along the simplex. (The
    authors use class means from the whole training set, fixed while they fine-tune; this is their per-batch form.)
    """
    log_p = _log_probs(logits, temperature)
    p = log_p.exp()
    labelled = target != UNLABELLED
    members = F.one_hot(torch.where(labelled, target, 0).long(), p.shape[-1]).to(p.dtype) * labelled[:, None]
    means = (members.T @ p) / members.sum(0).clamp_min(1.0)[:, None]  # row y: p̄_y
    # p̄_y ≥ p_n / N where p_n > 0; where p_n underflows to 0 the clamp keeps 0·log 0 at 0, not NaN
    log_means = means.clamp_min(torch.finfo(p.dtype).tiny).log()
    per_sample = (p * (log_p - log_means[torch.where(labelled, target, 0)])).sum(-1)
    return (per_sample * labelled).sum() / labelled.sum().clamp_min(1)
