"""Feature-based methods: losses between tapped student and teacher activations.

Methods that own learned modules (VID's regressors, ReviewKD's fusion blocks) build them in ``setup`` from the
feature shapes of the Distiller's example batch, so the modules exist before the optimizer is built.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import PositiveInt
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register


def sum_over_pairs(inputs: MethodInputs, loss: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Σ over the method's layer pairs of ``loss(student, teacher)``, as RepDistiller sums AT's and VID's groups."""
    return torch.stack([loss(s, t) for s, t in zip(inputs.student_features, inputs.teacher_features)]).sum()


def as_map(x: Tensor) -> Tensor:
    """View any feature as B×C×H×W: B×D vectors become B×D×1×1 and B×T×D tokens B×D×T×1."""
    if x.dim() == 2:
        return x[:, :, None, None]
    if x.dim() == 3:
        return x.transpose(1, 2).unsqueeze(-1)
    if x.dim() == 4:
        return x
    raise ValueError(f"cannot view a feature of shape {tuple(x.shape)} as a B×C×H×W map")


def channels(features: list[Tensor]) -> list[int]:
    """Channel counts of the features viewed as maps (see :func:`as_map`), in pair order."""
    return [as_map(f).shape[1] for f in features]


def check_built(name: str, built: bool) -> None:
    if not built:
        raise RuntimeError(
            f"{name}: its layers are built from feature shapes: use it through a Distiller given example_input=, "
            "or call method.setup(student_features, teacher_features) on an example batch first"
        )


def check_channels(name: str, maps: list[Tensor], expected: list[int], side: str) -> None:
    found = [m.shape[1] for m in maps]
    if found != expected:
        raise ValueError(
            f"{name}: the {side} features have {found} channels, but its layers were built for {expected}: "
            "feed the same layers as the example batch"
        )


@register("fitnet")
class FitNet(Method):
    """FitNets hint loss: MSE between the adapted student feature and the teacher's hint layer.

    Paper: Romero et al., "FitNets: Hints for Thin Deep Nets", ICLR 2015. Loss mean_pairs mean (r(f_s) − f_t)² with
    r the distiller's 1×1 conv / linear adapter. Loss weight 100 as in RepDistiller/mdistiller.
    """

    family = "feature"
    paper = "Romero et al. ICLR 2015, arXiv:1412.6550"
    default_weight = 100.0
    weight_axes = ("sample", "channel", "position", "direction")
    adapter = "student_to_teacher"
    min_pairs = 1
    pair_kinds = ("map", "vector", "token")

    class Params(Hyperparameters):
        pass

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        weights = inputs.weights
        channel, position, sample = weights.get("channel"), weights.get("position"), weights.get("sample")
        metric = weights.get("direction")  # a C×C Fisher metric (fisher axis direction), not mean-1 weights
        terms = [
            Fn.fitnet(s, t, channel_weight=channel, position_weight=position, sample_weight=sample, metric=metric)
            for s, t in zip(inputs.student_features, inputs.teacher_features)
        ]
        return {"fitnet": torch.stack(terms).mean()}


@register("at")
class AT(Method):
    """Attention transfer: match the normalised spatial attention maps of student and teacher.

    Paper: Zagoruyko & Komodakis, "Paying More Attention to Attention", ICLR 2017. Loss Σ_pairs mean_{b,j}
    (Q_s − Q_t)², Q = vec(mean_c |F_c|^p)/‖·‖₂, p = 2; weight β = 1000 (RepDistiller, mdistiller). Channel counts
    may differ; spatial sizes must match.
    """

    family = "feature"
    paper = "Zagoruyko & Komodakis ICLR 2017, arXiv:1612.03928"
    default_weight = 1000.0
    weight_axes = ("sample", "channel", "position")
    min_pairs = 1
    pair_kinds = ("map",)

    class Params(Hyperparameters):
        p: float = 2.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        weights = inputs.weights
        channel, position, sample = weights.get("channel"), weights.get("position"), weights.get("sample")

        def loss(s: Tensor, t: Tensor) -> Tensor:
            return Fn.at(s, t, self.hparams.p, channel_weight=channel, position_weight=position, sample_weight=sample)

        return {"at": sum_over_pairs(inputs, loss)}


def _softplus_inverse(y: float) -> float:
    return math.log(math.expm1(y))


