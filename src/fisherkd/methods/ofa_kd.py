"""OFA-KD, whole: branch heads that project intermediate student stages into the logit space, each trained with the
OFA adaptive-target loss against the teacher's logits, plus that loss on the student's final logits.

Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge Distillation", NeurIPS
2023; code github.com/Hao840/OFAKD. Logit space is the one space every architecture shares, so a CNN, a ViT or an
MLP stage can be compared with any teacher there; the branches are trained with the student and dropped after
training (the student's own inference is unchanged; they are in training checkpoints, never in an export).

Branches, by what the stage gives (as in the authors' ``distillers/ofa.py`` where they have one):

- B×C×H×W maps: n stride-2 depthwise-separable conv blocks (3×3 depthwise, 1×1 pointwise, BN, ReLU, twice;
  channels doubling, the last one to ``width``), n = log2(H / H_min) with H_min the smallest height among the
  method's map pairs (the authors' 4 − stage for a 4-stage ResNet given all its stages), a 1×1 conv to ``width``
  when n = 0; then global average pooling and a linear classifier.
- B×T×D tokens: a linear map to the student's final width when D differs, max(k − 1 − j, 1) pre-norm transformer
  blocks (4 heads, MLP ratio 4) for the j-th of k token pairs listed shallow to deep (the authors' 4 − stage for
  a 4-stage model), the class token (``token_pool: first``; ``auto`` = first when the student has a ``cls_token``)
  or the mean over valid tokens, and a linear classifier. (The authors first merge patches down to a 7×7 grid;
  the zoo's ViTs already have ≤ 7×7 patches, so that step is left out.)
- B×D vectors (an MLP student): Linear → GELU → Linear, hidden ``width``.

``width`` is max(student's, teacher's) final feature width: the widest tapped student stage and the input width of
the teacher's last ``nn.Linear``; token branches work at the widest tapped token width (the authors': the student's).
Initialisation as the authors': Kaiming-normal (fan-out) convs, unit BN, truncated-normal (std 0.02) linears.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register
from fisherkd.methods.features import check_built

Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]


class SepConv(nn.Sequential):
    """A stride-2 depthwise-separable conv block: (3×3 depthwise, 1×1 pointwise, BN, ReLU) twice, the first
    depthwise conv halving the resolution."""

    def __init__(self, channels_in: int, channels_out: int) -> None:
        c = channels_in
        super().__init__(
            nn.Conv2d(c, c, 3, stride=2, padding=1, groups=c, bias=False),
            nn.Conv2d(c, c, 1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, stride=1, padding=1, groups=c, bias=False),
            nn.Conv2d(c, channels_out, 1, bias=False),
            nn.BatchNorm2d(channels_out),
            nn.ReLU(),
        )


class TokenBranch(nn.Module):
    """Tokens B×T×D → logits: projection, transformer blocks, class token or masked mean, linear classifier."""

    def __init__(self, dim: int, width: int, blocks: int, classes: int, pool: Literal["mean", "first"]) -> None:
        super().__init__()
        self.project = nn.Linear(dim, width) if dim != width else nn.Identity()
        heads = 4 if width % 4 == 0 else 1
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                width, heads, dim_feedforward=4 * width, dropout=0.0, activation="gelu", batch_first=True,
                norm_first=True,
            )
            for _ in range(blocks)
        )
        self.head = nn.Linear(width, classes)
        self.pool = pool

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = self.project(x)
        padding = None if mask is None else ~mask.bool()
        for block in self.blocks:
            x = block(x, src_key_padding_mask=padding)
        if self.pool == "first":
            return self.head(x[:, 0])
        if mask is None:
            return self.head(x.mean(1))
        valid = mask.to(x.dtype).unsqueeze(-1)
        return self.head((x * valid).sum(1) / valid.sum(1).clamp_min(1.0))


def _init_weights(module: nn.Module) -> None:
    # the authors' init_weights (distillers/utils.py)
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def _last_linear(model: nn.Module) -> nn.Linear | None:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


@register("ofa_branches")
class OFABranches(Method):
    """OFA-KD whole: OFA loss on logits projected from student stages (branch heads) and on the final logits. ε=1.

    Paper: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation", NeurIPS 2023. Terms ``ofa_branches`` = branch_weight·Σ_k OFA(b_k(f_k), z_t, y) over the method's
    pairs (student stage f_k, its branch head b_k; the teacher side of a pair is not read: write ``""``) and
    ``ofa_logits`` = OFA(z_s, z_t, y) (with ``final: true``), OFA(z, z_t, y) = mean_n −Σ_c [(p_t,c + 1[c=y])^ε −
    1[c=y]]·log softmax(z/τ)_c (see :func:`fisherkd.functional.ofa`). The authors' defaults: stages 1–4, ε=1 (their
    CIFAR-100 runs; 1.5 for some ImageNet pairs), τ=1, every loss weight 1 with the label CE 1. Branch designs
    (maps: separable convs; tokens: transformer blocks; vectors: an MLP) in :mod:`fisherkd.methods.ofa_kd`.
    """

    family = "feature"  # its pairs are feature taps (each projected to logits by a branch head)
    paper = "Hao et al. NeurIPS 2023, arXiv:2310.19444"
    default_weight = 1.0
    needs_target = True
    min_pairs = 1
    pair_kinds = ("map", "vector", "token")
    weight_axes = ("sample",)

    class Params(Hyperparameters):
        eps: Positive = 1.0
        temperature: Positive = 1.0
        branch_weight: NonNegative = 1.0  # the authors' --ofa-loss-weight, relative to the final-logit term
        final: bool = True  # also the OFA loss on the final logits (false when an ``ofa`` entry gives it)
        token_pool: Literal["auto", "mean", "first"] = "auto"
        num_classes: Annotated[int, Field(ge=2)] | None = Field(
            None, description="classes of the branch heads (default: the output width of the student's last nn.Linear)"
        )

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.branches = nn.ModuleList()
        self._shapes: list[tuple[int, ...]] = []  # per pair, the stage's shape without the batch, from setup
        self._device: torch.device | None = None

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        for f in student_features:
            if f.dim() not in (2, 3, 4):
                raise ValueError(
                    f"ofa_branches: a student stage of shape {tuple(f.shape)} is not B×D, B×T×D or B×C×H×W: tap a "
                    "stage's output (e.g. 'layer2', 'blocks.1', 'features.1')"
                )
        self._shapes = [tuple(f.shape[1:]) for f in student_features]
        self._device = student_features[0].device

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        # the heads need the stage shapes (setup) and both models' widths and the classes (here): built once
        if not self._shapes or len(self.branches):
            return
        s_head, t_head = _last_linear(student), None if teacher is None else _last_linear(teacher)
        classes = self.hparams.num_classes or (s_head.out_features if s_head is not None else None)
        if classes is None:
            raise ValueError(
                "ofa_branches: the student has no nn.Linear classifier to count its classes: set num_classes="
            )
        # the student's final width is its widest tapped stage (a flatten head's input would overstate it)
        stage_widths = [s[-1] if len(s) == 2 else s[0] for s in self._shapes]
        width = max(stage_widths + ([t_head.in_features] if t_head is not None else []))
        token_width = max([s[-1] for s in self._shapes if len(s) == 2], default=width)
        pool = self.hparams.token_pool
        if pool == "auto":
            pool = "first" if hasattr(student, "cls_token") else "mean"
        heights = [s[1] for s in self._shapes if len(s) == 3]
        tokens = [j for j, s in enumerate(self._shapes) if len(s) == 2]
        for j, shape in enumerate(self._shapes):
            if len(shape) == 3:
                steps = max(round(math.log2(shape[1] / min(heights))), 0)
                branch = _map_branch(shape[0], width, steps, classes)
            elif len(shape) == 2:
                blocks = max(len(tokens) - 1 - tokens.index(j), 1)
                branch = TokenBranch(shape[-1], token_width, blocks, classes, pool)
            else:
                branch = nn.Sequential(nn.Linear(shape[0], width), nn.GELU(), nn.Linear(width, classes))
            _init_weights(branch)
            self.branches.append(branch.to(self._device))

    def branch_logits(self, student_features: list[Tensor], mask: Tensor | None = None) -> list[Tensor]:
        """The logits each branch head projects from its student stage."""
        check_built(self.name, len(self.branches) == len(student_features) > 0)
        logits = []
        for branch, feature in zip(self.branches, student_features):
            feature = feature.to(next(branch.parameters()).dtype)
            if isinstance(branch, TokenBranch):
                token_mask = mask if mask is not None and mask.shape == feature.shape[:2] else None
                logits.append(branch(feature, token_mask))
            else:
                logits.append(branch(feature))
        return logits

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        h = self.hparams
        sample = inputs.weights.get("sample")
        branches = self.branch_logits(inputs.student_features, inputs.mask)
        teacher, target = inputs.teacher_logits, inputs.target
        terms = {
            "ofa_branches": h.branch_weight
            * Fn.ofa_branches(branches, teacher, target, h.eps, h.temperature, sample_weight=sample)
        }
        if h.final:
            terms["ofa_logits"] = Fn.ofa(
                inputs.student_logits, teacher, target, h.eps, h.temperature, sample_weight=sample
            )
        return terms


def _map_branch(channels: int, width: int, steps: int, classes: int) -> nn.Sequential:
    """Separable stride-2 blocks (channels doubling, the last to ``width``) or a 1×1 conv, pooling, classifier."""
    if steps == 0:
        blocks: list[nn.Module] = [nn.Conv2d(channels, width, 1)]
    else:
        blocks = [SepConv(channels * 2**i, width if i == steps - 1 else channels * 2 ** (i + 1)) for i in range(steps)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, classes))
