"""Feature-based distillation losses on tapped intermediate tensors."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["fitnet"]


def fitnet(student_feature: Tensor, teacher_feature: Tensor) -> Tensor:
    """Romero et al., "FitNets: Hints for Thin Deep Nets" (ICLR 2015).

    Mean squared error between the (adapted) student feature and the teacher's hint: mean (f_s − f_t)².
    """
    if student_feature.shape != teacher_feature.shape:
        raise ValueError(
            f"fitnet: student feature {tuple(student_feature.shape)} and teacher feature "
            f"{tuple(teacher_feature.shape)} differ; give the method an adapter or tap layers of equal shape"
        )
    return F.mse_loss(student_feature.float(), teacher_feature.float())
