"""Relation-based distillation losses: the student matches how the teacher relates samples (or tokens) to each other.

Sample relations flatten every feature to one vector per sample (B×…→B×D), so student and teacher dimensions may
differ. Computations run in float32 for half-precision inputs and in the input precision otherwise.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from fisherkd.functional.features import _batch_mean
from fisherkd.functional.logits import _float32, _log_mixture

__all__ = ["cc", "cka", "crd_nce", "crd_normalizer", "mi_alpha", "pkt", "relation", "rkd", "sp"]


def _flat_pair(student: Tensor, teacher: Tensor, name: str, min_batch: int = 1) -> tuple[Tensor, Tensor]:
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(f"{name}: student batch {student.shape[0]} and teacher batch {teacher.shape[0]} differ")
    if student.shape[0] < min_batch:
        raise ValueError(f"{name}: needs a batch of at least {min_batch} samples, got {student.shape[0]}")
    return _float32(student).flatten(1), _float32(teacher).flatten(1)


def _tiny(x: Tensor) -> float:
    return torch.finfo(x.dtype).tiny


def sp(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Tung & Mori, "Similarity-Preserving Knowledge Distillation" (ICCV 2019).

    ‖N(G_s) − N(G_t)‖²_F / B², with G = F·Fᵀ the B×B Gram matrix of the flattened features and N the L2
    normalisation of each row.
    """
    s, t = _flat_pair(student_feature, teacher_feature, "sp")
    g_s = F.normalize(s @ s.T, dim=1)
    g_t = F.normalize(t @ t.T, dim=1)
    return (g_s - g_t).pow(2).sum() / s.shape[0] ** 2


def _pkt_probabilities(x: Tensor, eps: float) -> Tensor:
    x = x / (x.norm(dim=1, keepdim=True) + eps)  # the authors' normalisation (eps in the denominator)
    kernel = (x @ x.T + 1.0) / 2.0
    return kernel / kernel.sum(1, keepdim=True)


def pkt(
    student_feature: Tensor, teacher_feature: Tensor, eps: float = 1e-7, *, sample_weight: Tensor | None = None
) -> Tensor:
    """Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer" (ECCV 2018).

    mean over all pairs (i, j) of P_t,ij·log((P_t,ij + ε)/(P_s,ij + ε)), where P is the cosine kernel (cos_ij + 1)/2
    of the L2-normalised flattened features with each row normalised to sum 1. ``sample_weight`` weights rows i.
    """
    s, t = _flat_pair(student_feature, teacher_feature, "pkt")
    p_s, p_t = _pkt_probabilities(s, eps), _pkt_probabilities(t, eps)
    kl = p_t * torch.log((p_t + eps) / (p_s + eps))
    return _batch_mean(kl.mean(1), sample_weight, "pkt")


def _rkd_distances(x: Tensor) -> Tensor:
    distances = (x.unsqueeze(1) - x.unsqueeze(0)).norm(dim=-1)
    n = x.shape[0]
    return distances / (distances.sum() / (n * (n - 1)))  # the diagonal is 0, so this is the mean over i ≠ j


def _rkd_angles(x: Tensor) -> Tensor:
    # unit[j, i] = e_ij = (x_i − x_j)/‖x_i − x_j‖; angles[j, i, k] = ⟨e_ij, e_kj⟩, the angle at vertex j.
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)
    return unit @ unit.transpose(1, 2)


def rkd(
    student_feature: Tensor, teacher_feature: Tensor, distance_weight: float = 25.0, angle_weight: float = 50.0
) -> Tensor:
    """Park et al., "Relational Knowledge Distillation" (CVPR 2019).

    w_d·Huber(ψ_D(s), ψ_D(t)) + w_a·Huber(ψ_A(s), ψ_A(t)) on flattened features. ψ_D: the B×B Euclidean distances
    divided by their mean over i ≠ j; ψ_A: the B×B×B cosines ⟨e_ij, e_kj⟩ of unit difference vectors. Huber is
    smooth-L1 (β = 1) averaged over all B² (resp. B³) entries; degenerate entries (i = j or k = j) are 0 on both
    sides, as in the authors' code.
    """
    s, t = _flat_pair(student_feature, teacher_feature, "rkd", min_batch=2)
    loss = distance_weight * F.smooth_l1_loss(_rkd_distances(s), _rkd_distances(t))
    return loss + angle_weight * F.smooth_l1_loss(_rkd_angles(s), _rkd_angles(t))


