"""The dual-head scheme's loss (the scheme itself, `fisherkd.schemes.add_dual_head`, is a module, not a loss)."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import Field
from torch import Tensor

from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, method_class, register


@register("dual_head")
class DualHeadKD(Method):
    """Dual-head KD: a logit loss (``kd`` by default) between the student's distillation head and the teacher.

    Paper: Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    2024, arXiv:2411.08937. The student has two heads on the same features (:func:`fisherkd.schemes.add_dual_head`,
    or ``student: {dual_head: head}`` in a config): its main output in training is the label head's logits, which
    ``ce`` trains as usual; this method applies the logit method ``loss`` (with ``loss_params``) to its one layer pair
    instead of the main logits: ``pairs: [[head.distill, ""]]``, the distill head's logits against the teacher's
    own output (the tap ``""`` is the whole model's output). Any pair of logit tensors works, e.g. an early exit.
    Terms are the inner method's, prefixed ``dual_head.``; weight 1 (set the loss weight in the spec). Importance
    weights pass through to the inner method, which reads the ones it takes (per-sample: kd, dkd, nkd, …; none:
    dist, mlkd, sinkhorn).
    """

    family = "scheme"
    paper = "Yang et al. 2024, arXiv:2411.08937"
    default_weight = 1.0
    min_pairs = 1
    pair_kinds = ("logits",)
    weight_axes = ("sample",)

    class Params(Hyperparameters):
        loss: str = "kd"
        loss_params: dict[str, Any] = Field(default_factory=dict)

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        cls = method_class(self.hparams.loss)
        if cls.family != "logit":
            raise TypeError(
                f"method 'dual_head': loss {cls.name!r} is a {cls.family} method; use a logit method "
                "such as kd, dkd or dist"
            )
        self.inner = cls(**self.hparams.loss_params)
        self.needs_target = self.inner.needs_target

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        if len(inputs.student_features) != 1:
            raise ValueError(f"dual_head: takes exactly one layer pair, got {len(inputs.student_features)}")
        head_inputs = dataclasses.replace(
            inputs,
            student_logits=inputs.student_features[0],
            teacher_logits=inputs.teacher_features[0],
            student_features=[],
            teacher_features=[],
        )
        return {f"dual_head.{term}": value for term, value in self.inner(head_inputs).items()}
