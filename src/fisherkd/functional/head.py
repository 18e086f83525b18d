"""Losses that read a student feature through the teacher's frozen linear classifier z = Wh + b.

Features are B×D vectors: the projected student feature P(h_s) and the teacher's feature h_t, both at the input
of the teacher's classifier (maps are average-pooled first by the caller, as the classifier sees them). ``weight``
(C×D) and ``bias`` (C) are the classifier's. Optional ``sample_weight`` (shape B, mean 1) weights the batch mean.

Why this family: at h_t, KL(p_t ‖ softmax((W(h_t+δ)+b)/τ)) = ½ δᵀMδ + O(δ³) with M = Wᵀ(diag p − ppᵀ)W/τ²
= Cov_{c∼p}(w_c)/τ², rank ≤ C − 1. A hint loss ‖δ‖² spends its gradient on every direction alike; the head metric
only on the directions the teacher's classifier reads (docs: DESIGN.md §4b).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from fisherkd.functional.features import _batch_mean
from fisherkd.functional.logits import _float32, _kl, _log_probs, kd

__all__ = ["head_kd", "lelp", "simkd", "srrl"]


def _check_head(student: Tensor, teacher: Tensor, weight: Tensor, bias: Tensor | None, name: str) -> None:
    if student.dim() != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} must be "
            "equal B×D vectors (pool maps first)"
        )
    bad_bias = bias is not None and bias.shape != weight.shape[:1]
    if weight.dim() != 2 or weight.shape[1] != student.shape[1] or bad_bias:
        found = f"weight {tuple(weight.shape)}" + ("" if bias is None else f", bias {tuple(bias.shape)}")
        raise ValueError(
            f"{name}: a classifier with {found} cannot read features of width {student.shape[1]}; expected weight "
            f"(C, {student.shape[1]}) and bias (C,)"
        )


def _through_head(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    x = _float32(x)
    return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))


def head_kd(
    student_feature: Tensor,
    teacher_feature: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    temperature: float = 4.0,
    *,
    anchor_weight: float = 0.0,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Head-metric transfer: KD through the teacher's frozen classifier, the exact form of the full Fisher hint.

    τ² · mean_b KL(softmax(z_t/τ) ‖ softmax(z_s/τ)) + anchor_weight · mean_b mean_d (P(h_s) − h_t)², with
    z_s = W·P(h_s) + b and z_t = W·h_t + b. Its second-order expansion in δ = P(h_s) − h_t is ½ τ² δᵀMδ,
    M = Wᵀ(diag p_t − p_t p_tᵀ)W/τ² (the Fisher metric of the teacher's head); the optional isotropic anchor pins
    the directions M cannot see (its null space, of dimension ≥ D − C + 1).
    """
    _check_head(student_feature, teacher_feature, weight, bias, "head_kd")
    student_logits = _through_head(student_feature, weight, bias)
    teacher_logits = _through_head(teacher_feature, weight, bias)
    loss = kd(student_logits, teacher_logits, temperature, sample_weight=sample_weight)
    if anchor_weight:
        gap = (_float32(student_feature) - _float32(teacher_feature)).pow(2).mean(1)
        loss = loss + anchor_weight * _batch_mean(gap, sample_weight, "head_kd")
    return loss


def simkd(student_feature: Tensor, teacher_feature: Tensor, *, sample_weight: Tensor | None = None) -> Tensor:
    """SimKD's loss (Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022).

    mean_b mean_{c,h,w} (P(F_s) − F_t)², the MSE between the projected student map and the teacher's last map (of
    equal shapes: the method aligns their spatial sizes before projecting). The student then predicts with the
    teacher's classifier on the pooled P(F_s), so matching the map is matching what that classifier reads.
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"simkd: projected student feature {tuple(student_feature.shape)} and teacher feature "
            f"{tuple(teacher_feature.shape)} differ; align their spatial sizes and project to the teacher's channels"
        )
    gap = (_float32(student_feature) - _float32(teacher_feature)).pow(2)
    return _batch_mean(gap.reshape(gap.shape[0], -1).mean(1), sample_weight, "simkd")


def srrl(
    student_feature: Tensor,
    teacher_feature: Tensor,
    teacher_logits: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    *,
    feature_weight: float = 1.0,
    logit_weight: float = 1.0,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """SRRL (Yang et al., "Knowledge Distillation via Softmax Regression Representation Learning", ICLR 2021).

    feature_weight · mean_b mean_d (P(h_s) − h_t)² + logit_weight · mean_b mean_c (W·P(h_s) + b − z_t)²: feature
    matching plus "softmax regression", the student's feature read by the teacher's classifier regressed onto the
    teacher's logits z_t. The logit term's metric on δ = P(h_s) − h_t (when z_t = W·h_t + b) is WᵀW/C.
    """
    _check_head(student_feature, teacher_feature, weight, bias, "srrl")
    logits = _through_head(student_feature, weight, bias)
    if teacher_logits.shape != logits.shape:
        raise ValueError(
            f"srrl: teacher logits {tuple(teacher_logits.shape)} do not match the {tuple(logits.shape)} logits of "
            "the teacher's classifier on the student feature: name the classifier that gives the teacher's logits"
        )
    feature = (_float32(student_feature) - _float32(teacher_feature)).pow(2).mean(1)
    regression = (logits - _float32(teacher_logits)).pow(2).mean(1)
    return _batch_mean(feature_weight * feature + logit_weight * regression, sample_weight, "srrl")


def lelp(
    student_subclass_logits: Tensor,
    teacher_logits: Tensor,
    teacher_feature: Tensor,
    directions: Tensor,
    centers: Tensor,
    temperature: float = 1.0,
    subclass_temperature: float = 1.0,
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """LELP's loss (Loo et al., "Linear Projections of Teacher Embeddings for Few-Class Distillation", 2024).

    τ² · mean_b KL(P_t ‖ P_s) over C·S pseudo-subclasses (S = ``directions.shape[1]`` per class), with
      log P_t(c, j) = log softmax(z_t/τ)_c + log softmax_j(a_{c,j}/β),  a_{c,j} = ⟨v_{c,j}, h_t − μ_c⟩,
      log P_s = log softmax(u/τ) over the C·S student logits u, ordered class-major (index c·S + j).
    The teacher splits its probability of class c among that class's S pseudo-subclasses by where its embedding
    h_t lies along the class's directions v_{c,j} (C×S×D, around the class centre μ_c, C×D); β is the subclass
    temperature. Summing P_s over a class's subclasses gives the student's class probability.
    """
    classes, subclasses = directions.shape[:2]
    if student_subclass_logits.shape[-1] != classes * subclasses or teacher_logits.shape[-1] != classes:
        raise ValueError(
            f"lelp: {classes} classes × {subclasses} subclasses need student logits of width {classes * subclasses} "
            f"and teacher logits of width {classes}, got {student_subclass_logits.shape[-1]} and "
            f"{teacher_logits.shape[-1]}"
        )
    h = _float32(teacher_feature)
    scores = torch.einsum("csd,bcd->bcs", directions.to(h.dtype), h[:, None, :] - centers.to(h.dtype))
    log_target = _log_probs(teacher_logits, temperature)[:, :, None] + _log_probs(scores, subclass_temperature)
    per_sample = _kl(log_target.flatten(1), _log_probs(student_subclass_logits, temperature))
    return _batch_mean(per_sample, sample_weight, "lelp") * temperature**2
