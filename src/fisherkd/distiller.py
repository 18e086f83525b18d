"""The Distiller: a frozen teacher, a trainable student, adapters and loss methods in one ``nn.Module``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from fisherkd.adapters import make_adapter
from fisherkd.core import call_model, model_logits
from fisherkd.fisher.axes import AXES
from fisherkd.fisher.spec import FisherSpec
from fisherkd.fisher.weighter import FisherBatch, FisherWeighter
from fisherkd.methods.base import Method, MethodInputs, create, method_class
from fisherkd.step import AfterStep, StepClock
from fisherkd.taps import Taps


class MethodSpec(BaseModel):
    """One loss term of a distillation: a registered method, its loss weight, its tapped layer pairs, an optional
    ``fisher`` block (:class:`~fisherkd.fisher.FisherSpec`: Fisher-information weights along one of the method's
    ``weight_axes``) and hyper-parameters (any other key). ``weight`` defaults to the authors' weight."""

    model_config = ConfigDict(extra="allow")

    name: str
    weight: float | None = None
    pairs: list[tuple[str, str]] = Field(default_factory=list)
    fisher: FisherSpec | None = None

    @property
    def hparams(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def build(self) -> Method:
        method = create(self.name, **self.hparams)
        self.resolved_fisher()
        return method

    def resolved_fisher(self) -> FisherSpec | None:
        """The fisher block (or the method's default one), checked against the axes the method can weight."""
        cls = method_class(self.name)
        fisher = self.fisher or (FisherSpec(**cls.default_fisher) if cls.default_fisher else None)
        if fisher is not None and fisher.axis not in cls.weight_axes:
            supported = ", ".join(cls.weight_axes) or "none (its loss takes no importance weights)"
            raise TypeError(
                f"method {self.name!r} cannot be Fisher-weighted along {fisher.axis!r}; its axes: {supported}"
            )
        return fisher


def as_spec(item: MethodSpec | Mapping[str, Any] | str) -> MethodSpec:
    if isinstance(item, MethodSpec):
        return item
    if isinstance(item, str):
        return MethodSpec(name=item)
    return MethodSpec(**item)


@dataclass
class DistillOutput:
    """Student logits, teacher logits (None without a teacher), weighted loss terms and their sum, and detached
    diagnostic scalars (``fisher.<term>.<axis>.entropy`` / ``.max_min`` of the Fisher weights) to log."""

    logits: Tensor
    teacher_logits: Tensor | None
    losses: dict[str, Tensor]
    weights: dict[str, float]
    loss: Tensor
    stats: dict[str, Tensor] = field(default_factory=dict)


class Distiller(nn.Module):
    """Student + frozen teacher + adapters + methods. ``forward`` returns a :class:`DistillOutput`.

    The teacher's parameters never require grad and the teacher stays in eval mode whatever ``train()`` is
    called with. Adapters are built from the shapes seen on ``example_input`` (needed only when a method asks
    for adapters); they belong to the distiller and are saved and trained with the student.

    Methods with a warm-up or curriculum (``dkd``, ``ctkd``, ``reviewkd``) read the fractional epoch from the
    distiller's :class:`~fisherkd.step.StepClock`: tell it the epoch length once and call
    :meth:`after_optimizer_step` after every optimizer step (the engine and ``DistillationTrainer`` do both).

    Example::

        distiller = Distiller(student, teacher, [{"name": "ce", "weight": 0.1}, {"name": "kd", "weight": 0.9}])
        distiller.clock.configure(steps_per_epoch=len(loader))
        for x, y in loader:
            out = distiller(x, y)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            distiller.after_optimizer_step()
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        methods: Sequence[MethodSpec | Mapping[str, Any] | str],
        example_input: Tensor | Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.student = student
        self.teacher = teacher
        self.specs = [as_spec(m) for m in methods]
        if not self.specs:
            raise ValueError("a Distiller needs at least one method, e.g. methods=['ce', 'kd']")
        self.methods = nn.ModuleList(spec.build() for spec in self.specs)
        self.loss_weights = [
            spec.weight if spec.weight is not None else type(m).default_weight
            for spec, m in zip(self.specs, self.methods)
        ]
        self.term_names = self._term_names()
        for spec, method in zip(self.specs, self.methods):
            if method.needs_teacher and teacher is None:
                raise ValueError(f"method {spec.name!r} needs a teacher, but teacher=None")
            if len(spec.pairs) < method.min_pairs:
                raise ValueError(
                    f"method {spec.name!r} needs at least {method.min_pairs} layer pair(s): "
                    "add pairs: [[student_module, teacher_module]] to its spec"
                )
            if method.max_pairs is not None and len(spec.pairs) > method.max_pairs:
                raise ValueError(
                    f"method {spec.name!r} takes at most {method.max_pairs} layer pair(s), got {len(spec.pairs)}: "
                    "give each pair its own method entry"
                )
        if teacher is not None:
            teacher.requires_grad_(False)
            teacher.eval()
        self.student_taps = Taps(student, [s for spec in self.specs for s, _ in spec.pairs], "student")
        self.teacher_taps = (
            Taps(teacher, [t for spec in self.specs for _, t in spec.pairs], "teacher") if teacher else None
        )
        self.adapters = nn.ModuleDict()
        needs_shapes = [
            spec.name
            for spec, m in zip(self.specs, self.methods)
            if spec.pairs and (m.adapter != "none" or type(m).setup is not Method.setup)
        ]
        if needs_shapes or (example_input is not None and any(spec.pairs for spec in self.specs)):
            if example_input is None:
                raise ValueError(
                    f"method {needs_shapes[0]!r} builds layers from feature shapes: pass example_input= (a small "
                    "batch) to the Distiller"
                )
            self._build_from_example(example_input)
        self.fisher = self._build_fisher()
        self.clock = StepClock().to(next(student.parameters()).device)

    def _build_fisher(self) -> nn.ModuleDict:
        """One :class:`FisherWeighter` per method with a fisher block, keyed by the method's term name."""
        weighters = nn.ModuleDict()
        for spec, method, label in zip(self.specs, self.methods, self.term_names):
            method.bind(self.student, self.teacher)
            fisher = spec.resolved_fisher()
            if fisher is None:
                continue
            if self.teacher is None:
                raise ValueError(f"method {spec.name!r}: Fisher weights come from a teacher, but teacher=None")
            layers = {t for _, t in spec.pairs}
            if AXES[fisher.axis].one_layer and len(layers) > 1:
                raise ValueError(
                    f"method {spec.name!r}: {fisher.axis} weights belong to one teacher layer, but its pairs tap "
                    f"{sorted(layers)}: give each pair its own method entry (and fisher block)"
                )
            tap = spec.pairs[0][1] if spec.pairs else None
            weighters[label] = FisherWeighter(fisher, label, tap, getattr(method, "parameter_names", ()))
        return weighters

    def _fisher_weights(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        target: Tensor | None,
        teacher_logits: Tensor | None,
        mask: Tensor | None,
        student_logits: Tensor | None = None,
    ) -> tuple[dict[str, dict[str, Tensor]], dict[str, Tensor]]:
        """Fisher weights by term name and axis, and their diagnostics."""
        weights: dict[str, dict[str, Tensor]] = {}
        stats: dict[str, Tensor] = {}
        for label, weighter in self.fisher.items():
            batch = FisherBatch(
                inputs,
                self.teacher,
                teacher_logits,
                target,
                feature=self.teacher_taps.outputs.get(weighter.tap),
                mask=mask,
                quiet=self.teacher_taps.paused,
                student_logits=student_logits,  # detached where an estimator reads it
            )
            values, diagnostics = weighter(batch)
            if values is not None:
                weights[label] = {weighter.axis: values}
            stats.update({f"fisher.{label}.{weighter.axis}.{k}": v for k, v in diagnostics.items()})
        return weights, stats

    def fisher_heatmaps(self) -> dict[str, Tensor]:
        """The current Fisher weights worth drawing (per class, channel, head; mean position map), by label."""
        maps = {}
        for label, weighter in self.fisher.items():
            values = weighter.heatmap()
            if values is not None:
                where = weighter.tap or "logits"
                maps[f"{label}: {weighter.axis} weights ({weighter.estimator} Fisher at {where})"] = values
        return maps

    def _term_names(self) -> list[str]:
        seen: dict[str, int] = {}
        names = []
        for spec in self.specs:
            count = seen.get(spec.name, 0)
            seen[spec.name] = count + 1
            names.append(spec.name if count == 0 else f"{spec.name}_{count}")
        return names

    @staticmethod
    def adapter_key(method_index: int, pair_index: int) -> str:
        return f"m{method_index}_p{pair_index}"

    @torch.no_grad()
    def _build_from_example(self, example_input: Tensor | Mapping[str, Tensor]) -> None:
        """Run both models once on example inputs; build adapters, then let each method build its own parts."""
        was_training = self.student.training
        self.student.eval()
        call_model(self.student, example_input)
        if self.teacher is not None:  # a teacher-free method (uskd) reads only the student side of its pair
            call_model(self.teacher, example_input)
        self.student.train(was_training)
        device = next(self.student.parameters()).device
        for i, (spec, method) in enumerate(zip(self.specs, self.methods)):
            student_features, teacher_features = [], []
            for j, (s_name, t_name) in enumerate(spec.pairs):
                student = self.student_taps[s_name]
                teacher = self.teacher_taps[t_name] if self.teacher_taps is not None else None
                if method.adapter != "none" and method.wants_adapter(student, teacher):
                    where = f"method {spec.name!r}, pair student {s_name!r} -> teacher {t_name!r}"
                    adapter = make_adapter(student, teacher, where).to(device)
                    self.adapters[self.adapter_key(i, j)] = adapter
                    student = adapter(student)
                student_features.append(student)
                teacher_features.append(teacher)
            method.setup(student_features, teacher_features)
            method.to(device)
        self.student_taps.clear()
        if self.teacher_taps is not None:
            self.teacher_taps.clear()

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm statistics and dropout must not change
        return self

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Student, adapter and method parameters: what the optimizer updates (never the teacher's)."""
        teacher_ids = {id(p) for p in self.teacher.parameters()} if self.teacher is not None else set()
        return [p for p in self.parameters() if p.requires_grad and id(p) not in teacher_ids]

    @torch.no_grad()
    def teacher_forward(self, inputs: Tensor | Mapping[str, Tensor]) -> Tensor:
        return model_logits(call_model(self.teacher, inputs))

    def forward(
        self,
        inputs: Tensor | Mapping[str, Tensor],
        target: Tensor | None = None,
        *,
        mask: Tensor | None = None,
        index: Tensor | None = None,
        epoch: Tensor | float | None = None,
        weights: Mapping[str, Tensor] | None = None,
    ) -> DistillOutput:
        """Losses for one batch. ``index`` holds the samples' dataset indices (CRD's memory bank); ``epoch``
        overrides the clock's fractional epoch (tests, or a loop that keeps its own); ``weights`` are extra
        importance weights by axis, merged under the Fisher weights."""
        if mask is None and isinstance(inputs, Mapping):
            mask = inputs.get("attention_mask")  # Transformers batches carry their padding mask
        if epoch is None:
            epoch = self._epoch()
        teacher_logits = self.teacher_forward(inputs) if self.teacher is not None else None
        student_logits = model_logits(call_model(self.student, inputs))
        # after the student: the wsl sample weights read its (detached) logits
        fisher_weights, stats = (
            self._fisher_weights(inputs, target, teacher_logits, mask, student_logits) if self.fisher else ({}, {})
        )
        losses: dict[str, Tensor] = {}
        used_weights: dict[str, float] = {}
        for i, (spec, method) in enumerate(zip(self.specs, self.methods)):
            if method.needs_target and target is None:
                raise ValueError(f"method {spec.name!r} needs labels: call the distiller with a target")
            student_features, teacher_features = [], []
            for j, (s_name, t_name) in enumerate(spec.pairs):
                feature = self.student_taps[s_name]
                key = self.adapter_key(i, j)
                student_features.append(self.adapters[key](feature) if key in self.adapters else feature)
                teacher_features.append(self.teacher_taps[t_name] if self.teacher_taps is not None else None)
            terms = method(
                MethodInputs(
                    student_logits=student_logits,
                    teacher_logits=teacher_logits,
                    target=target,
                    student_features=student_features,
                    teacher_features=teacher_features,
                    mask=mask,
                    index=index,
                    epoch=epoch,
                    weights={**(weights or {}), **fisher_weights.get(self.term_names[i], {})},
                    step=self.clock.step,
                    batch=inputs,
                )
            )
            weight = self.loss_weights[i]
            for term, value in terms.items():
                key = term if term not in losses else f"{self.term_names[i]}.{term}"
                losses[key] = weight * value
                used_weights[key] = weight
        self.student_taps.clear()
        if self.teacher_taps is not None:
            self.teacher_taps.clear()
        total = torch.stack([v.float() for v in losses.values()]).sum()
        return DistillOutput(student_logits, teacher_logits, losses, used_weights, total, stats)

    def inference_model(self) -> nn.Module:
        """What predicts after training: the student, or the module a method builds around it (see
        :meth:`Method.inference_model`). Evaluation and export use this."""
        built = []
        for i, (spec, method) in enumerate(zip(self.specs, self.methods)):
            adapters = [self.adapters[k] if (k := self.adapter_key(i, j)) in self.adapters else None
                        for j in range(len(spec.pairs))]
            model = method.inference_model(self.student, self.teacher, list(spec.pairs), adapters)
            if model is not None:
                built.append((spec.name, model))
        if len(built) > 1:
            raise ValueError(f"methods {[n for n, _ in built]} each replace the student's head: keep one of them")
        return built[0][1] if built else self.student

    def _epoch(self) -> Tensor | float:
        if self.training and self.clock.steps_per_epoch is None:
            warming = [spec.name for spec, m in zip(self.specs, self.methods) if m.reads_epoch]
            if warming:
                raise ValueError(
                    f"method {warming[0]!r} follows the epoch (a warm-up or curriculum), but the distiller does not "
                    "know the epoch length: call distiller.clock.configure(steps_per_epoch=len(loader)) before "
                    "training and distiller.after_optimizer_step() after each optimizer step"
                )
        return self.clock.epoch()

    def after_optimizer_step(self) -> None:
        """Call after every optimizer step (the engine and DistillationTrainer do): advances the clock, then every
        part with state between steps (Fisher statistics, an EMA teacher, memory banks)."""
        for module in [self.clock, *self.methods, *self.fisher.values(), self.teacher]:
            if isinstance(module, AfterStep):
                module.after_optimizer_step()

    def close(self) -> None:
        """Remove every forward hook this distiller placed on the student and the teacher."""
        self.student_taps.close()
        if self.teacher_taps is not None:
            self.teacher_taps.close()

    def training_state_dict(self) -> dict[str, Tensor]:
        """What a training checkpoint keeps: the student, adapters, methods' parameters and buffers (memory banks),
        Fisher statistics and the step clock; the teacher only when it changes during training and says so with
        ``checkpointed = True`` (an EMA of the student). For the student alone, use ``distiller.student`` (or
        ``fisherkd export``)."""
        if getattr(self.teacher, "checkpointed", False):
            return self.state_dict()
        return {k: v for k, v in self.state_dict().items() if not k.startswith("teacher.")}

