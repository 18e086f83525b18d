"""Logit-based methods (and the label cross-entropy they are usually paired with).

Every logit method shares what :class:`LogitMethod` writes once: the ``standardize`` option of Logit
Standardization (Sun et al., CVPR 2024), which z-scores both logit vectors per sample before the loss, and the
call of its loss. Most methods are one function of :mod:`fisherkd.functional`: such a method is declared by its
docstring, paper, loss weights, hyper-parameters (named as the function's keywords) and ``function``; the rest
(label, importance weights per axis of ``weight_axes``) is passed by :meth:`LogitMethod.loss`.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field, field_validator
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.functional.logits import _check_jsd_beta
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register
from fisherkd.methods.head import pooled

Positive = Annotated[float, Field(gt=0.0)]
NonNegative = Annotated[float, Field(ge=0.0)]
Fraction = Annotated[float, Field(ge=0.0, le=1.0)]


@register("ce")
class CrossEntropy(Method):
    """Cross-entropy with the ground-truth labels: −log p_s[y]. Not distillation, but the usual partner term.

    Transfer inputs without a label (target -100, see ``data.labelled`` / ``data.transfer``) are left out: the mean
    is over the batch's labelled rows."""

    family = "label"
    paper = "-"
    needs_teacher = False
    needs_target = True
    accepts_unlabelled = True

    class Params(Hyperparameters):
        label_smoothing: float = 0.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"ce": Fn.cross_entropy(inputs.student_logits, inputs.target, self.hparams.label_smoothing)}


class LogitParams(Hyperparameters):
    """Hyper-parameters every logit method has."""

    standardize: bool = False  # Logit Standardization: z-score each sample's logits before the loss


class LogitMethod(Method):
    """A loss between student and teacher logits; the term is named after the method.

    A subclass either sets ``function`` (a function of :mod:`fisherkd.functional`), which is called as
    ``function(student, teacher[, target], **hyper-parameters, <axis>_weight=...)``: the label when the method
    ``needs_target``, every hyper-parameter but ``standardize`` by name, and one importance weight per axis of
    ``weight_axes`` (``sample_weight``, ``class_weight``); or it overrides :meth:`loss`.
    """

    family = "logit"
    Params = LogitParams
    function: ClassVar[Callable[..., Tensor] | None] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.function is None:
            return
        # A declaration whose names the function does not take fails at import, not at the first batch.
        accepted = inspect.signature(cls.function).parameters
        passed = [k for k in cls.Params.model_fields if k != "standardize"] + [f"{a}_weight" for a in cls.weight_axes]
        unknown = [k for k in passed if k not in accepted]
        if unknown:
            raise TypeError(f"{cls.__name__}: {cls.function.__name__}() takes no argument {', '.join(unknown)}")

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        student, teacher = inputs.student_logits, inputs.teacher_logits
        if self.hparams.standardize:
            student, teacher = Fn.standardize_logits(student), Fn.standardize_logits(teacher)
        return {self.name: self.loss(student, teacher, inputs)}

    def loss(self, student: Tensor, teacher: Tensor, inputs: MethodInputs) -> Tensor:
        target = (inputs.target,) if self.needs_target else ()
        hparams = {k: getattr(self.hparams, k) for k in type(self.hparams).model_fields if k != "standardize"}
        weights = {f"{axis}_weight": inputs.weights.get(axis) for axis in self.weight_axes}
        return self.function(student, teacher, *target, **hparams, **weights)


def _ramp(epoch: Tensor | float, epochs: float, like: Tensor) -> Tensor:
    """min(epoch / epochs, 1) (clamped at 0) as a tensor on ``like``'s device: no host sync for tensor epochs."""
    if epochs <= 0:
        return torch.ones((), dtype=like.dtype, device=like.device)
    return (torch.as_tensor(epoch, dtype=like.dtype, device=like.device) / epochs).clamp(0.0, 1.0)


@register("kd")
class KD(LogitMethod):
    """Hinton KD: τ²·KL(p_t ‖ p_s) at temperature τ. Authors' CIFAR setting: τ=4, KD 0.9 with CE 0.1.

    Paper: Hinton, Vinyals, Dean, "Distilling the Knowledge in a Neural Network", 2015.
    """

    weight_axes = ("sample",)
    paper = "Hinton et al. 2015, arXiv:1503.02531"
    function = staticmethod(Fn.kd)
    default_weight = 0.9
    label_weight = 0.1

    class Params(LogitParams):
        temperature: Positive = 4.0


