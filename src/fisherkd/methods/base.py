"""The method registry: every distillation loss is a small ``nn.Module`` registered by name.

A method receives a :class:`MethodInputs` (student and teacher logits, tapped feature pairs, labels, masks,
optional importance weights) and returns named, *unweighted* loss terms. It knows nothing of the trainer; the
:class:`~fisherkd.distiller.Distiller` multiplies each term by the loss weight of the method.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn

from fisherkd.core import nearest

Family = Literal["label", "logit", "feature", "relation", "attention", "sequence", "scheme"]
AdapterKind = Literal["none", "student_to_teacher"]
# What a method's layer pairs may tap: B×C×H×W maps, B×D vectors, B×T×D token states, B×H×T×T attention
# probabilities, or the logits of a head.
PairKind = Literal["map", "vector", "token", "attention", "logits"]


class Hyperparameters(BaseModel):
    """Base of every method's typed hyper-parameters. Defaults are the authors'."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass
class MethodInputs:
    """Everything a method may read for one batch.

    ``student_features[j]`` and ``teacher_features[j]`` are the tensors of the method's j-th tapped layer pair;
    the student side has already passed through its adapter when the method asks for one. ``weights`` holds
    importance weights by axis name ("sample", "class", "channel", ...), each with mean 1.

    Where training is comes from the Distiller's :class:`~fisherkd.step.StepClock`, the same under every
    front-end: ``epoch`` (fractional, a device scalar), ``step`` (optimizer steps taken), ``index`` (dataset
    indices of the samples, where the loader gives them) and ``batch`` (the whole input the models saw: a tensor,
    or a Transformers batch dict with every column the collator produced). A method that needs something new per
    step reads it from these; nothing else has to change.
    """

    student_logits: Tensor
    teacher_logits: Tensor | None = None
    target: Tensor | None = None
    student_features: list[Tensor] = field(default_factory=list)
    teacher_features: list[Tensor] = field(default_factory=list)
    mask: Tensor | None = None
    index: Tensor | None = None
    epoch: Tensor | float = 0.0
    weights: Mapping[str, Tensor] = field(default_factory=dict)
    step: Tensor | None = None
    batch: Tensor | Mapping[str, Tensor] | None = None


class Method(nn.Module):
    """Base class of a distillation loss. Subclasses set the class variables and implement ``forward``."""

    name: ClassVar[str] = ""
    family: ClassVar[Family] = "logit"
    paper: ClassVar[str] = ""
    default_weight: ClassVar[float] = 1.0
    label_weight: ClassVar[float] = 1.0  # the weight of the label cross-entropy the authors pair the method with
    adapter: ClassVar[AdapterKind] = "none"
    needs_teacher: ClassVar[bool] = True
    needs_target: ClassVar[bool] = False
    # with needs_target: whether rows without a label (target -100, transfer inputs) are left out rather than an error
    accepts_unlabelled: ClassVar[bool] = False
    min_pairs: ClassVar[int] = 0
    max_pairs: ClassVar[int | None] = None
    pair_kinds: ClassVar[tuple[PairKind, ...]] = ()  # what its layer pairs may be (empty: none)
    same_architecture: ClassVar[bool] = False  # compares parameters: the student must have the teacher's layout
    Params: ClassVar[type[Hyperparameters]] = Hyperparameters
    # Axes of MethodInputs.weights the loss reads, i.e. what a ``fisher:`` block may weight ("sample", "class",
    # "channel", "position", "head", "token", "parameter"); default_fisher is the block used when none is given.
    weight_axes: ClassVar[tuple[str, ...]] = ()
    default_fisher: ClassVar[dict[str, Any] | None] = None

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        self.hparams = _validate_hparams(type(self), hparams)

    def forward(self, inputs: MethodInputs) -> dict[str, Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, student_features: list[Tensor], teacher_features: list[Tensor]) -> None:
        """Build learned parts from the shapes of one example batch (called by the Distiller before training,
        after adapters, so the optimizer sees every parameter). Student features are already adapted."""

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called once by the Distiller with its models, for the rare method that reads parameters rather than
        outputs (``fisher_param``). Keep plain references: registering the models here would save them twice."""

    def inference_model(self, student: nn.Module, teacher: nn.Module | None, pairs: list[tuple[str, str]],
                        adapters: list[nn.Module | None]) -> nn.Module | None:
        """The model that predicts after training when this method replaces the student's own head (SimKD: the
        student's feature through the learned projector into the teacher's classifier), built from the method's
        layer ``pairs`` and their ``adapters`` (None where a pair has none). None keeps the student."""
        return None

    @property
    def reads_epoch(self) -> bool:
        """Whether the loss follows the epoch (a warm-up or curriculum): the Distiller then needs the epoch length."""
        return False

    def wants_adapter(self, student_feature: Tensor, teacher_feature: Tensor) -> bool:
        """Whether this pair's student tensor passes through a learned adapter (asked once, on example shapes)."""
        return self.adapter != "none"

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.hparams.model_dump().items())