@register("vid")
class VID(Method):
    """Variational information distillation: a Gaussian with learned per-channel variance predicts the teacher.

    Paper: Ahn et al., "Variational Information Distillation for Knowledge Transfer", CVPR 2019. Per pair a regressor
    μ(f_s) (1×1 conv → ReLU → 1×1 conv → ReLU → 1×1 conv, to the teacher's channels) and σ²_c = softplus(α_c) + ε
    (initial σ² = 5); loss Σ_pairs mean ½[(t − μ)²/σ²_c + log σ²_c]; weight 1 (RepDistiller). The regressors are
    built in ``setup`` from the channel counts of the example features; vectors and tokens are treated as 1×1 and
    T×1 maps.
    """

    family = "feature"
    paper = "Ahn et al. CVPR 2019, arXiv:1904.05835"
    default_weight = 1.0
    weight_axes = ("sample", "channel")
    min_pairs = 1
    pair_kinds = ("map", "vector", "token")

    class Params(Hyperparameters):
        init_variance: float = 5.0
        eps: float = 1e-5

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.regressors = nn.ModuleList()
        self.variance_logits = nn.ParameterList()

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        start = _softplus_inverse(self.hparams.init_variance - self.hparams.eps)
        for s, t in zip(channels(student_features), channels(teacher_features)):
            self.regressors.append(
                nn.Sequential(
                    nn.Conv2d(s, t, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(t, t, 1, bias=False),
                    nn.ReLU(),
                    nn.Conv2d(t, t, 1, bias=False),
                )
            )
            self.variance_logits.append(nn.Parameter(torch.full((t,), start)))

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("vid", len(self.regressors) > 0)
        students = [as_map(s) for s in inputs.student_features]
        teachers = [as_map(t) for t in inputs.teacher_features]
        check_channels("vid", students, [r[0].in_channels for r in self.regressors], "student")
        check_channels("vid", teachers, [len(v) for v in self.variance_logits], "teacher")
        channel, sample = inputs.weights.get("channel"), inputs.weights.get("sample")
        terms = []
        for s, t, regressor, logits in zip(students, teachers, self.regressors, self.variance_logits):
            variance = F.softplus(logits) + self.hparams.eps
            terms.append(Fn.vid(regressor(s), variance, t, channel_weight=channel, sample_weight=sample))
        return {"vid": torch.stack(terms).sum()}


class _AttentionFusion(nn.Module):
    """ReviewKD's attention-based fusion (ABF) block for one student stage.

    Reduces the stage to ``mid`` channels; when a deeper stage exists, mixes in its (upsampled) fused map with
    two per-position sigmoid gates; then resizes to the teacher's resolution and maps to the teacher's channels
    with a 3×3 conv.
    """

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, fuse: bool) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, mid_channels, 1, bias=False), nn.BatchNorm2d(mid_channels))
        self.project = nn.Sequential(
            nn.Conv2d(mid_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels)
        )
        self.gate = nn.Sequential(nn.Conv2d(2 * mid_channels, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(self.reduce[0].weight, a=1)  # the authors' initialisation
        nn.init.kaiming_uniform_(self.project[0].weight, a=1)

    def forward(self, x: Tensor, deeper: Tensor | None, out_size: torch.Size) -> tuple[Tensor, Tensor]:
        x = self.reduce(x)
        if self.gate is not None:
            if deeper is None:
                raise ValueError("reviewkd: a fusing stage needs the fused map of the next deeper stage")
            deeper = F.interpolate(deeper, size=x.shape[-2:], mode="nearest")
            z = self.gate(torch.cat([x, deeper], 1))
            x = x * z[:, :1] + deeper * z[:, 1:]
        if x.shape[-2:] != out_size:
            x = F.interpolate(x, size=out_size, mode="nearest")
        return self.project(x), x


@register("reviewkd")
class ReviewKD(Method):
    """Knowledge review: fuse each student stage with all deeper ones, then match every teacher stage with HCL.

    Paper: Chen et al., "Distilling Knowledge via Knowledge Review", CVPR 2021. List the pairs from shallow to deep;
    stage j's fused map is ABF_j(f_s,j, fused_{j+1}) (residual learning from the deepest stage up), and the loss is
    hcl(fused, teacher) with pooled levels 4, 2, 1 (see :func:`fisherkd.functional.hcl`), ramped in linearly over the
    first ``warmup_epochs`` epochs (20, as the authors). The authors tap the teacher before its ReLUs (pre-activation)
    and add the pooled penultimate vectors as the deepest pair. Weight 5: the authors' CIFAR-100 value for most pairs
    (wrn-40-2 → wrn-16-2 / wrn-40-1 / ShuffleV1, resnet32x4 → resnet8x4 / ShuffleV1; they use 8, 0.6 and 1 elsewhere).

    The fusion modules are this method's own (built in ``setup`` from the channel counts of the example features),
    not the distiller's per-pair adapters: fusing a stage with the deeper stages cannot be done pair by pair.
    """

    family = "feature"
    paper = "Chen et al. CVPR 2021, arXiv:2104.09044"
    default_weight = 5.0
    weight_axes = ("sample",)
    min_pairs = 1
    pair_kinds = ("map",)

    @property
    def reads_epoch(self) -> bool:
        return self.hparams.warmup_epochs > 0

    class Params(Hyperparameters):
        levels: tuple[PositiveInt, ...] = (4, 2, 1)
        warmup_epochs: float = 20.0

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.fusions = nn.ModuleList()

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        student_channels, teacher_channels = channels(student_features), channels(teacher_features)
        mid = min(512, student_channels[-1])  # the authors' width of the fusion path
        last = len(student_channels) - 1
        for j, (s, t) in enumerate(zip(student_channels, teacher_channels)):
            self.fusions.append(_AttentionFusion(s, mid, t, fuse=j < last))

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("reviewkd", len(self.fusions) > 0)
        students = [as_map(s) for s in inputs.student_features]
        teachers = [as_map(t) for t in inputs.teacher_features]
        check_channels("reviewkd", students, [f.reduce[0].in_channels for f in self.fusions], "student")
        check_channels("reviewkd", teachers, [f.project[0].out_channels for f in self.fusions], "teacher")
        fused, deeper = [], None
        for student, teacher, fusion in reversed(list(zip(students, teachers, self.fusions))):
            out, deeper = fusion(student, deeper, teacher.shape[-2:])
            fused.append(out)
        fused.reverse()
        loss = Fn.hcl(fused, teachers, self.hparams.levels, sample_weight=inputs.weights.get("sample"))
        warmup = self.hparams.warmup_epochs
        if warmup <= 0:
            return {"reviewkd": loss}
        # a tensor ramp: the epoch is a device scalar, and reading it on the host would sync every step
        ramp = (torch.as_tensor(inputs.epoch, dtype=loss.dtype, device=loss.device) / warmup).clamp(0, 1)
        return {"reviewkd": loss * ramp}