@register("fisher_logit")
class FisherLogit(LogitMethod):
    """Fisher logit loss: ½·Σ_c p_t,c (d_c − d̄)², d = z_s − z_t, d̄ = Σ_c p_t,c d_c, p_t at τ. τ=4, weight 0.9.

    The quadratic (Gauss-Newton) form of Hinton KD's τ²·KL(p_t ‖ p_s): the two agree to second order in d, and
    the gradient with respect to the student's logits is F·d with F = diag(p_t) − p_t p_tᵀ. Weightable per sample
    and per class (``fisher: {axis: class}`` weights classes by the teacher's p_c(1 − p_c)). A FisherKD loss
    (see DESIGN.md §4): on MNIST-1D it was a weaker signal than KD's KL (§7), so use it as an ablation.
    """

    weight_axes = ("sample", "class")
    paper = "FisherKD (the local quadratic form of Hinton et al. 2015)"
    function = staticmethod(Fn.fisher_logit)
    default_weight = 0.9
    label_weight = 0.1

    class Params(LogitParams):
        temperature: Positive = 4.0


@register("ls_kd")
class LogitStandardizedKD(KD):
    """KD on standardized logits: τ²·KL(p_t ‖ p_s), p = softmax(((z − mean z)/std z)/τ). τ=2, KD 9 with CE 0.1.

    Paper: Sun et al., "Logit Standardization in Knowledge Distillation", CVPR 2024. Standardizing removes the
    need for the student to match the teacher's logit scale and shift; the authors' CIFAR setting is base
    temperature 2 and KD weight 9 (``--logit-stand --base-temp 2 --kd-weight 9``).
    """

    paper = "Sun et al. CVPR 2024, arXiv:2403.01427"
    default_weight = 9.0
    label_weight = 0.1

    class Params(KD.Params):
        standardize: bool = True
        temperature: Positive = 2.0


@register("dkd")
class DKD(LogitMethod):
    """Decoupled KD: τ²(α·TCKD + β·NCKD), linearly warmed up over the first epochs. τ=4, α=1, β=8, CE 1.

    Paper: Zhao et al., "Decoupled Knowledge Distillation", CVPR 2022. TCKD = KL(b_t ‖ b_s) on the binary
    target-vs-rest probabilities b = [p_y, 1 − p_y]; NCKD = KL(p̂_t ‖ p̂_s) on the softmax over the non-target
    classes. KL(p_t ‖ p_s) = TCKD + (1 − p_t,y)·NCKD; DKD weights the two parts freely. The loss is multiplied
    by min(epoch / warmup_epochs, 1) (``inputs.epoch``, a float or a 0-d tensor), as in the authors' code.
    """

    weight_axes = ("sample",)
    paper = "Zhao et al. CVPR 2022, arXiv:2203.08679"
    default_weight = 1.0
    needs_target = True

    @property
    def reads_epoch(self) -> bool:
        return self.hparams.warmup_epochs > 0

    class Params(LogitParams):
        alpha: NonNegative = 1.0
        beta: NonNegative = 8.0
        temperature: Positive = 4.0
        warmup_epochs: NonNegative = 20.0

    def loss(self, student: Tensor, teacher: Tensor, inputs: MethodInputs) -> Tensor:
        h = self.hparams
        value = Fn.dkd(
            student, teacher, inputs.target, h.alpha, h.beta, h.temperature, sample_weight=inputs.weights.get("sample")
        )
        return _ramp(inputs.epoch, h.warmup_epochs, value) * value


@register("nkd")
class NKD(LogitMethod):
    """Normalized KD: −p_t,y·log p_s,y + γλ²·Σ_{i≠y} −p̂_t,i·log p̂_s,i. λ=1, γ=1.5, NKD 1 with CE 1.

    Paper: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels", ICCV 2023. p̂ = softmax(z_{≠y}/λ) over the non-target logits
    only; the target logit is removed, so it never enters the non-target term.
    """

    weight_axes = ("sample",)
    paper = "Yang et al. ICCV 2023, arXiv:2303.13005"
    function = staticmethod(Fn.nkd)
    default_weight = 1.0
    needs_target = True

    class Params(LogitParams):
        temperature: Positive = 1.0
        gamma: NonNegative = 1.5