_REGISTRY: dict[str, type[Method]] = {}


def register(name: str):
    """Class decorator: ``@register("kd")`` makes the method available to ``create`` and to configs."""

    def wrap(cls: type[Method]) -> type[Method]:
        if name in _REGISTRY:
            raise ValueError(f"method {name!r} is registered twice ({_REGISTRY[name].__module__}, {cls.__module__})")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return wrap


def method_class(name: str) -> type[Method]:
    _load_builtin_methods()
    if name not in _REGISTRY:
        raise KeyError(f"unknown method {name!r}; {nearest(name, _REGISTRY)} (see `fisherkd methods`)")
    return _REGISTRY[name]


def create(name: str, **hparams: Any) -> Method:
    """Build a registered method by name with validated hyper-parameters."""
    return method_class(name)(**hparams)


def available(family: str | None = None) -> list[str]:
    """Sorted names of the registered methods, optionally of one family."""
    _load_builtin_methods()
    return sorted(n for n, c in _REGISTRY.items() if family is None or c.family == family)


def describe(name: str) -> dict[str, Any]:
    """Name, family, paper, default loss weight and hyper-parameter defaults of a method."""
    cls = method_class(name)
    defaults = {
        k: "required" if f.is_required() else f.get_default(call_default_factory=True)
        for k, f in cls.Params.model_fields.items()
    }
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": name,
        "family": cls.family,
        "summary": doc[0] if doc else "",
        "paper": cls.paper,
        "default_weight": cls.default_weight,
        "label_weight": cls.label_weight,
        "fisher_axes": list(cls.weight_axes),
        "pairs": list(cls.pair_kinds),
        "defaults": defaults,
    }


def _validate_hparams(cls: type[Method], hparams: dict[str, Any]) -> Hyperparameters:
    fields = set(cls.Params.model_fields)
    for key in hparams:
        if key not in fields:
            valid = nearest(key, fields) if fields else "it takes no hyper-parameters"
            raise TypeError(f"method {cls.name!r} has no hyper-parameter {key!r}; {valid}")
    try:
        return cls.Params(**hparams)
    except ValidationError as err:
        first = err.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        message = first["msg"]
        field = cls.Params.model_fields.get(where)
        if first["type"] == "missing" and field is not None and field.description:
            message = f"{message}: {field.description}"  # say what the value is, e.g. crd's num_data
        raise TypeError(f"method {cls.name!r}, hyper-parameter {where!r}: {message}") from None


_loaded = False


def _load_builtin_methods() -> None:
    # Importing the family modules runs their @register decorators; done lazily to avoid import cycles.
    global _loaded
    if not _loaded:
        _loaded = True
        import importlib
        import pkgutil

        import fisherkd.methods as pkg

        for info in pkgutil.iter_modules(pkg.__path__):
            if info.name not in {"base"}:
                importlib.import_module(f"fisherkd.methods.{info.name}")

