"""Feature-based distillation losses on tapped intermediate tensors.

Layouts: B×C×H×W maps and B×D vectors carry channels on axis 1; B×T×D token sequences carry them last. Optional
importance weights (mean 1) plug in as ``channel_weight`` (teacher channels, shape C or B×C), ``position_weight`` (one
map per sample: B×H×W for maps, B×T for token sequences) and ``sample_weight`` (shape B); all-ones weights give the
unweighted value exactly.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from fisherkd.functional.logits import _float32

__all__ = ["at", "fitnet", "hcl", "vid"]


def _channel_axis(x: Tensor) -> int:
    return -1 if x.dim() == 3 else 1


def _channel_view(weight: Tensor, x: Tensor, name: str) -> Tensor:
    """Reshape a per-channel tensor (C or B×C) so that it broadcasts over the channel axis of ``x``."""
    axis = _channel_axis(x) % x.dim()
    channels = x.shape[axis]
    if weight.shape not in {(channels,), (x.shape[0], channels)}:
        raise ValueError(
            f"{name}: channel weights of shape {tuple(weight.shape)} do not fit a feature of shape {tuple(x.shape)}; "
            f"expected ({channels},) or ({x.shape[0]}, {channels}) for its {channels} channels"
        )
    shape = [1] * x.dim()
    shape[axis] = channels
    if weight.dim() == 2:
        shape[0] = x.shape[0]
    return weight.to(x.dtype).reshape(shape)


def _position_view(weight: Tensor, x: Tensor, name: str) -> Tensor:
    """Reshape a per-sample position map (``x``'s shape without the channel axis) to broadcast over channels."""
    axis = _channel_axis(x) % x.dim()
    expected = x.shape[:axis] + x.shape[axis + 1 :]
    if x.dim() < 3 or weight.shape != expected:
        raise ValueError(
            f"{name}: position weights of shape {tuple(weight.shape)} do not fit a feature of shape {tuple(x.shape)}; "
            f"expected {tuple(expected)} (one weight per sample and position)"
        )
    return weight.to(x.dtype).unsqueeze(axis)


def _per_sample_mean(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1).mean(1)


def _batch_mean(per_sample: Tensor, sample_weight: Tensor | None, name: str) -> Tensor:
    """Mean over the batch of a per-sample loss, optionally weighted by ``sample_weight`` (shape B, mean 1)."""
    if sample_weight is None:
        return per_sample.mean()
    if sample_weight.shape != per_sample.shape:
        raise ValueError(
            f"{name}: sample weights of shape {tuple(sample_weight.shape)} do not fit a batch of {per_sample.shape[0]}"
        )
    return (per_sample * sample_weight.to(per_sample.dtype)).mean()


def _check_same_shape(student: Tensor, teacher: Tensor, name: str, hint: str) -> None:
    if student.shape != teacher.shape:
        raise ValueError(
            f"{name}: student feature {tuple(student.shape)} and teacher feature {tuple(teacher.shape)} differ; {hint}"
        )


def fitnet(
    student_feature: Tensor,
    teacher_feature: Tensor,
    *,
    channel_weight: Tensor | None = None,
    position_weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
    metric: Tensor | None = None,
) -> Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    Mean squared error between the (adapted) student feature and the teacher's hint: mean (f_s − f_t)²,
    each channel c weighted by ``channel_weight[c]``, each position by ``position_weight[b, ...]`` and each sample
    by ``sample_weight[b]`` when given.

    With a C×C ``metric`` M (the Fisher directions of :mod:`fisherkd.fisher.metric`) the hint is measured along it
    instead of channel by channel: mean over samples and positions of dᵀMd, d = f_s − f_t along the channel axis,
    so that M = I/C is exactly the plain MSE (DESIGN.md §4b).
    """
    _check_same_shape(student_feature, teacher_feature, "fitnet", "give the method an adapter or tap equal layers")
    if metric is not None:
        if channel_weight is not None:
            raise ValueError("fitnet: give channel weights or a metric, not both (a metric's diagonal is its channels)")
        difference = _float32(student_feature) - _float32(teacher_feature)
        axis = _channel_axis(difference) % difference.dim()
        channels = difference.shape[axis]
        if metric.shape != (channels, channels):
            raise ValueError(
                f"fitnet: metric of shape {tuple(metric.shape)} does not fit a feature of shape "
                f"{tuple(difference.shape)}; expected ({channels}, {channels}) for its {channels} channels"
            )
        last = difference.movedim(axis, -1)
        with torch.autocast(last.device.type, enabled=False):  # float32 like the plain hint, also under bf16 autocast
            squared = (last * (last @ metric.to(last.dtype))).sum(-1)  # dᵀMd at each position, laid out like the map
        if position_weight is not None:
            squared = squared * _position_view(position_weight, difference, "fitnet").squeeze(axis)
        return _batch_mean(_per_sample_mean(squared), sample_weight, "fitnet")
    squared = (_float32(student_feature) - _float32(teacher_feature)).pow(2)
    if channel_weight is not None:
        squared = squared * _channel_view(channel_weight, squared, "fitnet")
    if position_weight is not None:
        squared = squared * _position_view(position_weight, squared, "fitnet")
    return _batch_mean(_per_sample_mean(squared), sample_weight, "fitnet")


def _attention_map(feature: Tensor, p: float, channel_weight: Tensor | None = None) -> Tensor:
    energy = _float32(feature).abs().pow(p)
    if channel_weight is not None:
        energy = energy * _channel_view(channel_weight, energy, "at")
    return F.normalize(energy.mean(1).flatten(1), dim=1)


def at(
    student_feature: Tensor,
    teacher_feature: Tensor,
    p: float = 2.0,
    *,
    channel_weight: Tensor | None = None,
    position_weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Zagoruyko & Komodakis, "Paying More Attention to Attention" (ICLR 2017).

    mean over batch and positions of (Q_s − Q_t)², Q = vec(mean_c |F_c|^p) / ‖vec(mean_c |F_c|^p)‖₂, for one pair
    of B×C×H×W maps whose channel counts may differ. ``channel_weight`` (teacher channels) weights the teacher's
    channel mean before normalising; ``position_weight`` (B×H×W) weights the squared differences per position.
    """
    if student_feature.dim() != 4 or teacher_feature.dim() != 4:
        raise ValueError(
            f"at: needs B×C×H×W maps, got student {tuple(student_feature.shape)} and teacher "
            f"{tuple(teacher_feature.shape)}"
        )
    if student_feature.shape[0] != teacher_feature.shape[0] or student_feature.shape[2:] != teacher_feature.shape[2:]:
        raise ValueError(
            f"at: student map {tuple(student_feature.shape)} and teacher map {tuple(teacher_feature.shape)} differ in "
            "batch or spatial size; tap layers of equal resolution (only channels may differ)"
        )
    q_s = _attention_map(student_feature, p)
    q_t = _attention_map(teacher_feature, p, channel_weight)
    squared = (q_s - q_t).pow(2)
    if position_weight is not None:
        squared = squared * _position_view(position_weight, teacher_feature, "at").flatten(1)
    return _batch_mean(squared.mean(1), sample_weight, "at")


def vid(
    mean: Tensor,
    variance: Tensor,
    teacher_feature: Tensor,
    *,
    channel_weight: Tensor | None = None,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Ahn et al., "Variational Information Distillation for Knowledge Transfer" (CVPR 2019).

    Gaussian negative log-likelihood of the teacher feature t under the student's prediction: mean over all
    elements of ½·[(t − μ)²/σ²_c + log σ²_c], with ``mean`` μ regressed from the student (same shape as t) and
    ``variance`` σ² one positive value per teacher channel. The constant ½·log 2π is left out, as by the authors.
    """
    _check_same_shape(mean, teacher_feature, "vid", "the regressor must output the teacher's shape")
    mean, teacher_feature = _float32(mean), _float32(teacher_feature)
    variance = _channel_view(_float32(variance), mean, "vid variance")
    nll = 0.5 * ((teacher_feature - mean).pow(2) / variance + variance.log())
    if channel_weight is not None:
        nll = nll * _channel_view(channel_weight, nll, "vid")
    return _batch_mean(_per_sample_mean(nll), sample_weight, "vid")


def hcl(
    student_features: Sequence[Tensor],
    teacher_features: Sequence[Tensor],
    levels: Sequence[int] = (4, 2, 1),
    *,
    sample_weight: Tensor | None = None,
) -> Tensor:
    """Hierarchical context loss of ReviewKD: Chen et al., "Distilling Knowledge via Knowledge Review" (CVPR 2021).

    Σ_stages [MSE(f_s, f_t) + Σ_k 2^-k·MSE(pool_l_k(f_s), pool_l_k(f_t))] / (1 + Σ_k 2^-k), where pool_l is the
    adaptive average pool to l×l and k = 1, 2, … counts only the levels l < H (the map's height), as in the
    authors' code. Each pair is a B×C×H×W student (fused) map and the teacher map of the same shape.
    """
    if len(student_features) != len(teacher_features):
        raise ValueError(f"hcl: {len(student_features)} student maps but {len(teacher_features)} teacher maps")
    total = None
    for s, t in zip(student_features, teacher_features):
        _check_same_shape(s, t, "hcl", "each fused student map must match its teacher map")
        s, t = _float32(s), _float32(t)
        per_sample = _per_sample_mean((s - t).pow(2))
        coefficient, normaliser = 1.0, 1.0
        for level in levels:
            if level >= s.shape[-2]:
                continue
            coefficient /= 2.0
            pooled = F.adaptive_avg_pool2d(s, level) - F.adaptive_avg_pool2d(t, level)
            per_sample = per_sample + coefficient * _per_sample_mean(pooled.pow(2))
            normaliser += coefficient
        stage = _batch_mean(per_sample / normaliser, sample_weight, "hcl")
        total = stage if total is None else total + stage
    if total is None:
        raise ValueError("hcl: needs at least one pair of maps")
    return total