@register("dist")
class DIST(LogitMethod):
    """DIST: τ²[β(1 − mean_n ρ(p_s[n,:], p_t[n,:])) + γ(1 − mean_c ρ(p_s[:,c], p_t[:,c]))]. β=γ=1, τ=4 (CIFAR).

    Paper: Huang et al., "Knowledge Distillation from A Stronger Teacher", NeurIPS 2022. ρ is the Pearson
    correlation: inter-class relations within each sample and intra-class relations across the batch.
    """

    paper = "Huang et al. NeurIPS 2022, arXiv:2205.10536"
    function = staticmethod(Fn.dist)
    default_weight = 1.0

    class Params(LogitParams):
        beta: NonNegative = 1.0
        gamma: NonNegative = 1.0
        temperature: Positive = 4.0


@register("reverse_kl")
class ReverseKL(LogitMethod):
    """Reverse KL: τ²·KL(p_s ‖ p_t), mode-seeking. τ=1.

    Paper: Gu et al., "MiniLLM: Knowledge Distillation of Large Language Models", ICLR 2024 (which optimizes the
    sequence-level reverse KL with policy gradients; this is its token-level form).
    """

    weight_axes = ("sample",)
    paper = "Gu et al. ICLR 2024, arXiv:2306.08543"
    function = staticmethod(Fn.reverse_kl)

    class Params(LogitParams):
        temperature: Positive = 1.0


@register("jsd")
class JSD(LogitMethod):
    """Generalized JSD, β as in GKD/TRL: β·KL(p_t ‖ M) + (1−β)·KL(p_s ‖ M), M = β·p_t + (1−β)·p_s. β=0.5, τ=1.

    Paper: Agarwal et al., "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD), ICLR 2024, Eq. 1. The value of TRL's ``generalized_jsd_loss`` for the same β, 0 < β < 1: small β
    behaves as β·KL(p_t ‖ p_s) (forward), β near 1 as (1−β)·KL(p_s ‖ p_t) (reverse). The ends are refused, not
    switched to the full KLs as TRL does (a jump); use ``kd`` or ``reverse_kl`` there.
    """

    weight_axes = ("sample",)
    paper = "Agarwal et al. ICLR 2024, arXiv:2306.13649 (β as in GKD/TRL)"
    function = staticmethod(Fn.jsd)

    class Params(LogitParams):
        beta: float = 0.5
        temperature: Positive = 1.0

        @field_validator("beta")
        @classmethod
        def _inside_the_unit_interval(cls, beta: float) -> float:
            _check_jsd_beta(beta)
            return beta


@register("tvd")
class TVD(LogitMethod):
    """Total variation distance: ½·Σ_c |p_t,c − p_s,c|. τ=1.

    Paper: Wen et al., "f-Divergence Minimization for Sequence-Level Knowledge Distillation", ACL 2023.
    """

    weight_axes = ("sample",)
    paper = "Wen et al. ACL 2023, arXiv:2307.15190"
    function = staticmethod(Fn.tvd)

    class Params(LogitParams):
        temperature: Positive = 1.0


@register("skew_kl")
class SkewKL(LogitMethod):
    """Skew forward KL: KL(p_t ‖ α·p_t + (1−α)·p_s). α=0.1, τ=1.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """

    weight_axes = ("sample",)
    paper = "Ko et al. ICML 2024, arXiv:2402.03898"
    function = staticmethod(Fn.skew_kl)

    class Params(LogitParams):
        alpha: Fraction = 0.1
        temperature: Positive = 1.0


@register("skew_reverse_kl")
class SkewReverseKL(LogitMethod):
    """Skew reverse KL: KL(p_s ‖ α·p_s + (1−α)·p_t). α=0.1, τ=1.

    Paper: Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language Models", ICML 2024.
    """

    weight_axes = ("sample",)
    paper = "Ko et al. ICML 2024, arXiv:2402.03898"
    function = staticmethod(Fn.skew_reverse_kl)

    class Params(LogitParams):
        alpha: Fraction = 0.1
        temperature: Positive = 1.0


@register("sinkhorn")
class Sinkhorn(LogitMethod):
    """SinKD: batch-level Sinkhorn distance Σ_ij P_ij·‖p_s,i − p_t,j‖₁ / B. τ=2, ε=0.1, 20 iterations.

    Paper: Cui et al., "SinKD: Sinkhorn Distance Minimization for Knowledge Distillation", 2024. The plan P
    comes from ``iterations`` rounds of row/column scaling of the kernel exp(−M/ε). The value is a mean over
    the batch (the reference code sums over the batch and scales by 1e-3), so the loss weight here does not
    depend on the batch size; 1.0 is this library's default, not a number from the paper.
    """

    paper = "Cui et al. 2024, arXiv:2402.17110"
    function = staticmethod(Fn.sinkhorn)

    class Params(LogitParams):
        temperature: Positive = 2.0
        epsilon: Positive = 0.1
        iterations: Annotated[int, Field(ge=1)] = 20


