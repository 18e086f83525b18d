"""The axes a method's loss can be Fisher-weighted along: one :class:`FisherAxis` record each, in :data:`AXES`.

Everything that depends on the axis reads its record: :class:`~fisherkd.fisher.FisherSpec` (the estimators it
takes), :class:`~fisherkd.fisher.FisherWeighter` (whether it needs a teacher activation, how the teacher's Fisher
becomes raw importances, per-batch weights or a running statistic of the teacher, how to draw it) and the
Distiller (whether its weights belong to one teacher layer). To add an axis, add one record here and its name to
the ``weight_axes`` of the methods whose loss takes such weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from fisherkd.fisher import estimators as E


class Estimate(Protocol):
    """What an axis's ``importance`` function can read: the teacher's Fisher on the first ``rows`` samples of the
    batch (all of them for per-batch axes), computed only when asked for."""

    rows: int
    where: str  # "method 'x', fisher axis 'y'", for messages
    estimator: str
    temperature: float
    num_heads: int | None
    damping: float  # of the teacher's Fisher in the influence estimator

    @property
    def logits(self) -> Tensor:
        """The teacher's logits, B×C or per token B×T×C."""

    @property
    def mask(self) -> Tensor | None:
        """The padding mask B×T (1 = valid token), or None."""

    @property
    def target(self) -> Tensor:
        """The labels (raises a clear error when the batch has none)."""

    @property
    def student_logits(self) -> Tensor:
        """The student's logits of this batch, detached (raises a clear error where they are not known)."""

    @property
    def feature(self) -> Tensor | None:
        """The teacher's activation at the tap from this batch's forward pass, when the Distiller tapped it."""

    def head_weight(self) -> Tensor:
        """The weight of the teacher's linear classifier (``fisher.head``, default its last nn.Linear)."""

    def scores(self) -> tuple[Tensor, Tensor]:
        """(h, g) at the tap: the activation and ∂ Σ log p(ŷ)/∂h, float32 (see :func:`E.tapped_gradients`)."""

    def elementwise(self) -> Tensor:
        """The elementwise diagonal Fisher at the tap, laid out like it: g², or the linear-head closed form."""

    def parameters(self) -> list[Tensor]:
        """The diagonal Fisher of the method's teacher parameters (see :func:`E.parameter_fisher`)."""


class Importance(NamedTuple):
    """Raw importances (≥ 0) with the samples first, and how much each entry counts (None: all 1).

    Per-batch axes: ``value`` has the shape of the weights (B, B×T, B×H×W, ...) and ``weight`` is the padding mask
    of the same shape (masked entries get weight 1 and stay out of every mean). Statistic axes: ``value`` is
    N×(statistic) and ``weight`` the weight of each of its N rows in the batch mean."""

    value: Tensor
    weight: Tensor | None = None


@dataclass(frozen=True)
class FisherAxis:
    """One axis along which a loss can be Fisher-weighted."""

    name: str
    estimators: tuple[str, ...]  # the ``fisher.estimator`` values it takes; the first is the default
    importance: Callable[[Estimate], Importance]  # the teacher's Fisher → raw importances
    needs_tap: frozenset[str] = frozenset()  # estimators that read a teacher activation (fisher.tap)
    needs_parameters: bool = False  # reads the Fisher of the method's teacher parameters
    per_batch: bool = False  # weights of this batch's samples every step; else an EMA statistic of the teacher
    within_sample: bool = True  # per-batch axes: one normalization per sample (False: one over the batch)
    one_layer: bool = False  # its weights belong to one teacher layer: a method may tap only one
    heatmap: Callable[[Tensor], Tensor] | None = None  # weights → what to draw; None: nothing
    metric: bool = False  # its weights are a PSD C×C metric (fisher.metric), not mean-1 weights (normalize)


def _matching(mask: Tensor | None, like: Tensor) -> Tensor | None:
    return mask if mask is not None and mask.shape == like.shape else None


def _sample(est: Estimate) -> Importance:
    if est.estimator == "logit":
        raw = E.logit_fisher_trace(est.logits, est.temperature)
    elif est.estimator in ("wsl", "influence"):
        if est.logits.dim() != 2:
            raise ValueError(f"{est.where}: the {est.estimator} estimator weighs whole samples: it needs logits B×C, "
                             f"got {tuple(est.logits.shape)}")
        if est.estimator == "wsl":
            raw = E.wsl_weight(est.student_logits, est.logits, est.target, est.temperature)
        else:
            raw = E.influence_weight(est.student_logits, est.logits, est.target, est.temperature, est.damping)
    else:
        raw = E.linear_head_fisher(est.logits, est.head_weight(), est.temperature).sum(-1)
    return Importance(raw, _matching(est.mask, raw))


