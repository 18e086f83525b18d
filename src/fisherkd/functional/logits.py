"""Logit-based distillation losses. Notation: z logits, p = softmax(z/τ), t teacher, s student."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["cross_entropy", "kd"]


def _float32(x: Tensor) -> Tensor:
    # Softmax and logs in bf16/fp16 lose the small probabilities that KL depends on.
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def cross_entropy(student_logits: Tensor, target: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Cross-entropy with hard labels (batch mean): −mean_n log softmax(z_s)[y]."""
    return F.cross_entropy(_float32(student_logits), target, label_smoothing=label_smoothing)


def kd(student_logits: Tensor, teacher_logits: Tensor, temperature: float = 4.0) -> Tensor:
    """Hinton et al., "Distilling the Knowledge in a Neural Network" (2015).

    τ² · mean_n KL(p_t ‖ p_s) with p = softmax(z/τ). The τ² keeps gradient magnitudes comparable across τ.
    """
    log_p_s = F.log_softmax(_float32(student_logits) / temperature, dim=-1)
    log_p_t = F.log_softmax(_float32(teacher_logits) / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return kl.mean() * temperature**2