@register("ofa")
class OFA(LogitMethod):
    """OFA logit loss: −Σ_c [(p_t,c + 1[c=y])^ε − 1[c=y]]·log p_s,c. ε=1, τ=1, OFA 1 with CE 1.

    Paper: Hao et al., "One-for-All: Bridge the Gap Between Heterogeneous Architectures in Knowledge
    Distillation", NeurIPS 2023. Only the loss on the final logits; the paper also applies it to logits
    projected from intermediate stages (give those as separate terms). ε=1 is the soft-target cross-entropy.
    """

    weight_axes = ("sample",)
    paper = "Hao et al. NeurIPS 2023, arXiv:2310.19444"
    function = staticmethod(Fn.ofa)
    default_weight = 1.0
    needs_target = True

    class Params(LogitParams):
        eps: Positive = 1.0
        temperature: Positive = 1.0


class _ReverseGradient(torch.autograd.Function):
    """Identity forward; the backward pass multiplies the gradient by −strength (Ganin & Lempitsky, 2015)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, strength: Tensor) -> Tensor:
        ctx.save_for_backward(strength)
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (strength,) = ctx.saved_tensors
        return -strength * grad, None


@register("ctkd")
class CTKD(LogitMethod):
    """Curriculum temperature KD: KD at a learned temperature τ = 1 + 20·σ(θ) that is trained adversarially.

    Paper: Li et al., "Curriculum Temperature for Knowledge Distillation", AAAI 2023 (global temperature).
    Loss τ²·KL(p_t ‖ p_s) at τ = τ_min + τ_range·σ(θ). θ is a parameter of this method (initialized at 1, as in
    the authors' code, so τ starts near 15.6) and reaches θ through a gradient-reversal layer: the optimizer
    moves θ to *increase* the KD loss while the student decreases it. The reversal strength follows the
    authors' cosine curriculum λ = λ_max·(1 − cos(π·min(epoch/curriculum_epochs, 1)))/2, from 0 to λ_max.
    Authors' weights: KD 0.9 with CE 0.1.
    """

    weight_axes = ("sample",)
    paper = "Li et al. AAAI 2023, arXiv:2211.16231"
    default_weight = 0.9
    label_weight = 0.1

    @property
    def reads_epoch(self) -> bool:
        return self.hparams.curriculum_epochs > 0

    class Params(LogitParams):
        temperature_min: Positive = 1.0
        temperature_range: Positive = 20.0
        max_reversal: NonNegative = 1.0
        curriculum_epochs: Positive = 10.0

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.theta = nn.Parameter(torch.ones(()))

    def temperature(self, epoch: Tensor | float = math.inf) -> Tensor:
        """τ(θ), with the gradient to θ reversed at the curriculum strength of ``epoch`` (full by default)."""
        h = self.hparams
        progress = _ramp(epoch, h.curriculum_epochs, self.theta.detach())
        strength = h.max_reversal * (1.0 - torch.cos(math.pi * progress)) / 2.0
        theta = _ReverseGradient.apply(self.theta, strength)
        return h.temperature_min + h.temperature_range * torch.sigmoid(theta)

    def loss(self, student: Tensor, teacher: Tensor, inputs: MethodInputs) -> Tensor:
        tau = self.temperature(inputs.epoch)
        return Fn.kd(student, teacher, tau, sample_weight=inputs.weights.get("sample"))


@register("mlkd")
class MLKD(LogitMethod):
    """Multi-level logit distillation: instance, batch and class alignment at τ ∈ {2,…,6}. KD 0.9 with CE 0.1.

    Paper: Jin, Wang, Lin, "Multi-Level Logit Distillation", CVPR 2023. Σ_τ [τ²·KL(p_t ‖ p_s)
    + ‖P_tP_tᵀ − P_sP_sᵀ‖²/B + ‖P_tᵀP_t − P_sᵀP_s‖²/C] with P the B×C probability matrix at τ. The authors'
    prediction augmentation (weak/strong views) and confidence masks are not included.
    """

    paper = "Jin et al. CVPR 2023"
    function = staticmethod(Fn.mlkd)
    default_weight = 0.9
    label_weight = 0.1

    class Params(LogitParams):
        temperatures: tuple[Positive, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)


def _student_classes(student: nn.Module, method: str) -> int:
    """The number of classes of a student: the output width of its last ``nn.Linear`` (its classifier)."""
    linears = [m for m in student.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{method}: the student has no nn.Linear classifier to count its classes: set num_classes=")
    return linears[-1].out_features


@register("uskd")
class USKD(Method):
    """Teacher-free self-KD: NKD's loss on customised soft labels (smoothed target, Zipf non-target). α=β=μ=0.1.

    Paper: Yang et al., "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
    Normalized Loss and Customized Soft Labels" (USKD), ICCV 2023; code github.com/yzd-v/cls_KD. Loss
    α·(−t̃·log p_y) + β·Σ_{i≠y} −q_i·log p̂_i + μ·CE_0.1(w, y) (see :func:`fisherkd.functional.uskd`): t̃ = p_y² shifted
    to batch mean 1, q Zipf (1/rank) over the classes ranked by the student's own predictions, p̂ the softmax over the
    non-target logits as in NKD. With one layer pair (``pairs: [[student_layer, <ignored>]]``) a linear "weak" head
    w on that student feature (average-pooled when a map) joins the ranking and is trained by label-smoothed (0.1)
    cross-entropy, as the authors do with the pooled output of the stage before the last; without a pair the ranks
    come from the final logits alone. Only the student side of the pair is read, so no teacher is needed.
    Defaults: the authors' CIFAR-100 config (``res18_sd_cifar.py``: α=0.1, β=0.1, μ=0.1); their ImageNet configs use
    α=1, β=0.1, μ=0.005. The usual label cross-entropy (weight 1) stays; loss weight 1.
    """

    family = "label"  # a loss on the student's own predictions and labels: no teacher logits to compare with
    paper = "Yang et al. ICCV 2023, arXiv:2303.13005"
    default_weight = 1.0
    needs_teacher = False
    needs_target = True
    max_pairs = 1
    pair_kinds = ("vector", "map")

    class Params(Hyperparameters):
        alpha: NonNegative = 0.1
        beta: NonNegative = 0.1
        mu: NonNegative = 0.1
        num_classes: Annotated[int, Field(ge=2)] | None = Field(
            None, description="classes of the weak head (default: the output width of the student's last nn.Linear)"
        )

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.weak_head: nn.Linear | None = None
        self._feature: tuple[int, torch.device] | None = None  # width and device of the tapped feature, from setup

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        feature = pooled(student_features[0])
        self._feature = (feature.shape[1], feature.device)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        # the head's width comes from setup, its classes from the student: both are known only here
        if self._feature is not None and self.weak_head is None:
            width, device = self._feature
            classes = self.hparams.num_classes or _student_classes(student, self.name)
            self.weak_head = nn.Linear(width, classes).to(device)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        weak = None
        if inputs.student_features:
            if self.weak_head is None:
                raise RuntimeError(
                    "uskd: its weak head is built from the tapped feature: use it through a Distiller given "
                    "example_input=, or call method.setup(...) and method.bind(student, None) first"
                )
            weak = self.weak_head(pooled(inputs.student_features[0]).to(self.weak_head.weight.dtype))
        h = self.hparams
        return {"uskd": Fn.uskd(inputs.student_logits, inputs.target, weak, h.alpha, h.beta, h.mu)}


@register("mcmi")
class MCMI(Method):
    """Maximum-CMI training: −CMI of the model's own outputs given the label, next to CE. λ=0.25, τ=1.

    Paper: Ye et al., "Bayes Conditional Distribution Estimation for Knowledge Distillation Based on Conditional
    Mutual Information", ICLR 2024 (arXiv:2401.08732; code github.com/iclr2024mcmi/ICLRMCMI). A teacher trained on
    CE − λ·CMI, CMI = (1/N) Σ_n KL(p_n ‖ p̄_{y_n}) (see :func:`fisherkd.functional.cmi`), estimates the Bayes
    conditional distribution better for its students than a plain CE teacher. It is a teacher-training objective:
    set ``teacher.train.mcmi: {weight: 0.25}`` and the cached teacher trains with ``[ce, mcmi]``. The term is −CMI
    (a negative loss). Defaults: the authors' fine-tuning scripts use λ ∈ {0.1, 0.15, 0.2, 0.25} (0.25 for CIFAR-10
    and CIFAR-100 VGG-8) and probabilities at τ = 1.
    """

    family = "label"  # a loss on the model's own predictions and labels: it reads no teacher
    paper = "Ye et al. ICLR 2024, arXiv:2401.08732"
    default_weight = 0.25
    needs_teacher = False
    needs_target = True
    accepts_unlabelled = True

    class Params(Hyperparameters):
        temperature: Positive = 1.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"mcmi": -Fn.cmi(inputs.student_logits, inputs.target, self.hparams.temperature)}