def _class(est: Estimate) -> Importance:
    # one row per sample, or per token of B×T×C logits: the class statistic is a mean over valid tokens (and, for
    # non_target, over rows with a label)
    if est.estimator == "non_target":
        diagonal = E.non_target(est.logits, est.target, est.temperature)
        valid = E.valid_rows(est.logits, est.mask, est.target)
    else:
        diagonal = E.logit_fisher_diagonal(est.logits, est.temperature)
        valid = E.valid_rows(est.logits, est.mask)
    return Importance(diagonal.reshape(-1, diagonal.shape[-1]), None if valid is None else valid.reshape(-1))


def _channel(est: Estimate) -> Importance:
    return Importance(E.channel_fisher(est.elementwise(), est.mask))


def _position(est: Estimate) -> Importance:
    raw = E.position_fisher(est.elementwise())
    return Importance(raw, _matching(est.mask, raw))


def _head(est: Estimate) -> Importance:
    value, grad = est.scores()
    return Importance(E.head_gate_fisher(value, grad, est.num_heads, est.mask))


def _token(est: Estimate) -> Importance:
    if est.estimator == "logit":
        if est.logits.dim() != 3:
            raise ValueError(
                f"{est.where}: token weights from the logit Fisher need per-token logits B×T×C, got "
                f"{tuple(est.logits.shape)}; use fisher.estimator: sampled with a tap on the tokens"
            )
        raw = E.logit_fisher_trace(est.logits, est.temperature)
    else:
        raw = E.token_fisher(est.elementwise(), est.mask)
    return Importance(raw, _matching(est.mask, raw))


def _parameter(est: Estimate) -> Importance:
    # already the mean over the rows: one row that counts as ``rows`` samples in the (all-reduced) batch mean
    fisher = torch.cat([f.flatten() for f in est.parameters()])
    return Importance(fisher[None], fisher.new_full((1,), float(est.rows)))


def check_head_input(where: str, feature: Tensor | None, weight: Tensor) -> None:
    """A metric from the head's weight (K×C) lives at the head's input: the method's teacher feature must have C
    channels (the head's input itself, or a map the head sees average-pooled)."""
    channels = None if feature is None else feature.shape[-1 if feature.dim() == 3 else 1]
    if channels != weight.shape[1]:
        got = "no teacher feature" if feature is None else f"a teacher feature of shape {tuple(feature.shape)}"
        raise ValueError(
            f"{where}: a metric from the head lives at its input ({weight.shape[1]} channels), but the method has "
            f"{got}: tap the head's input (e.g. 'head:in') or a map it sees average-pooled"
        )


def _direction(est: Estimate) -> Importance:
    # already the mean over the rows, like _parameter: a C×C matrix that counts as ``rows`` samples
    if est.estimator == "linear_head":
        weight = est.head_weight()
        check_head_input(est.where, est.feature, weight)
        fisher = E.linear_head_direction_fisher(est.logits, weight, est.temperature, est.mask)
    else:
        fisher = E.direction_fisher(est.scores()[1], est.mask)
    return Importance(fisher[None], fisher.new_full((1,), float(est.rows)))


def _metric_diagonal(metric: Tensor) -> Tensor:
    # C·diag(M): each channel's share of the hint, 1 for the isotropic metric (floored for the log-scale plot)
    return (metric.diagonal() * metric.shape[0]).clamp_min(1e-3)


def _mean_over_batch(weights: Tensor) -> Tensor:
    return weights.mean(0)


def _as_is(weights: Tensor) -> Tensor:
    return weights


_TAP = frozenset({"sampled", "empirical", "linear_head"})  # linear_head at a tap: laid out like the method's feature

AXES: dict[str, FisherAxis] = {
    axis.name: axis
    for axis in (
        FisherAxis(
            "sample", ("logit", "linear_head", "wsl", "influence"), _sample, per_batch=True, within_sample=False
        ),
        FisherAxis("class", ("logit", "non_target"), _class, heatmap=_as_is),
        FisherAxis(
            "channel", ("sampled", "empirical", "linear_head"), _channel, needs_tap=_TAP, one_layer=True,
            heatmap=_as_is,
        ),
        FisherAxis(
            "position", ("sampled", "empirical", "linear_head"), _position, needs_tap=_TAP, per_batch=True,
            one_layer=True, heatmap=_mean_over_batch,
        ),
        FisherAxis("head", ("sampled", "empirical"), _head, needs_tap=_TAP, heatmap=_as_is),
        FisherAxis("token", ("sampled", "empirical", "logit"), _token, needs_tap=_TAP, per_batch=True),
        FisherAxis("parameter", ("sampled",), _parameter, needs_parameters=True),
        FisherAxis(
            "direction", ("sampled", "empirical", "linear_head"), _direction, needs_tap=_TAP, one_layer=True,
            heatmap=_metric_diagonal, metric=True,
        ),
    )
}
