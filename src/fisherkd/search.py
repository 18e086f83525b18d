"""Training-free student search (DisWOT): rank candidate students for a teacher at random initialisation.

Dong, Li & Wei, "DisWOT: Student Architecture Search for Distillation WithOut Training", CVPR 2023. A student
whose randomly initialised network already relates classes and samples the way the teacher does tends to
distil better; DisWOT scores candidates by two distances between teacher and student, both on one batch,
with no training:

- semantic: the class-activation matrix of a network with penultimate features ``f`` (B×D), logits ``z``
  and labels ``y`` is the gradient of cross-entropy w.r.t. its linear head's weight (the "Grad-CAM of the fc
  layer" in the authors' code), ``A = (softmax(z) − onehot(y))ᵀ f / B`` (C×D); its class Gram matrix is
  ``G = A Aᵀ`` (C×C), and ``M_s = d(G_t, G_s)``;
- relation: the sample Gram matrix of the last stage's activation (before global pooling), flattened per
  sample, ``R = F Fᵀ`` (B×B), and ``M_r = d(R_t, R_s)``;

with ``d(G, H) = (1/n²) Σ_ij (Ĝ_ij − Ĥ_ij)²`` where ``Ĝ`` is ``G`` with every row scaled to unit L2 norm (as
the authors' ``F.normalize``). Score = ``−(M_s + M_r)``: higher is better. Gram matrices are indexed by
classes and samples, so teacher and student may have any widths. (The authors' README forms a channel×channel
matrix per class, which needs equal widths; the class×class Gram is our reading of the paper's inner-product
matrix of the activation maps that compares networks of different widths.)

Candidates come from search spaces over the zoo (MLP depth and widths, cnn1d channels, CIFAR-ResNet blocks per
stage and inner widths), every one buildable by :func:`fisherkd.models.create_model`; the search is an
evolution (mutate one gene of a top-half parent, keep the best ``population``), seeded, within an optional
parameter budget.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fisherkd.errors import UserError
from fisherkd.models import create_model

# ----------------------------------------------------------------------------------------------------------------
# The score: pure functions of tensors
# ----------------------------------------------------------------------------------------------------------------


def gram(x: Tensor) -> Tensor:
    """``X Xᵀ`` of ``x`` flattened to one row per leading index: (n, ...) -> (n, n)."""
    x = x.flatten(1).float()
    return x @ x.T


def gram_distance(a: Tensor, b: Tensor) -> Tensor:
    """``d(G, H) = (1/n²) Σ_ij (Ĝ_ij − Ĥ_ij)²`` with ``Ĝ``, ``Ĥ`` the n×n matrices ``a`` and ``b`` with every row
    scaled to unit L2 norm (a zero row stays zero)."""
    if a.shape != b.shape or a.dim() != 2 or a.shape[0] != a.shape[1]:
        shapes = f"{tuple(a.shape)} and {tuple(b.shape)}"
        raise ValueError(f"gram_distance needs two n×n matrices of one shape, got {shapes}")
    n = a.shape[0]
    return ((F.normalize(a, dim=1) - F.normalize(b, dim=1)) ** 2).sum() / (n * n)


def class_activation(features: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
    """The gradient of the batch-mean cross-entropy w.r.t. a linear head's weight, ``(softmax(z) − onehot(y))ᵀ f / B``
    (C×D): for each class, how the penultimate channels move its logit (the Grad-CAM of the head)."""
    residual = logits.float().softmax(-1) - F.one_hot(labels, logits.shape[-1]).float()
    return residual.T @ features.flatten(1).float() / len(labels)


def semantic_distance(
    t_features: Tensor, t_logits: Tensor, s_features: Tensor, s_logits: Tensor, labels: Tensor
) -> Tensor:
    """DisWOT's semantic distance ``M_s = d(A_t A_tᵀ, A_s A_sᵀ)`` of the class-activation matrices (C×C Grams)."""
    return gram_distance(gram(class_activation(t_features, t_logits, labels)),
                         gram(class_activation(s_features, s_logits, labels)))


