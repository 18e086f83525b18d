"""Logit-based methods (and the label cross-entropy they are usually paired with)."""

from __future__ import annotations

from torch import Tensor

from fisherkd import functional as Fn
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register


@register("ce")
class CrossEntropy(Method):
    """Cross-entropy with the ground-truth labels: −log p_s[y]. Not distillation, but the usual partner term."""

    family = "label"
    paper = "-"
    needs_teacher = False
    needs_target = True

    class Params(Hyperparameters):
        label_smoothing: float = 0.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"ce": Fn.cross_entropy(inputs.student_logits, inputs.target, self.hparams.label_smoothing)}


@register("kd")
class KD(Method):
    """Hinton KD: τ²·KL(p_t ‖ p_s) at temperature τ. Authors' CIFAR setting: τ=4, KD 0.9 with CE 0.1.

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """

    family = "logit"
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    default_weight = 0.9

    class Params(Hyperparameters):
        temperature: float = 4.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"kd": Fn.kd(inputs.student_logits, inputs.teacher_logits, self.hparams.temperature)}
