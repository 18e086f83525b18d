"""``FisherWeighter``: the importance weights of one method, from the teacher's Fisher information.

The Distiller owns one weighter per method that has a ``fisher:`` block and calls it after the teacher's forward
pass; the weights go to the method as ``MethodInputs.weights[axis]``. What depends on the axis is in its record in
:data:`fisherkd.fisher.axes.AXES`. Three kinds of axis:

- per batch (``sample``, ``position``, ``token``): a weight for each sample / position / token of *this* batch,
  estimated on the whole batch every step and normalized within each sample (over the batch for ``sample``).
  With the closed forms (``logit``, ``linear_head``) this costs a few small kernels; with an activation Fisher it
  costs a teacher forward and a partial backward every step, so it is opt-in.
- teacher properties (``class``, ``channel``, ``head``, ``parameter``): an EMA of the batch statistic, updated
  every ``every`` optimizer steps on the first ``fraction`` of the batch (batches are shuffled), all-reduced
  across DDP ranks, optionally frozen after ``freeze_after`` steps. The weights are recomputed only when the
  statistic or λ changes.
- a metric (``direction``): an EMA of the teacher's C×C Fisher at the tapped layer like the statistic axes, turned
  into a PSD metric by :mod:`fisherkd.fisher.metric` (one eigen-decomposition per update); the ``row`` / ``null``
  variants are built once from the head's weight.

Nothing here reads a tensor on the host (but for one check when a ``null`` metric is built): no per-step
synchronisation is added to the training step.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fisherkd.core import nearest
from fisherkd.fisher import estimators as E
from fisherkd.fisher.axes import AXES, check_head_input
from fisherkd.fisher.metric import HEAD_SPACES, fisher_metric, head_space_metric, mix_isotropic
from fisherkd.fisher.normalize import normalize, ramp
from fisherkd.fisher.spec import FisherSpec
from fisherkd.fisher.state import EMAStatistic, all_reduce_mean


@dataclass
class FisherBatch:
    """What a weighter reads for one batch. ``feature`` is the teacher tensor at the weighter's tap from this
    batch's forward pass (when the Distiller taps it); ``mask`` is the padding mask (B×T, 1 = valid token) of token
    batches; ``quiet`` silences the Distiller's own taps while the
    weighter runs an extra teacher pass, so that pass cannot overwrite the features the methods will read.
    ``student_logits`` are there for the student-aware ``wsl`` sample weights (read detached): the Distiller runs
    the student before it asks for the weights."""

    inputs: Tensor | Mapping[str, Tensor]
    teacher: nn.Module
    teacher_logits: Tensor
    target: Tensor | None = None
    feature: Tensor | None = None
    mask: Tensor | None = None
    quiet: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    student_logits: Tensor | None = None


def weight_stats(weights: Tensor, ess: bool = False) -> dict[str, Tensor]:
    """Diagnostics of a weight tensor of n entries, q = w/Σw: normalized entropy −Σ q log q / log n (1 = uniform,
    lower = concentrated) and the max/min ratio; with ``ess`` (per-batch sample weights) also the effective sample
    size (Σw)²/(n·Σw²) = 1/(n·Σq²) (Kish), the share of the batch that a weighted mean effectively averages (1 =
    uniform, 1/n = one sample carries the loss). Detached device scalars: the trainer sums them and reads them once
    per log interval."""
    w = weights.detach().float().flatten()
    n = w.numel()
    q = w / w.sum()
    entropy = q.dot(q.log()) * (-1.0 / math.log(n)) if n > 1 else torch.ones((), device=w.device)
    low, high = w.aminmax()
    stats = {"entropy": entropy, "max_min": high / low}
    if ess:
        stats["ess"] = (q.dot(q) * n).reciprocal()
    return stats


def mark_mixed_inputs(module: nn.Module, mixed: bool = True) -> None:
    """Tell every :class:`FisherWeighter` in ``module`` (a Distiller) whether the batches it will see are mixed
    (mixup): a weighter with ``fisher.mixed: off`` then leaves its loss unweighted. The engine calls it once, from
    its augmentation config; a hand-written loop that mixes its batches calls it itself."""
    for weighter in module.modules():
        if isinstance(weighter, FisherWeighter):
            weighter.mixed_inputs = mixed


def _first_rows(inputs: Tensor | Mapping[str, Tensor], rows: int) -> Tensor | Mapping[str, Tensor]:
    if isinstance(inputs, Mapping):
        return {k: v[:rows] if isinstance(v, Tensor) and v.dim() > 0 else v for k, v in inputs.items()}
    return inputs[:rows]


class FisherWeighter(nn.Module):
    """Weights for one method along ``spec.axis``. ``label`` names the method in messages and logs, ``tap`` is the
    default activation (the method's first teacher tap) and ``parameter_names`` the teacher parameters of the
    ``parameter`` axis, in the order the method reads them."""

    def __init__(
        self, spec: FisherSpec, label: str, tap: str | None = None, parameter_names: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.spec, self.label = spec, label
        self.axis, self.estimator = spec.axis, spec.resolved_estimator
        self.rule = AXES[self.axis]
        self.tap = spec.tap or tap
        self.parameter_names = list(parameter_names)
        self.where = f"method {label!r}, fisher axis {self.axis!r}"
        if self.estimator in self.rule.needs_tap and self.tap is None:
            raise ValueError(f"{self.where}: the {self.estimator} estimator needs a teacher activation: set fisher.tap")
        if self.rule.needs_parameters and not self.parameter_names:
            raise ValueError(f"{self.where}: no teacher parameters to weight")
        # row / null metrics come from the head's weight alone: nothing to estimate
        self.head_space = self.rule.metric and spec.directions in HEAD_SPACES
        self.statistic = None if self.rule.per_batch or self.head_space else EMAStatistic(spec.ema)
        self.step = 0  # optimizer steps seen, advanced by after_optimizer_step
        self._last_update = -1
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None
        self._cache: tuple[tuple, Tensor, dict[str, Tensor]] | None = None
        self._metric: tuple[tuple, Tensor, Tensor] | None = None  # (updates, device), metric at λ = 1, its rank
        self._head_name: str | None = spec.head
        self.last_weights: Tensor | None = None
        self.mixed_inputs = False  # set by mark_mixed_inputs when the engine mixes the batches (mixup)

    # -- the weights -------------------------------------------------------------------------------------------
    def forward(self, batch: FisherBatch) -> tuple[Tensor | None, dict[str, Tensor]]:
        """(weights, diagnostics) for this batch; weights None means unweighted (γ = 0, λ = 0, or no statistic
        yet)."""
        if not self.spec.active or (self.mixed_inputs and self.spec.mixed == "off"):
            return None, {}
        lam = ramp(self.step, self.spec.lam, self.spec.warmup_steps)
        if self.head_space:
            if self._cache is None or self._cache[0] != ("head", lam):  # the head is frozen: built once per λ
                weight = self._head_weight(batch)
                check_head_input(self.where, batch.feature, weight)
                metric, dimension = head_space_metric(
                    weight, self.spec.directions, isotropic=self.spec.isotropic, lam=lam
                )
                self._cache = (("head", lam), metric, {"rank": dimension})
                self.last_weights = metric
            return self._cache[1], self._cache[2]
        if self.statistic is None:
            importance, mask = self.rule.importance(_Estimate(self, batch, batch.teacher_logits.shape[0]))
            # one normalization per sample (positions, tokens) or one over the whole batch (samples)
            rows = (lambda t: t.flatten(1)) if self.rule.within_sample else (lambda t: t.reshape(1, -1))
            weights = self._normalize(rows(importance), lam, None if mask is None else rows(mask))
            weights = weights.view(importance.shape)
            self.last_weights = weights.detach()
            return weights, weight_stats(weights, ess=self.axis == "sample")
        if self.training and self._due():
            self._update(batch)
        if self.statistic.updates == 0:
            return None, {}
        key = (self.statistic.updates, lam, self.statistic.value.device)
        if self._cache is None or self._cache[0] != key:  # the weights change only with the statistic or λ
            if self.rule.metric:  # a C×C metric: one eigen-decomposition per update of the statistic, not per λ
                s = self.spec
                if self._metric is None or self._metric[0] != key[::2]:
                    self._metric = key[::2], *fisher_metric(
                        self.statistic.read(), s.directions, energy=s.energy, rank=s.rank, isotropic=s.isotropic,
                        gamma=s.gamma,
                    )
                weights, stats = mix_isotropic(self._metric[1], lam), {"rank": self._metric[2]}
            else:
                weights = self._normalize(self.statistic.read(), lam)
                stats = weight_stats(weights)
            self._cache = (key, weights, stats)
            self.last_weights = weights
        return self._cache[1], self._cache[2]

    def _normalize(self, importance: Tensor, lam: float, mask: Tensor | None = None) -> Tensor:
        s = self.spec
        return normalize(importance, s.gamma, lam, floor=s.floor, clip=s.clip, mask=mask)

    def _due(self) -> bool:
        frozen = self.spec.freeze_after is not None and self.step >= self.spec.freeze_after
        return not frozen and self.step % self.spec.every == 0 and self._last_update != self.step

    # -- estimation --------------------------------------------------------------------------------------------
    def _update(self, batch: FisherBatch) -> None:
        """One EMA update from the first ⌈fraction·B⌉ samples of the batch."""
        rows = max(1, math.ceil(self.spec.fraction * batch.teacher_logits.shape[0]))
        value, weight = self.rule.importance(_Estimate(self, batch, rows))
        if weight is None:
            total, count = value.sum(0), value.shape[0]
        else:  # a weighted mean over the rows (padding tokens weigh 0)
            total, count = (value * weight.reshape(-1, *[1] * (value.dim() - 1))).sum(0), weight.sum()
        self.statistic.update(all_reduce_mean(total, count))
        self._last_update = self.step

    def _elementwise(self, batch: FisherBatch, rows: int) -> Tensor:
        """Elementwise diagonal Fisher at the tap for the first ``rows`` samples, laid out like the feature."""
        if self.estimator == "linear_head":
            if batch.feature is None:
                raise ValueError(
                    f"method {self.label!r}: linear_head weights apply to the method's own teacher feature; leave "
                    "fisher.tap unset or set it to the teacher side of the method's first pair"
                )
            logits = batch.teacher_logits[:rows]
            per_unit = E.linear_head_fisher(logits, self._head_weight(batch), self.spec.temperature)
            return E.head_input_layout(per_unit.reshape(rows, -1), batch.feature.shape)
        return self._scores(batch, rows)[1].pow(2)

    def _scores(self, batch: FisherBatch, rows: int) -> tuple[Tensor, Tensor]:
        target = batch.target[:rows] if self.estimator == "empirical" and batch.target is not None else None
        if self.estimator == "empirical" and target is None:
            raise ValueError(f"method {self.label!r}: the empirical Fisher needs labels: call the distiller with them")
        with batch.quiet():
            ((value, grad),) = E.tapped_gradients(
                batch.teacher,
                _first_rows(batch.inputs, rows),
                [self.tap],
                target=target,
                mask=None if batch.mask is None else batch.mask[:rows],
                temperature=self.spec.temperature,
                generator=self._rng(batch.teacher_logits.device),
            )
        return value, grad

    def _parameter_fisher(self, batch: FisherBatch, rows: int) -> list[Tensor]:
        with batch.quiet():
            return E.parameter_fisher(
                batch.teacher,
                _first_rows(batch.inputs, rows),
                self.parameter_names,
                mask=None if batch.mask is None else batch.mask[:rows],
                temperature=self.spec.temperature,
                generator=self._rng(batch.teacher_logits.device),
            )

    def _head_weight(self, batch: FisherBatch) -> Tensor:
        modules = dict(batch.teacher.named_modules())
        if self._head_name is None:
            linear = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
            if not linear:
                raise ValueError(f"method {self.label!r}: linear_head Fisher: the teacher has no nn.Linear head")
            self._head_name = linear[-1]
        head = modules.get(self._head_name)
        if not isinstance(head, nn.Linear):
            choices = [name for name, m in modules.items() if isinstance(m, nn.Linear)]
            raise ValueError(f"method {self.label!r}: fisher.head {self._head_name!r} is not an nn.Linear of the "
                             f"teacher; {nearest(self._head_name, choices)}")
        if head.out_features != batch.teacher_logits.shape[-1]:
            raise ValueError(
                f"method {self.label!r}: fisher.head {self._head_name!r} has {head.out_features} outputs, but the "
                f"teacher gives {batch.teacher_logits.shape[-1]} logits: name the classifier with fisher.head"
            )
        return head.weight

    def _rng(self, device: torch.device) -> torch.Generator:
        # Its own generator: sampling labels leaves the global random stream (dropout, augmentation) untouched.
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device)
            try:
                if self._generator_state is None:
                    raise RuntimeError
                self._generator.set_state(self._generator_state)
            except RuntimeError:  # fresh, or a state saved on another kind of device
                self._generator.manual_seed((torch.initial_seed() + zlib.crc32(self.label.encode())) % 2**63)
        return self._generator

    # -- schedule and checkpoints ------------------------------------------------------------------------------
    def after_optimizer_step(self) -> None:
        self.step += 1

    def get_extra_state(self) -> dict[str, Any]:
        generator = self._generator.get_state() if self._generator is not None else self._generator_state
        return {"step": self.step, "last_update": self._last_update, "generator": generator}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.step, self._last_update = int(state["step"]), int(state["last_update"])
        self._generator_state, self._generator, self._cache = state["generator"], None, None
        self._metric = None

    def heatmap(self) -> Tensor | None:
        """The current weights to draw: per class / channel / head, or the batch-mean position map."""
        if self.last_weights is None or self.rule.heatmap is None:
            return None
        return self.rule.heatmap(self.last_weights)

    def extra_repr(self) -> str:
        s = self.spec
        text = f"axis={self.axis}, estimator={self.estimator}, tap={self.tap}, gamma={s.gamma}, lam={s.lam}"
        return f"{text}, directions={s.directions}" if self.rule.metric else text


@dataclass
class _Estimate:
    """The teacher's Fisher on the first ``rows`` samples of ``batch``, computed on demand: what an axis's
    ``importance`` reads (:class:`fisherkd.fisher.axes.Estimate`)."""

    weighter: FisherWeighter
    batch: FisherBatch
    rows: int

    @property
    def where(self) -> str:
        return self.weighter.where

    @property
    def estimator(self) -> str:
        return self.weighter.estimator

    @property
    def temperature(self) -> float:
        return self.weighter.spec.temperature

    @property
    def num_heads(self) -> int | None:
        return self.weighter.spec.num_heads

    @property
    def damping(self) -> float:
        return self.weighter.spec.damping

    @property
    def logits(self) -> Tensor:
        return self.batch.teacher_logits[: self.rows]

    @property
    def mask(self) -> Tensor | None:
        return None if self.batch.mask is None else self.batch.mask[: self.rows]

    @property
    def feature(self) -> Tensor | None:
        return self.batch.feature

    @property
    def target(self) -> Tensor:
        if self.batch.target is None:
            raise ValueError(f"{self.where}: the {self.estimator} estimator needs labels: call the distiller with them")
        return self.batch.target[: self.rows]

    @property
    def student_logits(self) -> Tensor:
        if self.batch.student_logits is None:
            raise ValueError(f"{self.where}: the {self.estimator} estimator reads the student's logits: pass "
                             "FisherBatch(student_logits=...) (the Distiller does)")
        return self.batch.student_logits[: self.rows].detach()

    def head_weight(self) -> Tensor:
        return self.weighter._head_weight(self.batch)

    def scores(self) -> tuple[Tensor, Tensor]:
        return self.weighter._scores(self.batch, self.rows)

    def elementwise(self) -> Tensor:
        return self.weighter._elementwise(self.batch, self.rows)

    def parameters(self) -> list[Tensor]:
        return self.weighter._parameter_fisher(self.batch, self.rows)
