"""Run configuration: YAML validated by pydantic, with ``key=value`` overrides from the command line.

Unknown keys and wrong types are rejected with the key path (``train.optimizer.lr``); unknown method names and
hyper-parameters are rejected with the nearest valid names. YAML is read with ``yaml.safe_load`` only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from fisherkd.core import nearest
from fisherkd.data.augment import AugmentConfig
from fisherkd.distiller import MethodSpec
from fisherkd.errors import UserError
from fisherkd.methods.base import method_class


class ConfigError(UserError, ValueError):
    """A configuration problem, reported in one line with the key path."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(Strict):
    name: str = Field(description="zoo name (see fisherkd.models.available_models()), or timm:NAME / torchvision:NAME")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments")
    checkpoint: str | None = Field(None, description="weights to load (a state dict saved by torch.save)")


class OptimizerConfig(Strict):
    name: Literal["sgd", "adamw", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = Field(5e-4, ge=0)


class ScheduleConfig(Strict):
    name: Literal["constant", "step", "cosine"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from 0, in epochs")
    milestones: list[int] = Field(default_factory=list, description="epochs where 'step' multiplies the lr by gamma")
    gamma: float = 0.1


class TrainConfig(Strict):
    epochs: int = Field(10, ge=1)
    batch_size: int = Field(64, ge=1)
    eval_batch_size: int = Field(1000, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    augment: AugmentConfig = Field(default_factory=AugmentConfig)
    amp: Literal["auto", "bf16", "off"] = Field("auto", description="auto = bf16 autocast on CUDA, off on CPU")
    channels_last: bool | None = Field(None, description="None = on for CUDA image models")
    compile: bool = Field(False, description="torch.compile the student")
    grad_clip: float | None = Field(None, gt=0)
    log_every: int = Field(50, ge=1, description="optimizer steps between reads of the device-side metrics")
    eval_every: int = Field(1, ge=1, description="epochs between evaluations")


class MCMIConfig(Strict):
    """Maximum-CMI teacher training (Ye et al., ICLR 2024): the teacher minimises CE − λ·CMI, where CMI is the
    conditional mutual information of its own outputs given the label, estimated per batch (the registered
    method ``mcmi``, :func:`fisherkd.functional.cmi`). Authors' defaults: λ = 0.25, τ = 1."""

    weight: float = Field(0.25, gt=0, description="λ, the weight of −CMI next to the cross-entropy (authors: 0.1-0.25)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the outputs whose CMI is maximised")


class TeacherTrainConfig(TrainConfig):
    """How a teacher is trained when no checkpoint is given: a student's recipe, plus teacher-only objectives."""

    mcmi: MCMIConfig | None = Field(
        None, description="maximum-CMI teacher: train with CE − λ·CMI (e.g. mcmi: {weight: 0.25}); in the cache key"
    )

    @model_validator(mode="after")
    def _no_hard(self) -> TeacherTrainConfig:
        if self.augment.hard is not None:
            raise ValueError(
                "augment.hard trains an augmenter against a teacher-student disagreement, and a teacher trains "
                "alone: set it in the run's train.augment, not in teacher.train"
            )
        return self


class FromTeacherConfig(Strict):
    """A student pruned from the run's teacher (``fisherkd.prune``): its top structures by importance on
    ``calibration`` training samples, rebuilt as a smaller model of the teacher's family with the kept weights."""

    width: float = Field(0.5, gt=0, le=1, description="kept fraction of every width (neurons, channels, heads, hidden)")
    heads: float | None = Field(None, gt=0, le=1, description="kept fraction of attention heads (default: width)")
    neurons: float | None = Field(None, gt=0, le=1, description="kept fraction of MLP neurons / channels (width)")
    hidden: float | None = Field(None, gt=0, le=1, description="kept fraction of hidden channels (default: width)")
    layers: int | None = Field(None, ge=1, description="blocks kept (default: all)")
    importance: Literal["fisher", "empirical", "activation", "weight", "random"] = "fisher"
    layer_importance: Literal["fisher", "empirical", "activation", "weight", "random", "block", "removal"] = "block"
    calibration: int = Field(512, ge=1, description="training samples the importance is measured on")
    seed: int | None = Field(
        None, description="seed of the calibration sample, sampled labels and random importance (default: the run's)"
    )

    def prune_arguments(self) -> dict[str, Any]:
        """The keyword arguments of :func:`fisherkd.prune.prune` this spec means (an unset seed is 0: a run sets
        its own seed first, see ``fisherkd.run.pruned_student``)."""
        return {
            "width": self.width,
            "heads": self.heads,
            "neurons": self.neurons,
            "hidden": self.hidden,
            "layers": self.layers,
            "importance_method": self.importance,
            "layer_importance": self.layer_importance,
            "seed": 0 if self.seed is None else self.seed,
        }


class StudentConfig(ModelConfig):
    name: str | None = Field(None, description="zoo name; leave out with from_teacher (the teacher's family)")
    dual_head: str | None = Field(
        None, description="dual-head KD: the student's head module (e.g. head) gets a twin, tapped as <head>.distill"
    )
    from_teacher: FromTeacherConfig | None = Field(
        None, description="prune the run's teacher into the student (fewer channels / heads / layers, kept weights)"
    )

    @model_validator(mode="after")
    def _check_source(self) -> StudentConfig:
        if self.name is None and self.from_teacher is None:
            raise ValueError("the student needs a zoo name, or from_teacher: {width: 0.5} to prune the teacher")
        return self


class TeacherConfig(ModelConfig):
    """One teacher model (``name``), an ensemble (``members``) or the EMA of the student (``ema_decay``).

    A checkpoint may be a run directory or one of its checkpoints: the student of an earlier run then teaches
    (born-again self-distillation).
    """

    name: str | None = Field(None, description="zoo name; leave out for an ensemble (members) or an EMA teacher")
    seed: int = Field(0, description="seed of the teacher's own training; student seeds share one teacher")
    train: TeacherTrainConfig = Field(
        default_factory=TeacherTrainConfig,
        description="how to train the teacher when no checkpoint is given (then cached)",
    )
    members: list[TeacherConfig] = Field(
        default_factory=list, description="an ensemble of teachers, each trained once and cached like a single one"
    )
    member_weights: list[float] | None = Field(None, description="fixed weights of the members (default: equal)")
    ensemble_average: Literal["probs", "logits"] = Field(
        "probs", description="average the members' probabilities (default) or their logits"
    )
    ensemble_weighting: Literal["fixed", "confidence"] = Field(
        "fixed", description="confidence: also weight each member per sample by ‖p‖² = 1 − tr F of its prediction"
    )
    ema_decay: float | None = Field(
        None, ge=0, le=1, description="self-distillation: the teacher is an EMA of the student with this decay"
    )

    @model_validator(mode="after")
    def _one_kind(self) -> TeacherConfig:
        given = {"name": self.name is not None, "members": bool(self.members), "ema_decay": self.ema_decay is not None}
        kinds = [k for k, v in given.items() if v]
        if len(kinds) != 1:
            raise ValueError(
                "a teacher is one model (name: ...), an ensemble (members: [...]) or the EMA of the student "
                f"(ema_decay: ...); got {' and '.join(kinds) or 'none of them'}"
            )
        if self.name is None and (self.checkpoint or self.kwargs):
            raise ValueError("checkpoint and kwargs belong to one teacher model: give its name, or set them per member")
        if any(m.name is None for m in self.members):
            raise ValueError("ensemble members must be single models (name: ...), not ensembles or EMA teachers")
        ensemble_options = (self.member_weights, self.ensemble_average, self.ensemble_weighting)
        if not self.members and ensemble_options != (None, "probs", "fixed"):
            raise ValueError("member_weights, ensemble_average and ensemble_weighting need members: [...]")
        weights = self.member_weights
        if weights is not None and (len(weights) != len(self.members) or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"member_weights: need {len(self.members)} non-negative weights, not all zero")
        return self


class DataConfig(Strict):
    name: str = "mnist1d"
    root: str | None = None
    train_subset: int | None = Field(
        None, ge=1, description="train on this many training samples (a fixed random subset); the test split is whole"
    )
    labelled: int | None = Field(
        None, ge=1, description="keep the labels of this many training samples (a fixed random choice); the rest are "
        "transfer inputs that only the teacher labels (label -100; the teacher trains on the labelled ones)"
    )
    transfer: int | None = Field(
        None, ge=1, description="add this many unlabelled inputs from the dataset's own generator (mnist1d) for the "
        "teacher to label ('function matching'); the teacher never trains on them"
    )
    class_groups: list[list[int]] | None = Field(
        None, description="merge the dataset's classes into these groups (e.g. [[0, 2, 4, 6, 8], [1, 3, 5, 7, 9]]): "
        "a few-class task whose label is the group's index; every class in exactly one group"
    )


class TrackingConfig(Strict):
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fisherkd"
    wandb_mode: Literal["offline", "online"] = "offline"


class RunConfig(Strict):
    """Everything one distillation run needs."""

    name: str = "run"
    seed: int = 0
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    output_dir: str = "runs"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherConfig | None = None
    student: StudentConfig
    methods: list[MethodSpec] = Field(default_factory=lambda: [MethodSpec(name="ce")])
    train: TrainConfig = Field(default_factory=TrainConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check_methods(self) -> RunConfig:
        for i, spec in enumerate(self.methods):
            try:
                spec.build()
            except (KeyError, TypeError) as err:
                raise ValueError(f"methods.{i}: {err.args[0]}") from None
            if method_class(spec.name).needs_teacher and self.teacher is None:
                raise ValueError(f"methods.{i}: method {spec.name!r} needs a teacher: add a teacher: block")
        if self.train.augment.hard is not None and self.teacher is None:
            raise ValueError(
                "train.augment.hard: HARD learns inputs where teacher and student disagree: add a teacher: block"
            )
        if self.student.from_teacher is not None:
            teacher = self.teacher.name if self.teacher else None
            if teacher is None:
                raise ValueError("student.from_teacher prunes the teacher: add a teacher: {name: ...} (one model)")
            if self.student.name not in (None, teacher):
                raise ValueError(
                    f"student.name {self.student.name!r}: a student pruned from the teacher is a {teacher!r}; "
                    "leave student.name out"
                )
        return self


def set_by_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.0.c`` in nested dicts/lists, creating dicts on the way."""
    keys = dotted.split(".")
    node: Any = tree
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    parsed = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=5)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"override {item!r}: {yaml_problem(err)} (quote the value)") from err
        parsed.append((key.strip(), value))
    return parsed


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class of a field's annotation: ``M`` itself or the ``M`` of ``M | None``."""
    for candidate in (annotation, *get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def format_validation_error(err: ValidationError, model: type[BaseModel]) -> str:
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    where = ".".join(loc) or "config"
    if first["type"] == "extra_forbidden":
        parent: Any = model
        for part in loc[:-1]:
            field = getattr(parent, "model_fields", {}).get(part)
            parent = _model_in(field.annotation if field else None)
            if parent is None:
                break
        if parent is not None:
            return f"config error at {where}: unknown key; {nearest(loc[-1], list(parent.model_fields))}"
    message = first["msg"].removeprefix("Value error, ")
    return f"config error at {where}: {message}" if loc else f"config error at {message}"


def build_config(raw: dict[str, Any], overrides: list[str] | None = None) -> RunConfig:
    raw = dict(raw)
    for key, value in parse_overrides(overrides or []):
        try:
            set_by_path(raw, key, value)
        except (IndexError, ValueError, TypeError, AttributeError):
            raise ConfigError(f"override {key!r}: no such list element or key path") from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, RunConfig)) from None


def yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser objected to and where, in one line."""
    if not isinstance(err, yaml.MarkedYAMLError):
        return f"not valid YAML: {' '.join(str(err).split()) or type(err).__name__}"
    mark = err.problem_mark
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    problem = err.problem or err.context or type(err).__name__
    if isinstance(err, yaml.constructor.ConstructorError) and "tag" in problem:  # e.g. !!python/object/apply
        tag = problem.rpartition(" ")[2].replace("tag:yaml.org,2002:", "!!")
        return f"the tag {tag}{where} is refused: YAML is read with yaml.safe_load (plain values, no Python objects)"
    return f"not valid YAML: {problem}{where}"


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping in a YAML file, read with ``yaml.safe_load``. A file that is missing, unreadable, not YAML, empty
    or not a mapping raises a one-line :class:`ConfigError` naming it (``what`` says which file it is)."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{what} {str(path)!r} does not exist")
    if path.is_dir():
        raise ConfigError(f"{what} {str(path)!r} is a directory: give the path of a YAML file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{what} {str(path)!r}: {yaml_problem(err)}") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"cannot read {what} {str(path)!r}: {getattr(err, 'strerror', None) or err}") from err
    if raw is None:
        raise ConfigError(f"{what} {str(path)!r} is empty: a run config needs at least student: {{name: ...}}")
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{what} {str(path)!r} must hold a mapping (key: value lines) at the top level, not a {type(raw).__name__}"
        )
    return raw


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config with ``yaml.safe_load``, apply ``key=value`` overrides and validate it."""
    return build_config(read_yaml(path), overrides)


def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config a run saved as ``run_dir/config.yaml``; problems are one-line errors naming the file."""
    run_dir = Path(run_dir)
    made_by = "give the directory `fisherkd train` made (output_dir/name)"
    if not run_dir.is_dir():
        state = "is a file" if run_dir.exists() else "does not exist"
        raise ConfigError(f"run directory {str(run_dir)!r} {state}: {made_by}")
    path = run_dir / "config.yaml"
    if not path.exists():
        raise ConfigError(f"{str(run_dir)!r} has no config.yaml, so it is not a run directory: {made_by}")
    raw = read_yaml(path, "run config")
    try:
        return build_config(raw)
    except ConfigError as err:
        raise ConfigError(f"run config {str(path)!r}: {err}") from None