def _cc_kernel(x: Tensor, gamma: float, order: int) -> Tensor:
    x = F.normalize(x, dim=1)
    similarity = x @ x.T
    # exp(−γ‖x_i − x_j‖²) = e^{−2γ}·e^{2γ·x_iᵀx_j} for unit vectors, expanded to the given Taylor order.
    coefficients = [math.exp(-2 * gamma) * (2 * gamma) ** p / math.factorial(p) for p in range(order + 1)]
    return sum(c * similarity.pow(p) for p, c in enumerate(coefficients))


def cc(student_embedding: Tensor, teacher_embedding: Tensor, gamma: float = 0.4, order: int = 2) -> Tensor:
    """Peng et al., "Correlation Congruence for Knowledge Distillation" (ICCV 2019).

    ‖K_s − K_t‖²_F / B², with K_ij = Σ_{p=0..P} e^{−2γ}(2γ)^p/p!·(x̂_iᵀx̂_j)^p the P-order Taylor expansion of the
    Gaussian RBF kernel exp(−γ‖x̂_i − x̂_j‖²) between the L2-normalised embeddings x̂.
    """
    s, t = _flat_pair(student_embedding, teacher_embedding, "cc")
    return (_cc_kernel(s, gamma, order) - _cc_kernel(t, gamma, order)).pow(2).mean()


def cka(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """1 − linear CKA (Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019).

    CKA(X, Y) = ‖YᵀX‖²_F / (‖XᵀX‖_F·‖YᵀY‖_F) for the flattened features centred over the batch; computed through
    the B×B Gram matrices, ‖YᵀX‖²_F = ⟨XXᵀ, YYᵀ⟩. Not the square root: for 1-D features CKA is the squared Pearson
    correlation.
    """
    x, y = _flat_pair(student_feature, teacher_feature, "cka", min_batch=2)
    x, y = x - x.mean(0), y - y.mean(0)
    k, l = x @ x.T, y @ y.T
    similarity = (k * l).sum() / ((k * k).sum() * (l * l).sum()).sqrt().clamp_min(_tiny(k))
    return 1.0 - similarity


def _tokens(x: Tensor, name: str) -> Tensor:
    if x.dim() == 3:
        return x
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)  # B×C×H×W → B×(H·W)×C: positions as tokens
    raise ValueError(f"{name}: needs B×T×D tokens or B×C×H×W maps, got shape {tuple(x.shape)}")


