"""Training schemes built from ordinary modules: multi-teacher ensembles, self-distillation, dual-head students.

Each scheme is an ``nn.Module`` that takes the place of a teacher or a student, so the Distiller and the engine
need no special case for any of them:

- :class:`EnsembleTeacher` — several teachers whose predictions are averaged (taps: ``members.0.layer3``).
- :class:`EMATeacher` — self-distillation from an exponential moving average of the student (taps:
  ``model.layer3``); :func:`load_student_weights` reads a student from an earlier run for a "born-again" teacher.
- :func:`add_dual_head` — a second head next to the student's head, trained by the teacher while the original
  learns from labels (taps: ``head.label``, ``head.distill``; the ``dual_head`` method applies a logit loss to it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

from fisherkd.core import model_logits
from fisherkd.engine.checkpoint import load_checkpoint


class EnsembleTeacher(nn.Module):
    """A multi-teacher ensemble whose output is the logits of the members' (weighted) average prediction.

    Papers: Hinton et al., "Distilling the Knowledge in a Neural Network", 2015 (arXiv:1503.02531), distil an
    ensemble through the mean of its members' predictive distributions; You et al., "Learning from Multiple Teacher
    Networks", KDD 2017, average the teachers' softened outputs.

    ``average``:
      - ``"probs"`` (default): returns log Σ_k w_k·softmax(z_k), the log of the ensemble's predictive distribution
        (softmax of it gives the mixture back exactly). This is the distribution whose accuracy and calibration the
        ensemble is known for; averaging logits instead is a geometric mean, which vetoes any class that one member
        rules out and can be sharper than every member. A method applying a temperature τ then sees
        softmax(log p̄/τ) ∝ p̄^{1/τ}: the mixture softened after averaging, not the average of softened outputs.
      - ``"logits"``: returns Σ_k w_k·z_k, the (normalised) geometric mean of the members' distributions. It
        commutes with temperature: softmax(z̄/τ) is the geometric mean of the softmax(z_k/τ).

    ``weights`` are fixed member weights π_k (uniform by default; normalised to sum 1). ``weighting="confidence"``
    multiplies them, per sample (and per token for sequence outputs), by each member's confidence
    ‖p_k‖² = Σ_c p_k,c² at τ = 1, then renormalises over members. ‖p‖² is the probability that two labels drawn from
    p agree, the inverse of the effective number of classes exp H₂(p), and equals 1 − tr F for the Fisher
    information F = diag(p) − ppᵀ of the member's logits: a member that is sure of a sample counts more there. It
    lies in [1/C, 1], so no member outweighs another by more than C times and no tuning constant is needed (unlike
    weights ∝ 1/(1 − ‖p‖²), which grow without bound as a member saturates). Confidence-aware weighting with labels
    is CA-MKD (Zhang et al., ICASSP 2022); this one needs no labels.
    """

    def __init__(
        self,
        members: Sequence[nn.Module],
        weights: Sequence[float] | None = None,
        *,
        average: Literal["probs", "logits"] = "probs",
        weighting: Literal["fixed", "confidence"] = "fixed",
    ) -> None:
        super().__init__()
        if not members:
            raise ValueError("an EnsembleTeacher needs at least one member")
        if average not in ("probs", "logits") or weighting not in ("fixed", "confidence"):
            raise ValueError(
                f"average must be 'probs' or 'logits' and weighting 'fixed' or 'confidence', got "
                f"{average!r}, {weighting!r}"
            )
        self.members = nn.ModuleList(members)
        prior = torch.ones(len(members)) if weights is None else torch.tensor([float(w) for w in weights])
        if prior.shape != (len(members),) or (prior < 0).any() or prior.sum() <= 0:
            raise ValueError(f"weights must be {len(members)} non-negative numbers, not all zero; got {weights}")
        self.register_buffer("prior", prior / prior.sum(), persistent=False)
        self.average, self.weighting = average, weighting

    def member_logits(self, *args: Any, **kwargs: Any) -> Tensor:
        """The members' logits stacked on a new first axis: K × batch × … × classes, in fp32."""
        return torch.stack([model_logits(m(*args, **kwargs)).float() for m in self.members])

    def member_weights(self, logits: Tensor) -> Tensor:
        """Weights of the members for every prediction, shaped like ``logits`` with one class: they sum to 1 over K."""
        prior = self.prior.view(-1, *[1] * (logits.dim() - 1))
        if self.weighting == "fixed":
            return prior.expand(*logits.shape[:-1], 1)
        confidence = logits.softmax(-1).square().sum(-1, keepdim=True)
        weights = prior * confidence
        return weights / weights.sum(0)

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        logits = self.member_logits(*args, **kwargs)
        weights = self.member_weights(logits)
        if self.average == "logits":
            return (weights * logits).sum(0)
        # log Σ_k w_k p_k computed stably; a zero weight gives log 0 = −inf, which logsumexp ignores exactly
        return torch.logsumexp(weights.log() + logits.log_softmax(-1), dim=0)


