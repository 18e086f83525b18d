"""Losses that read a student feature through the teacher's frozen linear classifier z = Wh + b.

Features are B×D vectors: the projected student feature P(h_s) and the teacher's feature h_t, both at the input
of the teacher's classifier (maps are average-pooled first by the caller, as the classifier sees them). ``weight``
(C×D) and ``bias`` (C) are the classifier's. Optional ``sample_weight`` (shape B, mean 1) weights the batch mean.

Why this family: at h_t, KL(p_t ‖ softmax((W(h_t+δ)+b)/τ)) = ½ δᵀMδ + O(δ³) with M = Wᵀ(diag p − ppᵀ)W/τ²
= Cov_{c∼p}(w_c)/τ², rank ≤ C − 1. A hint loss ‖δ‖² spends its gradient on every direction alike; the head metric
only on the directions the teacher's classifier reads (docs: DESIGN.md §4b).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from fisherkd.functional.features import _batch_mean
from fisherkd.functional.logits import _float32, kd

__all__ = ["head_kd", "simkd", "srrl"]


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