def relation(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    mask: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Relation distillation of LLaVA-KD (RDist): Cai et al., "LLaVA-KD: A Framework of Distilling Multimodal Large
    Language Models" (arXiv:2410.16236, ICCV 2025).

    Per sample b, S = F̂·F̂ᵀ is the T×T cosine self-similarity of its tokens (B×C×H×W maps: H·W tokens of C dims);
    the loss is mean_b [1 − cos(vec S_s,b, vec S_t,b)], maximising the cosine similarity between the student's and
    the teacher's self-correlation matrices as in the paper. ``mask`` (B×T, 1 = valid) keeps only pairs of valid
    tokens; samples without any valid token are left out of the mean.
    """
    s, t = _tokens(_float32(student_feature), "relation"), _tokens(_float32(teacher_feature), "relation")
    if s.shape[:2] != t.shape[:2]:
        raise ValueError(
            f"relation: student tokens {tuple(s.shape)} and teacher tokens {tuple(t.shape)} differ in batch or "
            "token count (only the feature dimension may differ)"
        )
    s, t = F.normalize(s, dim=-1), F.normalize(t, dim=-1)
    sim_s, sim_t = s @ s.transpose(1, 2), t @ t.transpose(1, 2)
    valid = torch.ones(s.shape[:2], dtype=s.dtype, device=s.device)
    if mask is not None:
        if mask.shape != s.shape[:2]:
            raise ValueError(f"relation: mask of shape {tuple(mask.shape)} does not fit tokens {tuple(s.shape[:2])}")
        valid = mask.to(s.dtype)
    pairs = valid.unsqueeze(2) * valid.unsqueeze(1)
    dot = (pairs * sim_s * sim_t).sum((1, 2))
    norms = ((pairs * sim_s.pow(2)).sum((1, 2)) * (pairs * sim_t.pow(2)).sum((1, 2))).sqrt()
    per_sample = 1.0 - dot / norms.clamp_min(_tiny(norms))
    if mask is None:
        return _batch_mean(per_sample, sample_weight, "relation")
    has_tokens = (valid.sum(1) > 0).to(s.dtype)
    weights = has_tokens if sample_weight is None else has_tokens * sample_weight.to(s.dtype)
    return (weights * per_sample).sum() / has_tokens.sum().clamp_min(1.0)


def _crd_scores(anchor: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    anchor, positive, negatives = _float32(anchor), _float32(positive), _float32(negatives)
    if negatives.dim() == 2:  # K×D shared by the whole batch (a queue)
        negative_logits = anchor @ negatives.T
    else:  # B×K×D, one set per sample (rows of a memory bank)
        negative_logits = torch.bmm(negatives, anchor.unsqueeze(-1)).squeeze(-1)
    positive_logits = (anchor * positive).sum(-1, keepdim=True)
    return (torch.cat([positive_logits, negative_logits], 1) / temperature).exp()


@torch.no_grad()
def crd_normalizer(
    anchor: Tensor, positive: Tensor, negatives: Tensor, *, num_data: int, temperature: float = 0.07
) -> Tensor:
    """CRD's partition estimate Z = N·mean exp(vᵀa/τ) over the batch and its K + 1 candidates (detached)."""
    return _crd_scores(anchor, positive, negatives, temperature).mean() * num_data


def crd_nce(
    anchor: Tensor,
    positive: Tensor,
    negatives: Tensor,
    *,
    num_data: int,
    temperature: float = 0.07,
    normalizer: Tensor | float | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """One direction of CRD's NCE loss: Tian et al., "Contrastive Representation Distillation" (ICLR 2020).

    ``anchor`` B×D embeddings of one model; ``positive`` B×D the other model's embeddings of the same samples;
    ``negatives`` B×K×D (per sample) or K×D (shared). With P_k = exp(v_kᵀa/τ)/Z and m = K/N (N = ``num_data``,
    noise P_n = 1/N): loss = −mean_b [log(P_0/(P_0 + m + ε)) + Σ_k log(m/(P_k + m + ε))], ε = 1e-7. Z defaults to
    :func:`crd_normalizer` of this batch; the authors estimate it once, on the first batch, and keep it.
    """
    scores = _crd_scores(anchor, positive, negatives, temperature)
    if normalizer is None:
        normalizer = scores.detach().mean() * num_data
    probabilities = scores / normalizer
    eps = 1e-7
    m = (scores.shape[1] - 1) / num_data
    log_positive = torch.log(probabilities[:, 0] / (probabilities[:, 0] + m + eps))
    log_negatives = torch.log(m / (probabilities[:, 1:] + m + eps)).sum(1)
    return _batch_mean(-(log_positive + log_negatives), sample_weight, "crd")


def mi_alpha(
    scores: Tensor, log_baseline: Tensor, alpha: float = 0.5, *, sample_weight: Tensor | None = None
) -> Tensor:
    """MI-α (He et al., "Distiller: A Systematic Study of Model Distillation Methods in Natural Language
    Processing", SustaiNLP 2021): minus the interpolated lower bound I_α on the mutual information between student
    and teacher representations (Poole et al., "On Variational Bounds of Mutual Information", ICML 2019).

    With critic scores S_ij = f(x_i, y_j) (student sample i, teacher sample j; the batch's diagonal pairs are the
    joint samples) and a baseline log q(y_j):
      I_α = 1 + mean_j [S_jj − log d_j] − mean_j mean_k exp(S_kj − log d_j),
      d_j = α·m_j + (1 − α)·q(y_j),  m_j = mean_k exp(S_kj),
    m_j the Monte-Carlo partition estimate over the batch's N student samples (the paper's K + 1 = the batch), and
    the marginal expectation taken over the same N samples. α = 1 gives InfoNCE, mean_j log(exp S_jj / m_j)
    (≤ log N); α = 0 the TUBA bound with baseline q; larger α lowers the variance and raises the bias. Returns
    −I_α (a loss; the critics and the student raise the bound). ``sample_weight`` weights the teacher samples j.
    """
    s = _float32(scores)
    if s.dim() != 2 or s.shape[0] != s.shape[1] or log_baseline.shape != s.shape[:1]:
        raise ValueError(
            f"mi_alpha: needs N×N critic scores and N baselines, got {tuple(s.shape)} and {tuple(log_baseline.shape)}"
        )
    log_m = s.logsumexp(0) - math.log(s.shape[0])
    log_d = _log_mixture(log_m, log_baseline.to(s.dtype), alpha)
    joint = s.diagonal() - log_d
    marginal = (s - log_d).exp().mean(0)
    return _batch_mean(-(1.0 + joint - marginal), sample_weight, "mi_alpha")