class EMATeacher(nn.Module):
    """Self-distillation teacher: an exponential moving average of the student's weights.

    Papers: Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017 (arXiv:1703.01780);
    self-distillation in general: Furlanello et al., "Born-Again Neural Networks", ICML 2018 (arXiv:1805.04770),
    whose teacher is an earlier, fully trained generation (see :func:`load_student_weights`).

    ``model`` is a frozen deep copy of the student made at construction (build it before the Distiller, so the
    copy carries none of its hooks). After every optimizer step the engine calls :meth:`after_optimizer_step`:
    θ_t ← decay·θ_t + (1 − decay)·θ_s for the parameters, and the student's buffers (BatchNorm statistics) are
    copied. The student is held by reference only, not registered as a submodule: the Distiller freezes its teacher
    (``requires_grad_(False)``) and keeps it in eval mode, which must not reach the student, and the student's
    weights must not be saved twice. ``checkpointed = True`` tells the Distiller to save the teacher's weights with
    the student's, since they change during training and a resumed run must continue from them.
    """

    checkpointed: ClassVar[bool] = True
    student: nn.Module

    def __init__(self, student: nn.Module, decay: float = 0.999) -> None:
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.model = copy.deepcopy(student).requires_grad_(False).eval()
        self.__dict__["student"] = student  # a plain attribute: assigning it would register it as a submodule

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        for t, s in zip(self.model.parameters(), self.student.parameters(), strict=True):
            t.mul_(self.decay).add_(s.detach(), alpha=1.0 - self.decay)
        for t, s in zip(self.model.buffers(), self.student.buffers(), strict=True):
            t.copy_(s)


def load_student_weights(path: str | Path, checkpoint: str = "last") -> dict[str, Tensor]:
    """A model's weights, to make an earlier student a teacher ("born-again" self-distillation) or to start from.

    ``path`` is a FisherKD run directory (its ``checkpoints/{checkpoint}.pt``), a checkpoint of a run (the
    engine saves ``{"distiller": …}`` with the student under ``student.``), a file holding ``{"model": state}``
    (cached teachers) or a bare state dict. Loaded with ``weights_only=True``: no code from the file runs.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoints" / f"{checkpoint}.pt"
    state = load_checkpoint(path)
    if "distiller" in state:
        prefix = "student."
        return {k.removeprefix(prefix): v for k, v in state["distiller"].items() if k.startswith(prefix)}
    return state.get("model", state)


class DualHead(nn.Module):
    """Two heads on the same input: ``label`` (the student's own head) and ``distill`` (a freshly initialised copy).

    Papers: Yang et al., "Dual-Head Knowledge Distillation: Enhancing Logits Utilization with an Auxiliary Head",
    2024 (arXiv:2411.08937), keep the label loss and the teacher's loss on separate linear heads over the same
    features, so their conflicting gradients meet in the backbone only; DeiT (Touvron et al., ICML 2021,
    arXiv:2012.12877) trains a class head on labels and a distillation head on the teacher and averages the two at
    test time. In training mode the output is the label head's logits (the student's main output, for ``ce``); the
    distill head's logits are tapped as ``<head>.distill``. In eval mode the output is the mean of the two heads'
    logits (``inference="mean"``, as DeiT) or the label head's alone (``inference="label"``).
    """

    def __init__(self, head: nn.Module, inference: Literal["mean", "label"] = "mean") -> None:
        super().__init__()
        if inference not in ("mean", "label"):
            raise ValueError(f"inference must be 'mean' or 'label', got {inference!r}")
        self.label = head
        self.distill = copy.deepcopy(head)
        for module in self.distill.modules():  # its own initialisation, not a clone of the label head
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
        self.inference = inference

    def forward(self, x: Tensor) -> Tensor:
        label, distill = self.label(x), self.distill(x)
        if self.training or self.inference == "label":
            return label
        return (label + distill) / 2


def add_dual_head(student: nn.Module, head: str = "head", inference: Literal["mean", "label"] = "mean") -> nn.Module:
    """Replace the student's module ``head`` (e.g. ``"head"``, ``"fc"``, ``"classifier"``) by a :class:`DualHead`
    wrapping it, in place, and return the student. Tap names elsewhere in the student do not change; the two heads
    are ``{head}.label`` and ``{head}.distill``. Call it before building the Distiller and the optimizer."""
    modules = dict(student.named_modules())
    if head not in modules or not head:
        from fisherkd.core import nearest

        raise KeyError(f"student has no module {head!r} to use as its head; {nearest(head, [n for n in modules if n])}")
    student.set_submodule(head, DualHead(modules[head], inference))
    return student
