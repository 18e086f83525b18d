"""Head-metric methods: the student's feature, projected to the teacher's width, read by the teacher's frozen
linear classifier z = Wh + b.

At the classifier's input h_t, KL(p_t ‖ softmax((W(h_t+δ)+b)/τ)) = ½ δᵀMδ + O(δ³) with
M = Wᵀ(diag p − ppᵀ)W/τ² = Cov_{c∼p}(w_c)/τ² (rank ≤ C − 1): the teacher's classifier defines a metric on feature
errors. ``head_kd`` minimises that KL itself, SRRL a squared error on W·δ (metric WᵀW), SimKD the identity metric
on the last map and then predicts with the teacher's classifier (see DESIGN.md §4b).

Finding the classifier. A method has one layer pair; the teacher side is the classifier's input (``"head:in"``, a
vector) or the map or vector that the classifier sees average-pooled (``"pool"``, ``"layer4"``). The classifier is
the teacher module named by the ``head`` hyper-parameter, or else the teacher's *last* ``nn.Linear`` that takes the
tapped feature's width: with a ``"<module>:in"`` tap of a final classifier that is that module, and it is the
classifier of every zoo, timm-style and Transformers classification model. It stays the teacher's: frozen, never in
the optimizer (:meth:`Distiller.trainable_parameters` leaves out the teacher's parameters by identity), and not
registered in the method (the checkpoint keeps no second copy).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveFloat, PositiveInt
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.core import Inputs, call_model, nearest
from fisherkd.engine.distributed import all_reduce_sum
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register
from fisherkd.methods.features import as_map, check_built, check_channels
from fisherkd.taps import Taps

HEAD_HELP = "name of the teacher's nn.Linear classifier (default: its last nn.Linear taking the tapped feature's width)"


def pooled(x: Tensor) -> Tensor:
    """What a linear classifier after global average pooling sees: B×D vectors as they are, B×C×H×W maps pooled."""
    if x.dim() == 2:
        return x
    if x.dim() == 4:
        return x.mean((2, 3))
    raise ValueError(
        f"a linear classifier reads B×D vectors or average-pooled B×C×H×W maps, got a feature of shape "
        f"{tuple(x.shape)}: tap the classifier's input, e.g. 'head:in'"
    )


def find_classifier(teacher: nn.Module, width: int, head: str | None, method: str) -> nn.Linear:
    """The teacher's classifier: the ``nn.Linear`` named ``head``, or else its last one that takes ``width``."""
    linears = {name: m for name, m in teacher.named_modules() if isinstance(m, nn.Linear)}
    if head is not None:
        modules = dict(teacher.named_modules())
        if head not in modules:
            choices = linears or modules
            raise ValueError(f"{method}: the teacher has no module {head!r} (head=); {nearest(head, choices)}")
        module = modules[head]
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"{method}: teacher module {head!r} is a {type(module).__name__}, not the nn.Linear classifier "
                f"(head=); {nearest(head, linears) if linears else 'the teacher has no nn.Linear'}"
            )
        if module.in_features != width:
            raise ValueError(
                f"{method}: teacher classifier {head!r} takes {module.in_features} features, but the tapped teacher "
                f"feature has {width}: tap the classifier's input ('{head}:in') or the layer it pools"
            )
        return module
    fitting = [name for name, m in linears.items() if m.in_features == width]
    if not fitting:
        found = ", ".join(f"{n} ({m.in_features})" for n, m in linears.items()) or "none"
        raise ValueError(
            f"{method}: no nn.Linear of the teacher takes the tapped feature's {width} features (its linear layers: "
            f"{found}): tap the classifier's input, e.g. 'head:in', or name the classifier with head="
        )
    return linears[fitting[-1]]


