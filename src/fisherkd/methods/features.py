"""Feature-based methods: losses between tapped student and teacher activations."""

from __future__ import annotations

import torch
from torch import Tensor

from fisherkd import functional as Fn
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register


@register("fitnet")
class FitNet(Method):
    """FitNets hint loss: MSE between the adapted student feature and the teacher's hint layer.

    Paper: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Loss weight 100 as in RepDistiller/mdistiller.
    """

    family = "feature"
    paper = "Romero et al. ICLR 2015, arXiv:1412.6550"
    default_weight = 100.0
    adapter = "student_to_teacher"
    min_pairs = 1

    class Params(Hyperparameters):
        pass

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        terms = [Fn.fitnet(s, t) for s, t in zip(inputs.student_features, inputs.teacher_features)]
        return {"fitnet": torch.stack(terms).mean()}
