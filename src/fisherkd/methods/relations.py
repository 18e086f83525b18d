"""Relation-based methods: the student matches relations among the samples (or tokens) of a batch.

Student and teacher features may differ in size, so these methods use no adapter. CC and CRD own linear embedding
heads, built in ``setup`` from the flattened feature sizes of the Distiller's example batch (so they exist before the
optimizer is built).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, PositiveInt
from torch import Tensor, nn

from fisherkd import functional as Fn
from fisherkd.engine.distributed import all_gather_batch, all_reduce_sum, rank, world_size
from fisherkd.methods.base import Hyperparameters, Method, MethodInputs, register
from fisherkd.methods.features import check_built, sum_over_pairs


@register("rkd")
class RKD(Method):
    """Relational KD: match normalised pairwise distances and triplet angles of the batch.

    Paper: Park et al., "Relational Knowledge Distillation", CVPR 2019. Loss Σ_pairs 25·Huber(ψ_D) + 50·Huber(ψ_A)
    (see :func:`fisherkd.functional.rkd`); the 25/50 are hyper-parameters, so the loss weight is 1.
    """

    family = "relation"
    paper = "Park et al. CVPR 2019, arXiv:1904.05068"
    default_weight = 1.0
    min_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(Hyperparameters):
        distance_weight: float = 25.0
        angle_weight: float = 50.0

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        h = self.hparams
        return {"rkd": sum_over_pairs(inputs, lambda s, t: Fn.rkd(s, t, h.distance_weight, h.angle_weight))}


@register("pkt")
class PKT(Method):
    """Probabilistic knowledge transfer: KL between cosine-kernel conditional probabilities of the batch.

    Paper: Passalis & Tefas, "Learning Deep Representations with Probabilistic Knowledge Transfer", ECCV 2018.
    Loss Σ_pairs mean_ij P_t,ij·log((P_t,ij + ε)/(P_s,ij + ε)); weight 30000 (RepDistiller).
    """

    weight_axes = ("sample",)
    family = "relation"
    paper = "Passalis & Tefas ECCV 2018, arXiv:1803.10837"
    default_weight = 30000.0
    min_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(Hyperparameters):
        eps: float = 1e-7

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        sample = inputs.weights.get("sample")
        return {"pkt": sum_over_pairs(inputs, lambda s, t: Fn.pkt(s, t, self.hparams.eps, sample_weight=sample))}


@register("sp")
class SP(Method):
    """Similarity-preserving KD: match the row-normalised batch Gram matrices.

    Paper: Tung & Mori, "Similarity-Preserving Knowledge Distillation", ICCV 2019. Loss Σ_pairs
    ‖N(F_s F_sᵀ) − N(F_t F_tᵀ)‖²_F / B²; weight 3000 (RepDistiller).
    """

    family = "relation"
    paper = "Tung & Mori ICCV 2019, arXiv:1907.09682"
    default_weight = 3000.0
    min_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(Hyperparameters):
        pass

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"sp": sum_over_pairs(inputs, Fn.sp)}


@register("cka")
class CKA(Method):
    """Linear-CKA distillation: 1 − CKA between flattened student and teacher features (not √CKA).

    CKA: Kornblith et al., "Similarity of Neural Network Representations Revisited", ICML 2019. Loss Σ_pairs
    1 − ‖YᵀX‖²_F/(‖XᵀX‖_F‖YᵀY‖_F) on batch-centred X, Y; weight 1.
    """

    family = "relation"
    paper = "Kornblith et al. ICML 2019, arXiv:1905.00414"
    default_weight = 1.0
    min_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(Hyperparameters):
        pass

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        return {"cka": sum_over_pairs(inputs, Fn.cka)}


@register("relation")
class Relation(Method):
    """Token relation distillation (LLaVA-KD's RDist): match per-sample cosine self-similarity matrices of tokens.

    Paper: Cai et al., "LLaVA-KD: A Framework of Distilling Multimodal Large Language Models", ICCV 2025,
    arXiv:2410.16236. Loss Σ_pairs mean_b [1 − cos(vec S_s,b, vec S_t,b)], S = F̂F̂ᵀ over the T tokens of a sample
    (B×T×D, or B×C×H×W as H·W tokens of C dims); ``inputs.mask`` (B×T, 1 = valid) drops padding tokens unless
    ``use_mask`` is false (e.g. when the mask belongs to other tokens than the tapped ones). Weight 1.
    """

    weight_axes = ("sample",)
    family = "relation"
    paper = "Cai et al. ICCV 2025, arXiv:2410.16236"
    default_weight = 1.0
    min_pairs = 1
    pair_kinds = ("token", "map")

    class Params(Hyperparameters):
        use_mask: bool = True

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        mask = inputs.mask if self.hparams.use_mask else None
        sample = inputs.weights.get("sample")
        return {"relation": sum_over_pairs(inputs, lambda s, t: Fn.relation(s, t, mask=mask, sample_weight=sample))}


class EmbeddingParams(Hyperparameters):
    """The embedding size of CC's and CRD's linear heads (128, RepDistiller)."""

    embed_dim: PositiveInt = 128


def _single_pair(name: str, student_features: list[Tensor], teacher_features: list[Tensor]) -> tuple[Tensor, Tensor]:
    if len(student_features) != 1:
        raise ValueError(f"{name}: takes exactly one layer pair, got {len(student_features)}")
    return student_features[0], teacher_features[0]


class EmbeddingMethod(Method):
    """A relation method on one layer pair whose student and teacher features pass through their own linear heads
    to L2-normalised ``embed_dim`` vectors; the heads are built in ``setup`` from the flattened feature sizes."""

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        s, t = _single_pair(self.name, student_features, teacher_features)
        self.embed_student = nn.Linear(s[0].numel(), self.hparams.embed_dim)
        self.embed_teacher = nn.Linear(t[0].numel(), self.hparams.embed_dim)

    def embed(self, inputs: MethodInputs) -> tuple[Tensor, Tensor]:
        """The normalised student and teacher embeddings of the batch."""
        check_built(self.name, self.embed_student is not None)
        s, t = _single_pair(self.name, inputs.student_features, inputs.teacher_features)
        return self._embed(self.embed_student, s, "student"), self._embed(self.embed_teacher, t, "teacher")

    def _embed(self, head: nn.Linear, feature: Tensor, side: str) -> Tensor:
        flat = feature.flatten(1)
        if flat.shape[1] != head.in_features:
            raise ValueError(
                f"{self.name}: the {side} feature {tuple(feature.shape)} flattens to {flat.shape[1]} values, but its "
                f"head was built for {head.in_features}: feed the same layer as the example batch"
            )
        return F.normalize(head(flat.to(head.weight.dtype)), dim=1)


@register("cc")
class CC(EmbeddingMethod):
    """Correlation congruence: match Taylor-expanded Gaussian-kernel correlations of the batch's embeddings.

    Paper: Peng et al., "Correlation Congruence for Knowledge Distillation", ICCV 2019. Student and teacher features
    pass through their own trainable linear embedding (to 128 dims, L2-normalised, as RepDistiller); loss
    ‖K_s − K_t‖²_F/B² with the P = 2 order expansion of exp(−γ‖x̂_i − x̂_j‖²), γ = 0.4; weight 0.02 (RepDistiller).
    """

    family = "relation"
    paper = "Peng et al. ICCV 2019, arXiv:1904.01802"
    default_weight = 0.02
    min_pairs = max_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(EmbeddingParams):
        gamma: float = 0.4
        order: int = Field(2, ge=0)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        e_s, e_t = self.embed(inputs)
        return {"cc": Fn.cc(e_s, e_t, self.hparams.gamma, self.hparams.order)}


@register("crd")
class CRD(EmbeddingMethod):
    """Contrastive representation distillation with a memory bank (or a bounded queue) of past embeddings.

    Paper: Tian et al., "Contrastive Representation Distillation", ICLR 2020. Linear heads embed student and teacher
    features to 128-d unit vectors; the student embedding is contrasted against the teacher's memory and the
    teacher embedding against the student's memory, each with the NCE loss of :func:`fisherkd.functional.crd_nce`
    (K = 16384 negatives, τ = 0.07); loss = sum of both; weight 0.8 (RepDistiller).

    Bank mode (``queue_size`` = 0, the paper's): one memory row per dataset index, so the distiller must be called
    with ``index=`` (dataset indices); positives are the stored rows at those indices, negatives K rows drawn
    uniformly (RepDistiller's sampler without class information), and rows at the batch's indices move to
    normalise(m·row + (1 − m)·embedding), m = 0.5. Queue mode (``queue_size`` > 0), for datasets too large for a
    bank: positives are the other model's current (detached) embeddings, negatives every entry of a FIFO queue of
    past embeddings (K = ``queue_size``; ``nce_k`` is unused); ``num_data`` still sets the noise prior 1/N.
    The normaliser Z is estimated on the first batch and then fixed, as by the authors. Memory is updated only in
    training mode.

    Under DDP every rank gathers the batch's indices and embeddings from all ranks and writes every rank's rows, so
    all replicas of the memory stay equal to the memory of a one-process run with the same global batch (DDP's
    broadcast of rank 0's buffers before each forward then changes nothing). For the same reason the negatives are
    drawn for the global batch (each rank keeps its samples' rows) and the first batch's Z is averaged over ranks.
    """

    weight_axes = ("sample",)
    family = "relation"
    paper = "Tian et al. ICLR 2020, arXiv:1910.10699"
    default_weight = 0.8
    min_pairs = max_pairs = 1
    pair_kinds = ("vector", "map", "token")

    class Params(EmbeddingParams):
        num_data: PositiveInt = Field(description="training-set size: one memory-bank row per dataset index")
        nce_k: PositiveInt = 16384
        temperature: float = Field(0.07, gt=0)
        momentum: float = Field(0.5, ge=0, le=1)
        queue_size: int = Field(0, ge=0)

    def __init__(self, **hparams) -> None:
        super().__init__(**hparams)
        self.register_buffer("queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("normalizers", torch.full((2,), -1.0))  # Z for the student and teacher anchors
        self._normalizers_checked = False  # whether this module has looked at its buffer since it was made or loaded

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        super().setup(student_features, teacher_features)
        # the memory is drawn after the heads, in RepDistiller's order, so a seed gives the authors' initialisation
        h = self.hparams
        rows = h.queue_size if h.queue_size > 0 else h.num_data
        bound = 1.0 / (h.embed_dim / 3) ** 0.5  # the authors' initialisation: rows of about unit norm
        self.register_buffer("student_memory", torch.rand(rows, h.embed_dim) * 2 * bound - bound)
        self.register_buffer("teacher_memory", torch.rand(rows, h.embed_dim) * 2 * bound - bound)

    @property
    def mode(self) -> Literal["bank", "queue"]:
        return "queue" if self.hparams.queue_size > 0 else "bank"

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        h = self.hparams
        e_s, e_t = self.embed(inputs)
        if self.mode == "bank":
            index = self._check_index(inputs.index, e_s.shape[0])
            # drawn for the global batch, each rank keeping its samples' rows: N processes draw what one process would
            world = world_size()
            negatives = torch.randint(h.num_data, (e_s.shape[0] * world, h.nce_k), device=index.device)[rank()::world]
            pos_t, neg_t = self.teacher_memory[index], self.teacher_memory[negatives]
            pos_s, neg_s = self.student_memory[index], self.student_memory[negatives]
        else:
            # copies: backward still needs these negatives after the queue is overwritten in place below
            pos_t, neg_t = e_t.detach(), self.teacher_memory.clone()
            pos_s, neg_s = e_s.detach(), self.student_memory.clone()
        if not self._normalizers_checked:  # one host read, not one per step (a captured step may have none)
            if self.normalizers[0] < 0:  # first batch: estimate Z once and keep it
                z_s = Fn.crd_normalizer(e_s, pos_t, neg_t, num_data=h.num_data, temperature=h.temperature)
                z_t = Fn.crd_normalizer(e_t, pos_s, neg_s, num_data=h.num_data, temperature=h.temperature)
                # each is a mean over this rank's samples (equal numbers on every rank): average them over ranks
                self.normalizers.copy_(all_reduce_sum(torch.stack([z_s, z_t])) / world_size())
            self._normalizers_checked = True
        common = {"num_data": h.num_data, "temperature": h.temperature, "sample_weight": inputs.weights.get("sample")}
        loss = Fn.crd_nce(e_s, pos_t, neg_t, normalizer=self.normalizers[0], **common) + Fn.crd_nce(
            e_t, pos_s, neg_s, normalizer=self.normalizers[1], **common
        )
        if self.training:
            self._update_memory(e_s.detach(), e_t.detach(), inputs.index)
        return {"crd": loss}

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._normalizers_checked = False  # a checkpoint taken before the first batch holds no Z yet

    def _check_index(self, index: Tensor | None, batch: int) -> Tensor:
        if index is None:
            raise ValueError(
                "crd: the memory bank needs dataset indices: call the distiller with index=<indices of the batch "
                "samples>, or set queue_size > 0 for a queue that needs none"
            )
        if index.shape != (batch,):
            raise ValueError(f"crd: index of shape {tuple(index.shape)} does not fit a batch of {batch}")
        return index.to(self.student_memory.device, torch.long)

    @torch.no_grad()
    def _update_memory(self, e_s: Tensor, e_t: Tensor, index: Tensor | None) -> None:
        # every rank writes the rows of the whole global batch (a no-op gather in one process)
        if self.mode == "bank":
            index = all_gather_batch(self._check_index(index, e_s.shape[0]))
        e_s = all_gather_batch(e_s.to(self.student_memory.dtype))
        e_t = all_gather_batch(e_t.to(self.teacher_memory.dtype))
        if self.mode == "bank":
            m = self.hparams.momentum
            for memory, embedding in ((self.student_memory, e_s), (self.teacher_memory, e_t)):
                memory[index] = F.normalize(m * memory[index] + (1 - m) * embedding.to(memory.dtype), dim=1)
            return
        size = self.hparams.queue_size
        e_s, e_t = e_s[-size:], e_t[-size:]  # a batch larger than the queue keeps its last rows
        rows = (self.queue_pointer + torch.arange(e_s.shape[0], device=e_s.device)) % size
        self.student_memory[rows] = e_s.to(self.student_memory.dtype)
        self.teacher_memory[rows] = e_t.to(self.teacher_memory.dtype)
        self.queue_pointer.copy_((self.queue_pointer + e_s.shape[0]) % size)


class _MICritic(nn.Module):
    """A separable critic f(x, y) = ⟨g(x), h(y)⟩ (two-layer MLPs on the flattened features) and a baseline log q(y)."""

    def __init__(self, student_dim: int, teacher_dim: int, hidden_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.student = nn.Sequential(nn.Linear(student_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim))
        self.teacher = nn.Sequential(nn.Linear(teacher_dim, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, embed_dim))
        self.baseline = nn.Linear(teacher_dim, 1)

    def forward(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        """Scores S_ij = f(x_i, y_j) (N×N) and baselines log q(y_j) (N)."""
        for side, x, first in (("student", student, self.student[0]), ("teacher", teacher, self.teacher[0])):
            if x[0].numel() != first.in_features:
                raise ValueError(
                    f"mi_alpha: the {side} feature {tuple(x.shape)} flattens to {x[0].numel()} values, but its critic "
                    f"was built for {first.in_features}: feed the same layers as the example batch"
                )
        dtype = self.baseline.weight.dtype
        x, y = student.flatten(1).to(dtype), teacher.flatten(1).to(dtype)
        return self.student(x) @ self.teacher(y).T, self.baseline(y).squeeze(-1)


@register("mi_alpha")
class MIAlpha(Method):
    """Mutual-information distillation of intermediate representations: maximise the interpolated bound I_α. α=0.5.

    Paper: He et al., "Distiller: A Systematic Study of Model Distillation Methods in Natural Language Processing",
    SustaiNLP 2021; the bound is Poole et al.'s I_α (ICML 2019). Per layer pair, learned critics score every
    student sample against every teacher sample of the batch (the batch's own pairs are the joint samples, the
    others the product of marginals) and the loss is −I_α (:func:`fisherkd.functional.mi_alpha`), averaged over the
    pairs; α = 1 is InfoNCE, α = 0 the TUBA bound with a learned baseline. The critic here is separable,
    f(x, y) = ⟨g(x), h(y)⟩ with two-layer MLPs g, h (hidden 256, output 128) on the flattened features, and
    log q(y) a linear map of the teacher feature; the authors learn f and q with a Transformer encoder over the
    token states (their Table 4: better than an MLP). Student and teacher widths may differ (no adapter); token
    features are flattened whole, as CRD's, so keep their length fixed. Negatives are the batch (per DDP rank).
    α and the loss weight were searched per task in the paper; α = 0.5 and weight 1 are this library's defaults.
    """

    family = "relation"
    paper = "He et al. SustaiNLP 2021, arXiv:2109.11105"
    default_weight = 1.0
    weight_axes = ("sample",)
    min_pairs = 1
    pair_kinds = ("map", "vector", "token")

    class Params(Hyperparameters):
        alpha: float = Field(0.5, ge=0.0, le=1.0)
        hidden_dim: PositiveInt = 256
        embed_dim: PositiveInt = 128

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        self.critics = nn.ModuleList()

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        h = self.hparams
        for s, t in zip(student_features, teacher_features):
            self.critics.append(_MICritic(s[0].numel(), t[0].numel(), h.hidden_dim, h.embed_dim))

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:
        check_built("mi_alpha", len(self.critics) > 0)
        if len(inputs.student_features) != len(self.critics):
            raise ValueError(
                f"mi_alpha: got {len(inputs.student_features)} layer pairs, but its critics were built for "
                f"{len(self.critics)}: feed the same pairs as the example batch"
            )
        sample = inputs.weights.get("sample")
        terms = []
        for critic, s, t in zip(self.critics, inputs.student_features, inputs.teacher_features):
            scores, log_baseline = critic(s, t.detach())
            terms.append(Fn.mi_alpha(scores, log_baseline, self.hparams.alpha, sample_weight=sample))
        return {"mi_alpha": torch.stack(terms).mean()}
