"""Parameter-space distillation: a penalty that keeps a student's parameters near the teacher's."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register


@register("fisher_param")
class FisherParam(Method):
    """Diagonal Fisher penalty ½·Σ_i w_i (θ_s,i − θ_t,i)² toward the teacher's parameters, w from the teacher's Fisher.

    For students whose parameters correspond to the teacher's by name and shape (a pruned, quantized or fine-tuned
    copy, or a student initialised from the teacher): the parameters that the teacher's prediction is most
    sensitive to are held closest. w = normalize(F) of the diagonal Fisher F_i = E[(∂ log p_t(ŷ|x)/∂θ_i)²] (ŷ drawn
    from the teacher), an EMA over training (fisher axis ``parameter``, on by default: the γ = 0 block gives the
    plain L2-to-teacher penalty of L2-SP). The quadratic is the Laplace approximation of the teacher's posterior
    used by EWC (Kirkpatrick et al., PNAS 2017) and Fisher merging (Matena & Raffel, NeurIPS 2022); weights are
    normalized to mean 1, so the loss weight sets the scale. ``include`` keeps parameters whose names start with
    one of the prefixes (default: every matching parameter).
    """

    family = "feature"
    same_architecture = True
    paper = "Kirkpatrick et al. PNAS 2017, arXiv:1612.00796 (the EWC penalty, toward a teacher)"
    default_weight = 1.0
    weight_axes = ("parameter",)
    default_fisher = {"axis": "parameter"}

    class Params(Hyperparameters):
        include: tuple[str, ...] = ()

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.parameter_names: list[str] = []
        self._pairs: list[tuple[nn.Parameter, nn.Parameter]] = []  # plain references, not submodules

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            raise ValueError("fisher_param needs a teacher")
        own = dict(teacher.named_parameters())
        prefixes = self.hparams.include
        self.parameter_names, self._pairs = [], []
        for name, p in student.named_parameters():
            match = own.get(name)
            if match is not None and match.shape == p.shape and (not prefixes or name.startswith(prefixes)):
                self.parameter_names.append(name)
                self._pairs.append((p, match))
        if not self._pairs:
            raise ValueError(
                "fisher_param: no student parameter has a teacher parameter of the same name and shape"
                + (f" among the prefixes {list(prefixes)}" if prefixes else "")
            )

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        weights = inputs.weights.get("parameter")
        total, offset = [], 0
        for student, teacher in self._pairs:
            squared = (student - teacher.detach()).pow(2)
            if weights is not None:
                squared = squared * weights[offset : offset + squared.numel()].view_as(squared)
            offset += squared.numel()
            total.append(squared.sum())
        return {"fisher_param": 0.5 * torch.stack(total).sum()}