def relation_distance(t_map: Tensor, s_map: Tensor) -> Tensor:
    """DisWOT's relation distance ``M_r = d(F_t F_tᵀ, F_s F_sᵀ)`` of the per-sample flattened activations (B×B)."""
    return gram_distance(gram(t_map), gram(s_map))


def diswot_score(semantic: float, relation: float) -> float:
    """``−(M_s + M_r)``: the higher, the closer the student's class and sample relations are to the teacher's."""
    return -(semantic + relation)


# ----------------------------------------------------------------------------------------------------------------
# Reading a model: last-stage map, penultimate features, logits
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Readout:
    """What the score needs from one forward pass."""

    logits: Tensor
    features: Tensor  # the input of the linear head (B, D)
    stage_map: Tensor  # the last stage's output, before pooling (B, ...)


def check_searchable(model: nn.Module, role: str) -> None:
    """Refuse a model the score cannot read: it needs a linear ``head`` (zoo models have one)."""
    if not isinstance(getattr(model, "head", None), nn.Linear):
        raise UserError(
            f"the {role} ({type(model).__name__}) has no linear `head` module: DisWOT reads the head's input and "
            "gradient; use a zoo model (fisherkd.models.available_models()) as one teacher model, not an ensemble"
        )


def readout(model: nn.Module, x: Tensor) -> Readout:
    """One forward pass of ``model`` with hooks on its last stage (``model.stages[-1]``, else the head's input)
    and on its head's input."""
    check_searchable(model, "model")
    seen: dict[str, Tensor] = {}
    modules = dict(model.named_modules())
    stages = getattr(model, "stages", ())
    stage = modules.get(stages[-1]) if stages else None
    # clone: an in-place ReLU after the hook must not change what was captured
    handles = [model.head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("features", args[0].clone()))]
    if stage is not None:
        handles.append(stage.register_forward_hook(lambda _m, _a, out: seen.__setitem__("map", out.clone())))
    try:
        logits = model(x)
    finally:
        for handle in handles:
            handle.remove()
    return Readout(logits, seen["features"], seen.get("map", seen["features"]))


# ----------------------------------------------------------------------------------------------------------------
# Search spaces over the zoo
# ----------------------------------------------------------------------------------------------------------------

Genome = tuple[int, ...]


def _step(index: int, size: int, rng: random.Random) -> int:
    """A neighbouring index (±1) within ``range(size)``; the only one at an edge."""
    moves = [i for i in (index - 1, index + 1) if 0 <= i < size]
    return rng.choice(moves) if moves else index


class Space:
    """One family of candidates. A genome is a tuple of ints; ``build`` gives ``(zoo name, kwargs)``."""

    family: str

    @property
    def zoo_name(self) -> str:
        """The zoo name every candidate of the space is built by."""
        return self.family

    def sample(self, rng: random.Random) -> Genome:
        raise NotImplementedError

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        raise NotImplementedError

    def build(self, genome: Genome) -> tuple[str, dict[str, Any]]:
        raise NotImplementedError

    def spec(self) -> dict[str, Any]:
        raise NotImplementedError

    def fit(self, input_shape: tuple[int, ...], in_channels: int) -> dict[str, Any]:
        """Constructor arguments that make the family take inputs of ``input_shape`` (none by default)."""
        return {}


def _choices(name: str, values: Sequence[Any], kind: type, low: float) -> tuple[Any, ...]:
    values = tuple(values)
    if not values or any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < low for v in values):
        raise UserError(f"search space: {name} must be a non-empty list of numbers >= {low}, got {list(values)}")
    if kind is int and any(int(v) != v for v in values):
        raise UserError(f"search space: {name} must be whole numbers, got {list(values)}")
    return tuple(sorted({kind(v) for v in values}))