class TeacherHeadPredictor(nn.Module):
    """Predicts with the teacher's classifier: student → tapped feature → projector → average pool → classifier.

    One module for evaluation and export. The student runs whole and a forward hook, placed for the call and
    removed after it, keeps the tapped feature; ``torch.jit.trace`` and ONNX export record the ops it feeds.
    ``pool_to`` first average-pools the student map to the teacher's smaller spatial size (SimKD's alignment).
    """

    def __init__(
        self,
        student: nn.Module,
        tap: str,
        projector: nn.Module,
        classifier: nn.Linear,
        pool_to: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        # a new module starts in training mode: take the student's, or an exporter that restores the mode after
        # tracing in eval would switch the student's BatchNorm to batch statistics
        self.training = student.training
        self.student, self.projector, self.classifier = student, projector, classifier
        self.tap, self.pool_to = tap, pool_to

    def forward(self, inputs: Inputs) -> Tensor:
        with Taps(self.student, [self.tap], "student") as taps:
            call_model(self.student, inputs)
            feature = taps[self.tap]
        if self.pool_to is not None:
            feature = F.adaptive_avg_pool2d(feature, self.pool_to)
        return self.classifier(pooled(self.projector(feature)))


def _shrink(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Average-pool a map to ``size`` when it has more positions (never upsample)."""
    if math.prod(x.shape[-2:]) > math.prod(size):
        return F.adaptive_avg_pool2d(x, size)
    return x


class _HeadMethod(Method):
    """Shared plumbing: the teacher's classifier is found once both the teacher (``bind``) and the tapped teacher
    feature's width (``setup``) are known, so a wrong pair fails when the Distiller is built."""

    family = "feature"
    min_pairs = 1
    max_pairs = 1
    weight_axes = ("sample",)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self._teacher: tuple[nn.Module, ...] = ()  # tuples: plain references, not submodules
        self._head: tuple[nn.Linear, ...] = ()
        self._width: int | None = None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        self._teacher = () if teacher is None else (teacher,)
        self._find_classifier()

    def _remember_width(self, teacher_features: list[Tensor]) -> None:
        self._width = pooled(teacher_features[0]).shape[1]  # also refuses, before training, what no head reads
        self._find_classifier()

    def _find_classifier(self) -> None:
        if self._teacher and self._width is not None:
            self._head = (find_classifier(self._teacher[0], self._width, self.hparams.head, self.name),)

    @property
    def classifier(self) -> nn.Linear:
        if not self._head:
            raise RuntimeError(
                f"{self.name}: the teacher's classifier is not known yet: use the method through a Distiller given "
                "example_input=, or call method.setup(...) and method.bind(student, teacher) first"
            )
        return self._head[0]


@register("head_kd")
class HeadKD(_HeadMethod):
    """Head-metric transfer: KD of the projected student feature through the teacher's frozen classifier.

    FisherKD (DESIGN.md §4b); SRRL (Yang et al. ICLR 2021) and SimKD (Chen et al. CVPR 2022) are its squared-error
    relatives. Loss τ²·mean_b KL(softmax(z_t/τ) ‖ softmax(z_s/τ)), z_s = W·pool(P(h_s)) + b, z_t = W·pool(h_t) + b,
    with P the distiller's linear (1×1 conv for maps) adapter and W, b the teacher's classifier: for a small
    δ = P(h_s) − h_t it is ½τ²·δᵀMδ with M = Wᵀ(diag p_t − p_t p_tᵀ)W/τ², the full-matrix Fisher metric of the
    teacher's head. Plus ``anchor_weight``·mean (P(h_s) − h_t)², an optional isotropic term for the directions the
    head cannot see. z_t is computed from h_t, not read from the teacher's output, so the loss is exactly 0 at
    P(h_s) = h_t. τ = 4 as KD; loss weight 1 alongside the label loss (weight 1). The student keeps its own
    classifier (same classes as the teacher's); ``predict_with_teacher_head`` predicts SimKD-style instead.
    """

    paper = "FisherKD head metric (DESIGN.md §4b); cf. Yang et al. ICLR 2021, Chen et al. CVPR 2022"
    default_weight = 1.0
    label_weight = 1.0
    adapter = "student_to_teacher"
    pair_kinds = ("vector", "map")

    class Params(Hyperparameters):
        temperature: PositiveFloat = 4.0
        anchor_weight: float = Field(0.0, ge=0.0)
        head: str | None = Field(None, description=HEAD_HELP)
        predict_with_teacher_head: bool = False

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        self._remember_width(teacher_features)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        classifier, h = self.classifier, self.hparams
        student, teacher = pooled(inputs.student_features[0]), pooled(inputs.teacher_features[0])
        loss = Fn.head_kd(
            student,
            teacher.detach(),
            classifier.weight,
            classifier.bias,
            h.temperature,
            anchor_weight=h.anchor_weight,
            sample_weight=inputs.weights.get("sample"),
        )
        return {"head_kd": loss}

    def inference_model(
        self, student: nn.Module, teacher: nn.Module | None, pairs: list[tuple[str, str]], adapters: list
    ) -> nn.Module | None:
        if not self.hparams.predict_with_teacher_head:
            return None
        return TeacherHeadPredictor(student, pairs[0][0], adapters[0], self.classifier)


@register("simkd")
class SimKD(_HeadMethod):
    """SimKD: project the student's last map to the teacher's, then predict with the reused teacher classifier.

    Paper: Chen et al., "Knowledge Distillation with the Reused Teacher Classifier", CVPR 2022. The larger of the
    two maps is average-pooled to the other's spatial size; the projector P is a bottleneck 1×1 conv → BN → ReLU →
    3×3 conv → BN → ReLU → 1×1 conv → BN → ReLU through C_t/factor channels (factor 2); loss
    mean (P(F_s) − F_t)². After training the model is student → P → average pool → the teacher's classifier
    (:meth:`inference_model`, one module for evaluation and export). The authors' CIFAR-100 and ImageNet runs use
    this loss alone (loss weight 1, label and KD weights 0), on the maps before the final pooling.
    """

    paper = "Chen et al. CVPR 2022, arXiv:2203.14001"
    default_weight = 1.0
    label_weight = 0.0
    pair_kinds = ("map",)

    class Params(Hyperparameters):
        factor: PositiveInt = 2
        head: str | None = Field(None, description=HEAD_HELP)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.projector: nn.Sequential | None = None
        self.pool_to: tuple[int, int] | None = None  # the teacher's spatial size, where the student's is larger

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        student, teacher = student_features[0], teacher_features[0]
        if student.dim() != 4 or teacher.dim() != 4:
            raise ValueError(
                f"simkd: it projects B×C×H×W maps, got student {tuple(student.shape)} and teacher "
                f"{tuple(teacher.shape)}: tap the last convolutional stage of both models"
            )
        s, t = student.shape[1], teacher.shape[1]
        mid = max(1, t // self.hparams.factor)
        self.projector = nn.Sequential(
            nn.Conv2d(s, mid, 1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, mid, 3, padding=1, bias=False),
            nn.BatchNorm2d(mid),
            nn.ReLU(),
            nn.Conv2d(mid, t, 1, bias=False),
            nn.BatchNorm2d(t),
            nn.ReLU(),
        )
        if math.prod(student.shape[2:]) > math.prod(teacher.shape[2:]):
            self.pool_to = (teacher.shape[2], teacher.shape[3])
        self._remember_width(teacher_features)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("simkd", self.projector is not None)
        student, teacher = inputs.student_features[0], inputs.teacher_features[0]
        check_channels("simkd", [student], [self.projector[0].in_channels], "student")
        check_channels("simkd", [teacher], [self.projector[-3].out_channels], "teacher")
        student, teacher = _shrink(student, teacher.shape[-2:]), _shrink(teacher, student.shape[-2:])
        loss = Fn.simkd(self.projector(student), teacher.detach(), sample_weight=inputs.weights.get("sample"))
        return {"simkd": loss}

    def inference_model(
        self, student: nn.Module, teacher: nn.Module | None, pairs: list[tuple[str, str]], adapters: list
    ) -> nn.Module | None:
        check_built("simkd", self.projector is not None)
        return TeacherHeadPredictor(student, pairs[0][0], self.projector, self.classifier, self.pool_to)


@register("srrl")
class SRRL(_HeadMethod):
    """SRRL: feature matching plus "softmax regression" of the student's feature through the teacher's classifier.

    Paper: Yang et al., "Knowledge Distillation via Softmax Regression Representation Learning", ICLR 2021. A
    connector P (1×1 conv → BN → ReLU to the teacher's width, He-normal init) maps the student's last map or
    penultimate vector (a 1×1 map); with pooled features, loss feature_weight·mean (pool P(F_s) − pool F_t)² +
    logit_weight·mean (W·pool P(F_s) + b − z_t)², z_t the teacher's logits, both weights 1 (the authors' ImageNet
    code; SimKD's CIFAR-100 re-implementation adds the same two MSEs with weight 1 to CE and KD). The logit term's
    metric on feature errors is WᵀW. The student keeps its own classifier.
    """

    paper = "Yang et al. ICLR 2021, openreview.net/forum?id=ZzwDy_wiWv"
    default_weight = 1.0
    label_weight = 1.0
    pair_kinds = ("vector", "map")

    class Params(Hyperparameters):
        feature_weight: float = Field(1.0, ge=0.0)
        logit_weight: float = Field(1.0, ge=0.0)
        head: str | None = Field(None, description=HEAD_HELP)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.projector: nn.Sequential | None = None

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        s, t = as_map(student_features[0]).shape[1], as_map(teacher_features[0]).shape[1]
        conv = nn.Conv2d(s, t, 1, bias=False)
        nn.init.normal_(conv.weight, 0.0, math.sqrt(2.0 / t))  # the authors' He init: fan-out of a 1×1 conv
        self.projector = nn.Sequential(conv, nn.BatchNorm2d(t), nn.ReLU())
        self._remember_width(teacher_features)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("srrl", self.projector is not None)
        student = as_map(inputs.student_features[0])
        check_channels("srrl", [student], [self.projector[0].in_channels], "student")
        if inputs.teacher_logits is None:
            raise ValueError("srrl: regresses onto the teacher's logits, but none were given")
        classifier = self.classifier
        loss = Fn.srrl(
            pooled(self.projector(student)),
            pooled(inputs.teacher_features[0]).detach(),
            inputs.teacher_logits.detach(),
            classifier.weight,
            classifier.bias,
            feature_weight=self.hparams.feature_weight,
            logit_weight=self.hparams.logit_weight,
            sample_weight=inputs.weights.get("sample"),
        )
        return {"srrl": loss}


def _random_rotations(count: int, size: int, seed: int) -> Tensor:
    """``count`` random S×S orthonormal matrices (QR of Gaussian matrices, signs fixed by R's diagonal: Haar)."""
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(count, size, size, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]


def lelp_directions(
    count: Tensor, total: Tensor, second: Tensor, projector: Tensor, rotations: Tensor
) -> tuple[Tensor, Tensor]:
    """LELP's pseudo-subclass directions from per-class sums of teacher embeddings.

    For class c with n_c embeddings, sum s_c and sum of outer products M_c: centre μ_c = s_c/n_c, covariance
    Σ_c = M_c/n_c − μ_cμ_cᵀ, projected P Σ_c P onto the null space of the teacher's classifier (P = I − W⁺W, or I);
    its top S eigenvectors U_c (sign: largest entry positive), rotated by the class's random orthonormal R_c (S×S,
    so that the S directions share the variance) and divided by √(mean of the S eigenvalues), so the scores
    ⟨v, h − μ_c⟩ have mean variance 1. Classes with fewer than 2 embeddings get zero directions (an even split).
    Returns directions C×S×D and centres C×D.
    """
    subclasses = rotations.shape[-1]
    n = count.clamp_min(1.0)[:, None]
    mean = total / n
    covariance = second / n[:, :, None] - mean[:, :, None] * mean[:, None, :]
    covariance = projector @ covariance @ projector
    values, vectors = torch.linalg.eigh((covariance + covariance.transpose(1, 2)) / 2)
    values, vectors = values[:, -subclasses:].flip(-1).clamp_min(0.0), vectors[:, :, -subclasses:].flip(-1)
    largest = vectors.abs().argmax(1, keepdim=True)
    vectors = vectors * torch.sign(vectors.gather(1, largest))
    rotated = (vectors @ rotations.transpose(1, 2)).transpose(1, 2)  # row j = Σ_k R_jk u_k
    scale = values.mean(-1).sqrt()
    usable = (count >= 2) & (scale > 0)
    directions = rotated / torch.where(usable, scale, 1.0)[:, None, None]
    return torch.where(usable[:, None, None], directions, 0.0), mean


class _SubclassReadout(nn.Module):
    """Class logits from C·S subclass logits: log Σ_j exp(u_{c,j}), so softmax gives Σ_j P(c, j)."""

    def __init__(self, head: nn.Linear, classes: int, subclasses: int) -> None:
        super().__init__()
        self.head, self.classes, self.subclasses = head, classes, subclasses

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x).unflatten(-1, (self.classes, self.subclasses)).logsumexp(-1)


@register("lelp")
class LELP(_HeadMethod):
    """Few-class KD: PCA directions of the teacher's embedding split each class into S learned pseudo-subclasses.

    S=5, τ=β=1, loss weight 1, label weight 0; the student learns the C·S subclasses through a head of its own.

    Paper: Loo, Iliopoulos, Hu, Vee, "Linear Projections of Teacher Embeddings for Few-Class Distillation"
    (arXiv:2409.20449, 2024). The pair is (student's penultimate feature, the teacher's classifier input ``head:in``
    or the map it pools). Per class (the teacher's predicted class) the teacher embeddings are projected onto the
    null space of the teacher's classifier W (what the logits already say is left out; ``null_space``), their top S
    principal directions are mixed by a fixed random rotation (equal variance per direction) and scaled to unit mean
    variance (see :func:`lelp_directions`); the teacher's subclass distribution is
    P_t(c, j) = softmax(z_t/τ)_c · softmax_j(⟨v_{c,j}, h_t − μ_c⟩/β), and the student's linear head on its
    feature (C·S outputs, this method's own) learns it by τ²·KL (:func:`fisherkd.functional.lelp`). After training
    the student predicts through that head, P_s(c) = Σ_j P_s(c, j) (``predict_with_subclass_head``), and the label
    loss is off, as in the paper's runs (α = 0).

    Where the paper computes the PCA once over the training set before distilling, here the per-class sums of the
    teacher embeddings accumulate over the training batches (float64, C·D² numbers, summed over DDP ranks) and the
    directions are recomputed after every optimizer step (C eigendecompositions of D×D: cheap for few classes, and
    a device sync on a GPU), so from the first epoch's end they are the PCA of the training data the teacher saw;
    the first step's targets split each class evenly. The form of P_t (class probability times a within-class
    softmax of the projections), the unit-variance scaling and the defaults S=5, τ=β=1 are this library's reading
    of the paper (whose code and appendix were not available to us); the paper tunes S and β per task.
    """

    paper = "Loo et al. 2024, arXiv:2409.20449"
    default_weight = 1.0
    label_weight = 0.0
    pair_kinds = ("vector", "map")

    class Params(Hyperparameters):
        subclasses: PositiveInt = 5
        temperature: PositiveFloat = 1.0
        subclass_temperature: PositiveFloat = 1.0
        null_space: bool = True
        seed: int = 0
        head: str | None = Field(None, description=HEAD_HELP)
        predict_with_subclass_head: bool = True

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.subclass_head: nn.Linear | None = None
        self._student_feature: tuple[int, torch.device] | None = None

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        feature = pooled(student_features[0])
        self._student_feature = (feature.shape[1], feature.device)
        self._remember_width(teacher_features)

    def _find_classifier(self) -> None:
        super()._find_classifier()
        if self._head and self._student_feature is not None and self.subclass_head is None:
            self._build(self._head[0])

    def _build(self, classifier: nn.Linear) -> None:
        width, device = self._student_feature
        h = self.hparams
        weight = classifier.weight.detach().to(device=device, dtype=torch.float64)
        classes, dim = weight.shape
        eye = torch.eye(dim, dtype=torch.float64, device=device)
        projector = eye - torch.linalg.pinv(weight) @ weight if h.null_space else eye
        free = int(torch.linalg.matrix_rank(projector))
        if free < h.subclasses:
            raise ValueError(
                f"lelp: the teacher's {dim}-dim embedding leaves {free} directions outside its classifier's rows, "
                f"fewer than subclasses={h.subclasses}: lower subclasses or set null_space=False"
            )
        self.register_buffer("projector", projector)
        self.register_buffer("rotations", _random_rotations(classes, h.subclasses, h.seed).to(device))
        self.register_buffer("count", torch.zeros(classes, dtype=torch.float64, device=device))
        self.register_buffer("total", torch.zeros(classes, dim, dtype=torch.float64, device=device))
        self.register_buffer("second", torch.zeros(classes, dim, dim, dtype=torch.float64, device=device))
        self.register_buffer("directions", torch.zeros(classes, h.subclasses, dim, device=device))
        self.register_buffer("centers", torch.zeros(classes, dim, device=device))
        self.subclass_head = nn.Linear(width, classes * h.subclasses).to(device)

    @torch.no_grad()
    def _accumulate(self, embedding: Tensor, teacher_logits: Tensor) -> None:
        h = embedding.to(torch.float64)
        member = F.one_hot(teacher_logits.argmax(-1), self.count.shape[0]).to(h.dtype)  # the teacher's class
        # summed over DDP ranks, so every replica holds the statistics of the global batch
        self.count += all_reduce_sum(member.sum(0))
        self.total += all_reduce_sum(member.T @ h)
        self.second += all_reduce_sum(torch.einsum("bcd,be->cde", member[:, :, None] * h[:, None, :], h))

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if self.subclass_head is not None:
            directions, centers = lelp_directions(self.count, self.total, self.second, self.projector, self.rotations)
            self.directions.copy_(directions)
            self.centers.copy_(centers)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("lelp", self.subclass_head is not None)
        if inputs.teacher_logits is None:
            raise ValueError("lelp: reads the teacher's class probabilities, but no teacher logits were given")
        teacher = pooled(inputs.teacher_features[0]).detach()
        if teacher.shape[1] != self.projector.shape[0]:
            raise ValueError(
                f"lelp: the teacher feature has {teacher.shape[1]} dims, but the method was built for "
                f"{self.projector.shape[0]}: feed the same layer as the example batch"
            )
        if self.training:
            self._accumulate(teacher, inputs.teacher_logits.detach())
        student = pooled(inputs.student_features[0])
        h = self.hparams
        loss = Fn.lelp(
            self.subclass_head(student.to(self.subclass_head.weight.dtype)),
            inputs.teacher_logits.detach(),
            teacher,
            self.directions,
            self.centers,
            h.temperature,
            h.subclass_temperature,
            sample_weight=inputs.weights.get("sample"),
        )
        return {"lelp": loss}

    def inference_model(
        self, student: nn.Module, teacher: nn.Module | None, pairs: list[tuple[str, str]], adapters: list
    ) -> nn.Module | None:
        if not self.hparams.predict_with_subclass_head:
            return None
        check_built("lelp", self.subclass_head is not None)
        readout = _SubclassReadout(self.subclass_head, self.count.shape[0], self.hparams.subclasses)
        return TeacherHeadPredictor(student, pairs[0][0], nn.Identity(), readout)