@dataclass
class MLPSpace(Space):
    """MLPs (zoo ``mlp``): ``depth`` hidden layers, each of a width in ``widths``. Genome: one width index per
    layer. Mutation: one layer's width to a neighbouring choice, or a layer added (a copy) or removed."""

    depths: Sequence[int] = (1, 2, 3, 4)
    widths: Sequence[int] = (16, 32, 64, 128, 256)
    family: str = field(default="mlp", init=False)

    def __post_init__(self) -> None:
        self.depths = _choices("mlp depths", self.depths, int, 1)
        self.widths = _choices("mlp widths", self.widths, int, 1)

    def sample(self, rng: random.Random) -> Genome:
        return tuple(rng.randrange(len(self.widths)) for _ in range(rng.choice(self.depths)))

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        ops = ["width"]
        if len(genome) + 1 <= max(self.depths):
            ops.append("add")
        if len(genome) - 1 >= min(self.depths):
            ops.append("remove")
        op, i = rng.choice(ops), rng.randrange(len(genome))
        if op == "width":
            return genome[:i] + (_step(genome[i], len(self.widths), rng),) + genome[i + 1 :]
        if op == "add":
            return genome[: i + 1] + (genome[i],) + genome[i + 1 :]
        return genome[:i] + genome[i + 1 :]

    def build(self, genome: Genome) -> tuple[str, dict[str, Any]]:
        return "mlp", {"hidden": [self.widths[g] for g in genome]}

    def spec(self) -> dict[str, Any]:
        return {"family": "mlp", "depths": list(self.depths), "widths": list(self.widths)}

    def fit(self, input_shape: tuple[int, ...], in_channels: int) -> dict[str, Any]:
        return {"in_features": math.prod(input_shape) // in_channels}  # the MLP flattens in_channels × in_features


@dataclass
class CNN1DSpace(Space):
    """The MNIST-1D paper's three-layer 1-D CNN (zoo ``cnn1d``) at a channel count from ``channels``."""

    channels: Sequence[int] = (4, 8, 12, 16, 20, 25, 32, 48, 64)
    family: str = field(default="cnn1d", init=False)

    def __post_init__(self) -> None:
        self.channels = _choices("cnn1d channels", self.channels, int, 1)

    def sample(self, rng: random.Random) -> Genome:
        return (rng.randrange(len(self.channels)),)

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        return (_step(genome[0], len(self.channels), rng),)

    def build(self, genome: Genome) -> tuple[str, dict[str, Any]]:
        return "cnn1d", {"channels": self.channels[genome[0]]}

    def spec(self) -> dict[str, Any]:
        return {"family": "cnn1d", "channels": list(self.channels)}

    def fit(self, input_shape: tuple[int, ...], in_channels: int) -> dict[str, Any]:
        return {"length": input_shape[-1]}


@dataclass
class ResNetSpace(Space):
    """CIFAR ResNets (zoo ``base``, e.g. ``resnet8`` for widths 16/32/64 or ``resnet8x4`` for 64/128/256): the
    blocks of each of the three stages from ``blocks`` and each stage's inner width (its blocks' first
    convolution) as a fraction from ``inner`` of the stage width. Genome: three block indices, three fraction
    indices; mutation moves one of them to a neighbouring choice."""

    base: str = "resnet8"
    blocks: Sequence[int] = (1, 2, 3, 4, 5)
    inner: Sequence[float] = (0.25, 0.5, 0.75, 1.0)
    family: str = field(default="resnet", init=False)
    stage_widths: tuple[int, int, int] = field(default=(0, 0, 0), init=False)

    def __post_init__(self) -> None:
        self.blocks = _choices("resnet blocks", self.blocks, int, 1)
        self.inner = _choices("resnet inner", self.inner, float, 0)
        if max(self.inner) > 1 or min(self.inner) <= 0:
            raise UserError(f"search space: resnet inner fractions must lie in (0, 1], got {list(self.inner)}")
        model = create_model(self.base, in_channels=3, num_classes=10)
        if not all(hasattr(model, f"layer{i}") for i in (1, 2, 3)) or not hasattr(model.layer3[0], "conv2"):
            raise UserError(f"search space: resnet base {self.base!r} is not a CIFAR ResNet (resnet8, resnet8x4, ...)")
        self.stage_widths = tuple(getattr(model, f"layer{i}")[0].conv2[0].out_channels for i in (1, 2, 3))

    @property
    def zoo_name(self) -> str:
        return self.base

    def sample(self, rng: random.Random) -> Genome:
        return tuple(rng.randrange(len(self.blocks)) for _ in range(3)) + tuple(
            rng.randrange(len(self.inner)) for _ in range(3)
        )

    def mutate(self, genome: Genome, rng: random.Random) -> Genome:
        i = rng.randrange(6)
        size = len(self.blocks) if i < 3 else len(self.inner)
        return genome[:i] + (_step(genome[i], size, rng),) + genome[i + 1 :]

    def build(self, genome: Genome) -> tuple[str, dict[str, Any]]:
        blocks = [self.blocks[g] for g in genome[:3]]
        inner = [max(1, round(self.inner[g] * w)) for g, w in zip(genome[3:], self.stage_widths)]
        return self.base, {"blocks": blocks, "inner": [inner[s] for s in range(3) for _ in range(blocks[s])]}

    def spec(self) -> dict[str, Any]:
        return {"family": "resnet", "base": self.base, "blocks": list(self.blocks), "inner": list(self.inner)}


SPACES: dict[str, type[Space]] = {"mlp": MLPSpace, "cnn1d": CNN1DSpace, "resnet": ResNetSpace}


def make_space(spec: str | dict[str, Any]) -> Space:
    """A space from a family name (``mlp``, ``cnn1d``, ``resnet``, ``resnet:resnet8x4``) or a mapping such as
    ``{family: mlp, depths: [1, 2], widths: [32, 64]}``."""
    if isinstance(spec, str):
        family, _, base = spec.partition(":")
        spec = {"family": family.strip(), **({"base": base.strip()} if base else {})}
    spec = dict(spec)
    family = spec.pop("family", None)
    if family not in SPACES:
        from fisherkd.core import nearest

        raise UserError(f"unknown search space family {family!r}; {nearest(str(family), SPACES)}")
    valid = [n for n, f in SPACES[family].__dataclass_fields__.items() if f.init]
    unknown = [k for k in spec if k not in valid]
    if unknown:
        raise UserError(f"search space {family}: unknown option {unknown[0]!r}; its options are {', '.join(valid)}")
    return SPACES[family](**spec)


# ----------------------------------------------------------------------------------------------------------------
# Candidates, scoring and evolution
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    """One scored student: its zoo name and kwargs (the searched ones over the config's own)."""

    name: str
    kwargs: dict[str, Any]
    params: int
    semantic: float = math.nan
    relation: float = math.nan
    score: float = math.nan
    space: int = 0
    genome: Genome = ()
    base: dict[str, Any] = field(default_factory=dict)  # fixed kwargs (fit to the data, the config's own)

    @property
    def key(self) -> str:
        return json.dumps([self.name, self.kwargs], sort_keys=True)

    @property
    def label(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.kwargs.items()))
        return f"{self.name}({args})"

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "kwargs": {**self.base, **self.kwargs}, "searched": self.kwargs,
                "params": self.params, "score": self.score, "semantic": self.semantic, "relation": self.relation}


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _seed_of(key: str, seed: int) -> int:
    """A student's init seed: fixed by the candidate and the search seed, not by the order it is met in."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "little") % (2**63)


class Scorer:
    """DisWOT scores of students against one teacher on fixed batches ``[(x, y), ...]``.

    The teacher's Gram matrices are computed once (in its current mode: a trained teacher in eval mode); each
    student is built by ``create_model`` at a random init fixed by ``(seed, candidate)`` and read in train mode
    (batch statistics in BatchNorm, as the authors score at initialisation), with no gradient and no update.
    Distances are averaged over the batches and over ``inits`` random inits (the authors use one)."""

    def __init__(
        self,
        teacher: nn.Module,
        batches: Sequence[tuple[Tensor, Tensor]],
        in_channels: int,
        num_classes: int,
        base_kwargs: dict[str, dict[str, Any]] | None = None,
        seed: int = 0,
        inits: int = 1,
    ) -> None:
        check_searchable(teacher, "teacher")
        if not batches:
            raise UserError("DisWOT needs at least one batch of inputs to score on")
        self.batches = [(x, y) for x, y in batches]
        self.in_channels, self.num_classes = in_channels, num_classes
        self.base_kwargs = dict(base_kwargs or {})
        self.seed, self.inits = seed, inits
        self.teacher_grams = []
        with torch.no_grad():
            for x, y in self.batches:
                out = readout(teacher, x)
                if out.logits.shape[-1] != num_classes:
                    classes = out.logits.shape[-1]
                    raise UserError(f"the teacher has {classes} outputs but the data {num_classes} classes")
                # an unlabelled row (label -100, a transfer input) takes the teacher's class
                labels = torch.where(y < 0, out.logits.argmax(-1), y)
                cam = gram(class_activation(out.features, out.logits, labels))
                self.teacher_grams.append((labels, cam, gram(out.stage_map)))

    def model(self, name: str, kwargs: dict[str, Any]) -> nn.Module:
        """The candidate ``name`` with ``kwargs`` over the fixed ``base_kwargs[name]``, at the current RNG state."""
        try:
            return create_model(name, self.in_channels, self.num_classes, **self.base_kwargs.get(name, {}), **kwargs)
        except (TypeError, ValueError) as err:
            raise UserError(f"candidate {name}({kwargs}) cannot be built: {err}") from err

    def score(self, name: str, kwargs: dict[str, Any]) -> tuple[float, float]:
        """``(M_s, M_r)`` of one student, averaged over the batches and ``inits`` random inits."""
        key = json.dumps([name, kwargs], sort_keys=True)
        semantic = relation = 0.0
        for init in range(self.inits):
            with torch.random.fork_rng():
                # the first init's seed does not depend on `inits`, so inits=1 is the first of inits=3
                torch.manual_seed((_seed_of(key, self.seed) + init) % 2**63)
                student = self.model(name, kwargs)
            s, r = self._distances(student, name, kwargs)
            semantic, relation = semantic + s, relation + r
        return semantic / self.inits, relation / self.inits

    def _distances(self, student: nn.Module, name: str, kwargs: dict[str, Any]) -> tuple[float, float]:
        student.to(self.batches[0][0].device).train()
        semantic = relation = 0.0
        with torch.no_grad():
            for (x, _), (labels, t_cam, t_rel) in zip(self.batches, self.teacher_grams):
                try:
                    out = readout(student, x)
                except RuntimeError as err:
                    raise UserError(
                        f"candidate {name}({kwargs}) cannot take this data's inputs, {tuple(x.shape[1:])} per sample "
                        f"({str(err).splitlines()[0]}): choose a search space that fits the data"
                    ) from err
                semantic += float(gram_distance(t_cam, gram(class_activation(out.features, out.logits, labels))))
                relation += float(gram_distance(t_rel, gram(out.stage_map)))
        n = len(self.batches)
        return semantic / n, relation / n


@dataclass
class SearchResult:
    """Every candidate scored (best first) and the final population (best first)."""

    ranked: list[Candidate]
    population: list[Candidate]
    history: list[dict[str, Any]]


def evolve(
    spaces: Sequence[Space],
    scorer: Scorer,
    population: int = 16,
    generations: int = 10,
    budget: int | None = None,
    seed: int = 0,
    on_generation: Callable[[int, list[Candidate]], None] | None = None,
) -> SearchResult:
    """Evolutionary search: ``population`` distinct candidates sampled uniformly over ``spaces`` (each within
    ``budget`` parameters), then per generation ``population`` children, each a one-gene mutation of a parent
    drawn from the top half; the best ``population`` of parents and children survive. Seeded by ``seed``
    (sampling, mutation and every student's init); a candidate is scored once."""
    if population < 1 or generations < 0:
        raise UserError(f"population must be >= 1 and generations >= 0, got {population} and {generations}")
    if not spaces:
        raise UserError("give at least one search space (mlp, cnn1d, resnet)")
    rng = random.Random(seed)
    seen: dict[str, Candidate] = {}
    too_big: set[str] = set()
    smallest = [math.inf]

    def candidate(space_index: int, genome: Genome) -> Candidate | None:
        name, kwargs = spaces[space_index].build(genome)
        key = json.dumps([name, kwargs], sort_keys=True)
        if key in seen:
            return seen[key]
        if key in too_big:
            return None
        with torch.random.fork_rng():  # counting parameters must not move the caller's random state
            params = parameter_count(scorer.model(name, kwargs))
        smallest[0] = min(smallest[0], params)
        if budget is not None and params > budget:
            too_big.add(key)
            return None
        semantic, relation = scorer.score(name, kwargs)
        found = Candidate(name, kwargs, params, semantic, relation, diswot_score(semantic, relation), space_index,
                          genome, dict(scorer.base_kwargs.get(name, {})))
        seen[key] = found
        return found

    current: dict[str, Candidate] = {}
    tries = 0
    while len(current) < population and tries < 50 * population:
        tries += 1
        s = rng.randrange(len(spaces))
        found = candidate(s, spaces[s].sample(rng))
        if found is not None:
            current[found.key] = found
    if not current:
        raise UserError(
            f"no candidate of the search space fits --budget {budget} parameters (the smallest seen has "
            f"{int(smallest[0])}): raise the budget or add smaller widths/depths to the space"
        )
    history = []

    def best(pool: Iterable[Candidate]) -> list[Candidate]:
        return sorted(pool, key=lambda c: (-c.score, c.params, c.key))

    survivors = best(current.values())
    history.append(_generation_record(0, survivors))
    if on_generation:
        on_generation(0, survivors)
    for generation in range(1, generations + 1):
        parents = survivors[: max(1, (len(survivors) + 1) // 2)]
        children: dict[str, Candidate] = {}
        for _ in range(3 * population):  # mutations that repeat a parent or exceed the budget are retried
            if len(children) >= population:
                break
            parent = rng.choice(parents)
            child = candidate(parent.space, spaces[parent.space].mutate(parent.genome, rng))
            if child is not None and child.key not in current:
                children[child.key] = child
        current = {c.key: c for c in best({**current, **children}.values())[:population]}
        survivors = best(current.values())
        history.append(_generation_record(generation, survivors))
        if on_generation:
            on_generation(generation, survivors)
    return SearchResult(best(seen.values()), survivors, history)


def _generation_record(generation: int, survivors: list[Candidate]) -> dict[str, Any]:
    return {"generation": generation, "best": survivors[0].label, "best_score": survivors[0].score,
            "mean_score": sum(c.score for c in survivors) / len(survivors)}


# ----------------------------------------------------------------------------------------------------------------
# Rank correlation (for validating the score against trained accuracy)
# ----------------------------------------------------------------------------------------------------------------


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties given the mean of the ranks they span."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's ρ: the Pearson correlation of the (tie-averaged) ranks."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"spearman needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's τ-b: ``(P − Q) / sqrt((n0 − n1)(n0 − n2))`` over all pairs (P concordant, Q discordant, n0 pairs,
    n1 / n2 pairs tied in x / y)."""
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"kendall_tau needs two sequences of one length >= 2, got {len(x)} and {len(y)}")
    concordant = discordant = tied_x = tied_y = pairs = 0
    for i in range(len(x)):
        for j in range(i + 1, len(x)):
            pairs += 1
            dx, dy = x[i] - x[j], y[i] - y[j]
            tied_x += dx == 0
            tied_y += dy == 0
            if dx * dy > 0:
                concordant += 1
            elif dx * dy < 0:
                discordant += 1
    denominator = math.sqrt((pairs - tied_x) * (pairs - tied_y))
    return (concordant - discordant) / denominator if denominator else math.nan


def rank_correlation(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Spearman's ρ and Kendall's τ-b (with p-values from scipy when it is installed)."""
    result = {"spearman": spearman(x, y), "kendall": kendall_tau(x, y)}
    try:
        from scipy import stats
    except ImportError:
        return result
    result["spearman_p"] = float(stats.spearmanr(x, y).pvalue)
    result["kendall_p"] = float(stats.kendalltau(x, y).pvalue)
    return result


# ----------------------------------------------------------------------------------------------------------------
# The command: a config's teacher, its data, the search, the report
# ----------------------------------------------------------------------------------------------------------------


def score_batches(splits: Any, batches: int, batch_size: int, seed: int, device: torch.device | str = "cpu"):
    """``batches`` training batches of ``batch_size`` in a seeded order: what every candidate is scored on."""
    from fisherkd.data import make_loader

    loader = make_loader(splits, "train", batch_size, shuffle=True, drop_last=False, seed=seed, device=device)
    out = []
    for batch in loader.epoch(0):
        out.append((batch.x, batch.y))
        if len(out) == batches:
            break
    return out


def base_kwargs(
    spaces: Sequence[Space],
    input_shape: tuple[int, ...],
    in_channels: int,
    student_name: str | None = None,
    student_kwargs: dict[str, Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per zoo name, the fixed constructor arguments of its candidates: those that fit the data, then the run
    config's own student kwargs when the student is of that name (the searched ones override both)."""
    out: dict[str, dict[str, Any]] = {}
    for space in spaces:
        name = space.zoo_name
        out[name] = {**space.fit(input_shape, in_channels), **((student_kwargs or {}) if name == student_name else {})}
    return out


def run_search(
    config: Any,
    spaces: Sequence[Space],
    output: str | Path,
    population: int = 16,
    generations: int = 10,
    budget: int | None = None,
    batches: int = 3,
    batch_size: int = 64,
    seed: int = 0,
    inits: int = 1,
    top: int = 10,
    console: Any = None,
) -> dict[str, Any]:
    """Search students for the teacher of run config ``config`` (from its checkpoint or the cache, trained and
    cached if neither), write ``search.json`` and ``best_student.yaml`` under ``output`` and print the ranking."""
    import yaml
    from rich.console import Console
    from rich.table import Table

    from fisherkd.data import load_splits
    from fisherkd.engine.trainer import resolve_device
    from fisherkd.provenance import provenance
    from fisherkd.run import get_teacher

    if config.teacher is None:
        raise UserError("search-student scores students against a teacher: add a teacher: {name: ...} block")
    if config.teacher.name is None:
        raise UserError("search-student needs one teacher model (teacher: {name: ...}), not an ensemble or EMA teacher")
    console = console or Console()
    splits = load_splits(config.data)
    teacher, teacher_record = get_teacher(config, splits)
    device = resolve_device(config.device)
    teacher.to(device).eval()
    data = score_batches(splits, batches, batch_size, seed, device)
    base = base_kwargs(spaces, splits.input_shape, splits.in_channels, config.student.name, config.student.kwargs)
    scorer = Scorer(teacher, data, splits.in_channels, splits.num_classes, base, seed, inits)
    measured_with = provenance(device)

    def progress(generation: int, survivors: list[Candidate]) -> None:
        console.print(f"generation {generation}: best {survivors[0].label} score {survivors[0].score:.5f}",
                      soft_wrap=True)

    result = evolve(spaces, scorer, population, generations, budget, seed, on_generation=progress)
    table = Table(title=f"DisWOT ranking for teacher {config.teacher.name} (higher score is better)")
    for column in ("rank", "student", "params", "score", "semantic M_s", "relation M_r"):
        table.add_column(column)
    for i, c in enumerate(result.ranked[:top], 1):
        table.add_row(str(i), c.label, f"{c.params:,}", f"{c.score:.5f}", f"{c.semantic:.5f}", f"{c.relation:.5f}")
    console.print(table)
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    best = result.ranked[0]
    report = {
        "method": "DisWOT (Dong et al., CVPR 2023): score = -(M_s + M_r) at random init, higher is better",
        "teacher": {"name": config.teacher.name, "kwargs": config.teacher.kwargs, **teacher_record},
        "data": config.data.model_dump(mode="json"),
        "spaces": [s.spec() for s in spaces],
        "settings": {"population": population, "generations": generations, "budget": budget, "batches": len(data),
                     "batch_size": batch_size, "seed": seed, "inits": inits, "base_kwargs": base},
        "best": best.record(),
        "ranking": [c.record() for c in result.ranked],
        "final_population": [c.record() for c in result.population],
        "history": result.history,
        "provenance": measured_with,
    }
    (output / "search.json").write_text(json.dumps(report, indent=2))
    student = {"name": best.name, "kwargs": best.record()["kwargs"]}
    (output / "best_student.yaml").write_text(yaml.safe_dump({"student": student}, sort_keys=False))
    console.print(f"wrote {output / 'search.json'} ({len(result.ranked)} candidates scored) and "
                  f"{output / 'best_student.yaml'}", soft_wrap=True)
    return report
